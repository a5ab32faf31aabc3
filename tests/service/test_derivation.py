"""Exact values of the token-bucket arithmetic (dict-domain.md §4) in exporter/service/derivation.py."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

from exporter.service.derivation import (
    DerivedSnapshot,
    derive,
    exhaustion_projection_seconds,
    gross_consumption,
)
from exporter.snapshot import PolicyReading, Snapshot

T0 = datetime(2026, 1, 5, 12, 0, 0, tzinfo=UTC)


def reading(available: int, capacity: int = 36_000, refill: int = 1200, period: int = 60, name: str = "P"):
    return PolicyReading(name, available, capacity, refill, period)


def snap(*policies: PolicyReading, at: float = 0.0, category: str = "A") -> Snapshot:
    return Snapshot(T0 + timedelta(seconds=at), f"{int(at):032x}", category, tuple(policies))


def chain(*snapshots: Snapshot) -> DerivedSnapshot:
    derived = None
    for snapshot in snapshots:
        derived = derive(snapshot, derived)
    assert derived is not None
    return derived


def test_first_snapshot_has_ratios_and_eta_but_no_consumption_yet() -> None:
    state = derive(snap(reading(27_000)), None).states[0]
    assert state.remaining_ratio == 0.75
    assert state.utilization_percent == 25.0
    assert state.consumed_tokens is None
    assert state.consumed_tokens_total == 0.0
    assert state.consumption_rate_per_minute is None
    assert state.recovery_eta_seconds == 450.0  # 9000 missing at 20 tokens/s
    assert state.exhaustion_projection_seconds is None


def test_gross_consumption_counts_the_refill_added_between_snapshots() -> None:
    # 30 s at 20/s refills 600; the balance fell by 1000: 1600 were consumed.
    state = chain(snap(reading(30_000)), snap(reading(29_000), at=30)).states[0]
    assert state.consumed_tokens == 1600.0
    assert state.consumed_tokens_total == 1600.0
    assert state.consumption_rate_per_minute == 3200.0
    # draining at 1600/30 - 20 = 33.33 tokens/s net: 29000 / 33.333 = 870 s
    assert state.exhaustion_projection_seconds == pytest.approx(870.0)


def test_refill_above_capacity_is_discarded() -> None:
    # 100 missing at t0; 30 s could refill 600 but only 100 fit: the bucket stays full, 100 consumed.
    state = chain(snap(reading(35_900)), snap(reading(36_000), at=30)).states[0]
    assert state.consumed_tokens == 0.0
    state = chain(snap(reading(35_900)), snap(reading(35_950), at=30)).states[0]
    assert state.consumed_tokens == 50.0  # -50 net drop + 100 refill credited


def test_consumption_accumulates_over_snapshots_and_never_decreases() -> None:
    derived = chain(
        snap(reading(30_000)),
        snap(reading(29_000), at=30),  # 1600
        snap(reading(29_600), at=60),  # rose by exactly the refill: 0
        snap(reading(29_000), at=90),  # 1200
    )
    state = derived.states[0]
    assert state.consumed_tokens == 1200.0
    assert state.consumed_tokens_total == 2800.0


def test_balance_rising_faster_than_refill_counts_zero_not_negative() -> None:
    assert gross_consumption(reading(100), reading(5000), 1.0) == 0.0


def test_negative_balances_are_kept_and_projection_is_zero() -> None:
    derived = chain(
        snap(reading(5, capacity=50, refill=10, period=60)),
        snap(reading(-15, capacity=50, refill=10, period=60), at=6),
    )
    state = derived.states[0]
    assert state.reading.available_tokens == -15
    assert state.remaining_ratio == -0.3
    assert state.utilization_percent == 130.0
    assert state.consumed_tokens == pytest.approx(21.0)  # 20 net + 1 refill (10/min over 6 s)
    assert state.recovery_eta_seconds == 390.0  # 65 missing at 1/6 token/s
    assert state.exhaustion_projection_seconds == 0.0


def test_projection_is_none_when_refill_outpaces_consumption() -> None:
    # 600 consumed over 30 s = 20/s, exactly the refill: not draining.
    state = chain(snap(reading(30_000)), snap(reading(30_000), at=30)).states[0]
    assert state.consumed_tokens == 600.0
    assert state.exhaustion_projection_seconds is None
    assert exhaustion_projection_seconds(reading(10), None) is None
    assert exhaustion_projection_seconds(reading(0), None) == 0.0


def test_response_time_that_does_not_advance_gives_no_division_and_no_negative_rate() -> None:
    first = chain(snap(reading(30_000)), snap(reading(29_000), at=30))
    repeated = derive(snap(reading(28_000), at=30), first)  # same ResponseTime, lower balance
    state = repeated.states[0]
    assert state.consumed_tokens is None
    assert state.consumed_tokens_total == 1600.0  # unchanged: no interval to measure over
    assert state.consumption_rate_per_minute == 3200.0  # the last measured rate is kept
    backwards = derive(snap(reading(30_000), at=10), first).states[0]
    assert backwards.consumed_tokens is None
    assert backwards.consumed_tokens_total == 1600.0
    fresh = derive(snap(reading(30_000), at=0), derive(snap(reading(30_000), at=0), None)).states[0]
    assert fresh.consumption_rate_per_minute is None
    assert fresh.exhaustion_projection_seconds is None


def test_category_change_is_flagged_and_new_limits_are_used() -> None:
    antiscan = "ENTRIES_READ_PARTICIPANT_ANTISCAN"
    before = snap(reading(50_000, 50_000, 25_000, 60, antiscan), category="A")
    after = snap(reading(250, 250, 25, 60, antiscan), at=60, category="G")
    derived = chain(before, after)
    assert derived.category_changed is True
    state = derived.states[0]
    assert state.remaining_ratio == 1.0
    assert state.consumed_tokens == 49_750.0  # the balance fell by 49750; the old bucket was full
    same = derive(snap(reading(250, 250, 25, 60, antiscan), at=120, category="G"), derived)
    assert same.category_changed is False
    assert derive(before, None).category_changed is False


def test_policy_appearing_starts_from_zero_and_disappearing_is_dropped() -> None:
    first = derive(snap(reading(100, name="OLD")), None)
    second = derive(snap(reading(200, 200, 60, 60, "EVENT_LIST"), at=30), first)
    assert [s.reading.name for s in second.states] == ["EVENT_LIST"]
    state = second.states[0]
    assert state.consumed_tokens is None
    assert state.consumed_tokens_total == 0.0
    third = derive(snap(reading(170, 200, 60, 60, "EVENT_LIST"), at=60), second)
    assert third.states[0].consumed_tokens == 30.0  # 30 net, refill 30 capped at the 0 missing


def test_bucket_without_refill_never_recovers_and_never_divides_by_zero() -> None:
    derived = chain(snap(reading(10, 50, 0, 60)), snap(reading(5, 50, 0, 60), at=10))
    state = derived.states[0]
    assert state.recovery_eta_seconds == math.inf
    assert state.consumed_tokens == 5.0
    assert state.exhaustion_projection_seconds == pytest.approx(10.0)  # 5 left at 0.5/s
    assert derive(snap(reading(50, 50, 0, 60)), None).states[0].recovery_eta_seconds == 0.0


def test_refill_expressed_per_second_or_per_minute_gives_the_same_values() -> None:
    per_minute = chain(
        snap(reading(30_000, refill=1200, period=60)), snap(reading(29_000, refill=1200, period=60), at=30)
    )
    per_second = chain(
        snap(reading(30_000, refill=20, period=1)), snap(reading(29_000, refill=20, period=1), at=30)
    )
    assert per_minute.states[0].consumed_tokens == per_second.states[0].consumed_tokens == 1600.0
    assert per_minute.states[0].recovery_eta_seconds == per_second.states[0].recovery_eta_seconds
