"""Token-bucket arithmetic (dict-domain.md §4): the values derived from two consecutive snapshots.

Every formula works with DICT's clock (``ResponseTime``), accepts negative balances, and never divides by
zero: a snapshot whose ResponseTime does not advance yields no consumption and no rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from exporter.snapshot import PolicyReading, Snapshot


@dataclass(frozen=True, slots=True)
class PolicyState:
    """One bucket of a snapshot with its derived values."""

    reading: PolicyReading
    remaining_ratio: float
    utilization_percent: float
    #: Gross tokens consumed since the previous snapshot; None for the first snapshot of a policy.
    consumed_tokens: float | None
    #: Gross tokens consumed since the exporter started (the counter Prometheus rates).
    consumed_tokens_total: float
    #: Gross consumption per minute between the last two snapshots; None without a usable previous one.
    consumption_rate_per_minute: float | None
    recovery_eta_seconds: float
    #: Seconds to an empty bucket at the current gross rate; 0 when already ≤ 0; None means "never".
    exhaustion_projection_seconds: float | None


@dataclass(frozen=True, slots=True)
class DerivedSnapshot:
    """A snapshot with every policy's derived values; what the collector renders and history stores."""

    snapshot: Snapshot
    states: tuple[PolicyState, ...]
    #: True when the category differs from the previous snapshot's (BCB changed it).
    category_changed: bool


def remaining_ratio(reading: PolicyReading) -> float:
    return reading.available_tokens / reading.capacity


def recovery_eta_seconds(reading: PolicyReading) -> float:
    """Seconds to a full bucket at the refill rate if nothing is consumed; +inf when it never refills."""
    missing = max(0, reading.capacity - reading.available_tokens)
    if missing == 0:
        return 0.0
    # RefillTokens 0 is valid (only negative is rejected): such a bucket never recovers.
    rate = reading.refill_rate_per_second
    return missing / rate if rate > 0 else math.inf


def gross_consumption(previous: PolicyReading, current: PolicyReading, elapsed_seconds: float) -> float:
    """Tokens consumed between two readings: net drop plus the refill that could have been added.

    Refill above capacity is discarded, so the refill credited is at most what the previous balance was
    missing. A lower bound when the bucket reached its cap inside the interval. Never negative: a balance
    that rose faster than the refill allows (tokens given back after a payment order) counts as 0.
    """
    refill = min(
        current.refill_rate_per_second * elapsed_seconds,
        max(0, previous.capacity - previous.available_tokens),
    )
    return max(0.0, float(previous.available_tokens - current.available_tokens) + refill)


def exhaustion_projection_seconds(reading: PolicyReading, rate_per_second: float | None) -> float | None:
    """Seconds until the balance reaches 0 if consumption keeps its rate; None when it is not draining."""
    if reading.available_tokens <= 0:
        return 0.0
    if rate_per_second is None:
        return None
    drain = rate_per_second - reading.refill_rate_per_second
    if drain <= 0:
        return None
    return reading.available_tokens / drain


def derive(current: Snapshot, previous: DerivedSnapshot | None) -> DerivedSnapshot:
    """Derives every policy of ``current`` against the previous derived snapshot (None at start-up)."""
    elapsed = 0.0
    previous_states: dict[str, PolicyState] = {}
    if previous is not None:
        elapsed = (current.response_time - previous.snapshot.response_time).total_seconds()
        previous_states = {state.reading.name: state for state in previous.states}
    states = tuple(
        _derive_policy(reading, previous_states.get(reading.name), elapsed) for reading in current.policies
    )
    changed = previous is not None and previous.snapshot.category != current.category
    return DerivedSnapshot(snapshot=current, states=states, category_changed=changed)


def _derive_policy(reading: PolicyReading, previous: PolicyState | None, elapsed: float) -> PolicyState:
    consumed: float | None = None
    rate_per_second: float | None = None
    total = previous.consumed_tokens_total if previous is not None else 0.0
    # A ResponseTime that does not advance (or goes back) gives no interval to measure over.
    if previous is not None and elapsed > 0:
        consumed = gross_consumption(previous.reading, reading, elapsed)
        rate_per_second = consumed / elapsed
        total += consumed
    elif previous is not None:
        rate_per_second = (
            previous.consumption_rate_per_minute / 60
            if previous.consumption_rate_per_minute is not None
            else None
        )
    ratio = remaining_ratio(reading)
    return PolicyState(
        reading=reading,
        remaining_ratio=ratio,
        utilization_percent=100.0 * (1.0 - ratio),
        consumed_tokens=consumed,
        consumed_tokens_total=total,
        consumption_rate_per_minute=rate_per_second * 60 if rate_per_second is not None else None,
        recovery_eta_seconds=recovery_eta_seconds(reading),
        exhaustion_projection_seconds=exhaustion_projection_seconds(reading, rate_per_second),
    )
