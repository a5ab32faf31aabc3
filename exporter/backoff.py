"""One retry backoff for the Bridge client, the history writer and the outbox relay.

Capped exponential delays with jitter in the upper half (``[d/2, d]``): retries of many replicas spread out
instead of hammering a recovering dependency in step, and a delay never collapses to ~0 as full jitter can.
"""

from __future__ import annotations

import random


class Backoff:
    """``next()`` gives the delay before the next attempt; ``reset()`` after a success."""

    def __init__(self, initial: float, maximum: float, *, rng: random.Random | None = None) -> None:
        if not 0 < initial <= maximum:
            raise ValueError(f"need 0 < initial <= maximum (got {initial}, {maximum})")
        self.initial, self.maximum = initial, maximum
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._next = initial
        self.failures = 0

    def next(self) -> float:
        self.failures += 1
        delay = self._rng.uniform(self._next / 2, self._next)
        self._next = min(self.maximum, self._next * 2)
        return delay

    def reset(self) -> None:
        self._next = self.initial
        self.failures = 0
