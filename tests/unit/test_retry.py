"""Backoff math: bounded, growing, jittered."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgqueue.retry import ExponentialBackoff


@given(
    attempt=st.integers(min_value=-5, max_value=10_000),
    base=st.floats(min_value=0, max_value=100),
    factor=st.floats(min_value=1, max_value=10),
    max_delay=st.floats(min_value=0, max_value=1e6),
    jitter=st.floats(min_value=0, max_value=1),
)
def test_delay_is_within_jitter_of_the_capped_nominal(
    attempt: int, base: float, factor: float, max_delay: float, jitter: float
) -> None:
    policy = ExponentialBackoff(
        base=base, factor=factor, max_delay=max_delay, jitter=jitter
    )
    delay = policy.delay(attempt)
    nominal = min(max_delay, base * factor ** min(max(attempt - 1, 0), 64))
    assert 0 <= delay <= max_delay
    assert nominal * (1 - jitter) - 1e-9 <= delay <= nominal * (1 + jitter) + 1e-9


def test_delays_grow_without_jitter() -> None:
    policy = ExponentialBackoff(base=1, factor=2, max_delay=100, jitter=0)
    assert [policy.delay(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 64, 100]


def test_jitter_spreads_retries() -> None:
    policy = ExponentialBackoff(base=10, jitter=0.5)
    assert len({policy.delay(3) for _ in range(50)}) > 40


@pytest.mark.parametrize(
    "kwargs", [{"base": -1}, {"factor": 0.5}, {"jitter": 2}, {"max_delay": -1}]
)
def test_invalid_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message varies by field
        ExponentialBackoff(**kwargs)
