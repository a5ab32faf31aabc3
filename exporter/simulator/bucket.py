"""One simulated DICT token bucket: refill (continuous or per period), admission, signed balances."""

from __future__ import annotations

import math
from dataclasses import dataclass

CONTINUOUS = "continuous"
PERIOD = "period"


@dataclass
class SimBucket:
    """A bucket whose balance is brought up to date lazily, at the time of each read or charge.

    Refill is path-independent (refilling to t1 then t2 equals refilling to t2), so how often the bucket
    is read never changes its history. Refill that would exceed capacity is discarded, as DICT does.
    In ``period`` mode ``refill_tokens`` arrive at once at each multiple of ``refill_period_sec`` since
    ``epoch``; in ``continuous`` mode they trickle in at their rate.
    """

    name: str
    capacity: int
    refill_tokens: int
    refill_period_sec: int
    tokens: float
    updated: float
    epoch: float
    mode: str = CONTINUOUS

    @property
    def rate(self) -> float:
        """Refill in tokens per second."""
        return self.refill_tokens / self.refill_period_sec

    @property
    def available(self) -> int:
        """What DICT reports: whole tokens, rounded down (so -0.5 reads as -1, never as a free token)."""
        return math.floor(self.tokens)

    def refill_to(self, now: float) -> None:
        if now <= self.updated:
            return
        if self.mode == PERIOD:
            periods = math.floor((now - self.epoch) / self.refill_period_sec) - math.floor(
                (self.updated - self.epoch) / self.refill_period_sec
            )
            added = float(periods * self.refill_tokens)
        else:
            added = self.rate * (now - self.updated)
        if self.tokens < self.capacity:
            self.tokens = min(float(self.capacity), self.tokens + added)
        self.updated = now

    def admit(self, count: int, cost: int = 1) -> int:
        """Serves up to ``count`` requests of ``cost`` tokens; returns how many were admitted.

        A request is admitted while the balance is at least 1 and is then charged its full cost, so a
        404 (cost 3) can leave a negative balance; refused requests (429) cost nothing.
        """
        if count <= 0 or self.tokens < 1:
            return 0
        admitted = min(count, math.floor((self.tokens - 1) / cost) + 1)
        self.tokens -= admitted * cost
        return admitted

    def charge(self, amount: float) -> None:
        """Takes ``amount`` unconditionally (test knob and bursts of known cost); may go negative."""
        self.tokens -= amount

    def set_limits(self, capacity: int, refill_tokens: int, refill_period_sec: int) -> None:
        """New limits (a category change): the balance is clamped to the new capacity, never raised."""
        self.capacity = capacity
        self.refill_tokens = refill_tokens
        self.refill_period_sec = refill_period_sec
        self.tokens = min(self.tokens, float(capacity))
