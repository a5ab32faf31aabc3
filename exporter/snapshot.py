"""The immutable snapshot of a participant's DICT buckets, as one Bridge list call returned it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

#: Participant categories DICT assigns. The official XML schema still says A-F; G and H exist.
CATEGORIES = frozenset("ABCDEFGH")


@dataclass(frozen=True, slots=True)
class PolicyReading:
    """One bucket as DICT reported it. ``available_tokens`` may be negative (404 lookups cost 3 tokens)."""

    name: str
    available_tokens: int
    capacity: int
    refill_tokens: int
    refill_period_sec: int
    #: Share of 404 answers (0..1) when the Bridge counts it; None when it does not (never a fake 0).
    error_404_rate: float | None = None

    @property
    def refill_rate_per_second(self) -> float:
        """Tokens added per second. DICT may say (1200, 60) or (20, 1): only the ratio is meaningful."""
        return self.refill_tokens / self.refill_period_sec


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What one successful GetRateLimitPolicies call returned.

    ``response_time`` is DICT's clock (UTC, timezone-aware) and is the time of the snapshot everywhere:
    consumption between snapshots, stored history and exported values all use it, never the local clock.
    """

    response_time: datetime
    correlation_id: str
    category: str
    policies: tuple[PolicyReading, ...]

    def policy(self, name: str) -> PolicyReading | None:
        for reading in self.policies:
            if reading.name == name:
                return reading
        return None
