"""The bounds a worker's settings take, shared by the Worker and the CLI's
options (which import this, not the worker, to start fast), and what counts
as a number in a setting."""

from numbers import Real

# The longest lease, interval, grace or timeout a worker takes: a year.
MAX_SECONDS = 366 * 24 * 3600.0
# The shortest lease: it is renewed every third of it, each time a round trip
# and a commit, and the worker's own deadline (a third of the lease) took a
# healthy database for gone below this.
MIN_LEASE = 1.0


def is_number(value: object) -> bool:
    """A real number of any type (a Fraction, numpy's), but not a bool."""
    return isinstance(value, Real) and not isinstance(value, bool)
