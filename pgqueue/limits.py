"""The bounds a worker's settings take, shared by the Worker and the CLI's
options (which import this, not the worker, to start fast)."""

# The longest lease, interval, grace or timeout a worker takes: a year.
MAX_SECONDS = 366 * 24 * 3600.0
# The shortest lease: it is renewed every third of it, each time a round trip
# and a commit, and the worker's own deadline (a third of the lease) took a
# healthy database for gone below this.
MIN_LEASE = 1.0
