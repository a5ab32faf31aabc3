"""The shared backoff: doubling, capped, jittered in the upper half, reset after a success."""

from __future__ import annotations

import random

import pytest

from exporter.backoff import Backoff


def test_delays_double_up_to_the_cap_with_jitter_in_the_upper_half() -> None:
    backoff = Backoff(0.5, 4.0, rng=random.Random(7))
    delays = [backoff.next() for _ in range(8)]
    ceilings = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert len(set(delays)) == len(delays)  # jittered, not a fixed ladder
    assert backoff.failures == 8


def test_reset_starts_again_from_the_initial_delay() -> None:
    backoff = Backoff(1.0, 8.0, rng=random.Random(1))
    for _ in range(5):
        backoff.next()
    backoff.reset()
    assert backoff.failures == 0
    assert 0.5 <= backoff.next() <= 1.0


def test_nonsense_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="initial <= maximum"):
        Backoff(5.0, 1.0)
