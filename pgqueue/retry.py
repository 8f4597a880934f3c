"""Retry delays: pure functions of the attempt number, no I/O."""

from __future__ import annotations

import random
from dataclasses import dataclass
from math import inf
from typing import Protocol

from pgqueue.errors import ConfigurationError
from pgqueue.limits import is_number


class RetryPolicy(Protocol):
    """Decides how long to wait before the next attempt."""

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        ...


@dataclass(frozen=True, slots=True)
class ExponentialBackoff:
    """``base * factor ** (attempt - 1)`` seconds, capped, with random jitter.

    Jitter spreads retries of jobs that failed together (a database blip, a
    rate-limited API) so they do not come back in lockstep. With ``jitter=0.5``
    the delay is drawn from [50 %, 150 %) of the nominal value, then capped.
    """

    base: float = 1.0
    factor: float = 2.0
    max_delay: float = 3600.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        # Written so that NaN fails each (it compares false with everything).
        numbers = (self.base, self.factor, self.max_delay, self.jitter)
        if not all(is_number(n) for n in numbers):
            raise ConfigurationError(f"backoff settings must be numbers: {self!r}")
        if not (self.base >= 0 and self.factor >= 1 and 0 <= self.max_delay < inf):
            raise ConfigurationError(
                "backoff needs base >= 0, factor >= 1 and a finite max_delay >= 0"
            )
        if not 0 <= self.jitter <= 1:
            raise ConfigurationError("jitter must be between 0 and 1")

    def delay(self, attempt: int) -> float:
        exponent = min(max(attempt - 1, 0), 64)
        try:
            nominal = min(self.max_delay, self.base * self.factor**exponent)
        except OverflowError:  # a large factor: the cap all the same
            nominal = self.max_delay
        spread = 1.0 + self.jitter * (2.0 * random.random() - 1.0)
        return min(self.max_delay, nominal * spread)
