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


def test_category_change_is_flagged_and_the_clamped_interval_is_not_consumption() -> None:
    # A -> H: capacity 50,000 -> 50 and refill 25,000/min -> 2/min; DICT clamps the balance to 50.
    antiscan = "ENTRIES_READ_PARTICIPANT_ANTISCAN"
    first = snap(reading(49_500, 50_000, 25_000, 60, antiscan), category="A")
    before = snap(reading(49_001, 50_000, 25_000, 60, antiscan), at=30, category="A")
    after = snap(reading(50, 50, 2, 60, antiscan), at=60, category="H")
    derived = chain(first, before, after)
    assert derived.category_changed is True
    state = derived.states[0]
    assert state.remaining_ratio == 1.0
    # The old formula said 49,001 - 50 + min(12,500, 999) = 49,950 consumed and an exhaustion in 0.03 s.
    assert state.limits_changed is True
    assert state.consumed_tokens is None
    assert state.consumed_tokens_total == 999.0  # only the A interval: 499 net + 500 refill (499 missing cap)
    assert state.consumption_rate_per_minute is None
    assert state.exhaustion_projection_seconds is None
    # The next interval starts clean from the clamped balance, with H's limits:
    # 10 net + min(2/60 * 30 = 1, 0 missing) = 10 tokens over 30 s.
    following = derive(snap(reading(40, 50, 2, 60, antiscan), at=90, category="H"), derived)
    assert following.category_changed is False
    state = following.states[0]
    assert state.limits_changed is False
    assert state.consumed_tokens == 10.0
    assert state.consumed_tokens_total == 1009.0
    assert state.consumption_rate_per_minute == pytest.approx(20.0)
    # drain 10/30 - 2/60 = 0.3 tokens/s: 40 left last 133.3 s
    assert state.exhaustion_projection_seconds == pytest.approx(40 / 0.3)
    assert derive(first, None).category_changed is False


def test_any_capacity_or_refill_change_alone_is_not_consumption() -> None:
    # Same category, new API version: ENTRIES_WRITE capacity 36,000 -> 30,000, balance clamped.
    derived = chain(snap(reading(35_000)), snap(reading(30_000, capacity=30_000), at=30))
    state = derived.states[0]
    assert (state.limits_changed, state.consumed_tokens, state.consumed_tokens_total) == (True, None, 0.0)
    refill = chain(snap(reading(30_000)), snap(reading(30_000, refill=600), at=30)).states[0]
    assert refill.limits_changed is True
    assert refill.consumed_tokens is None
    # (1200, 60) -> (20, 1) is the same rate written differently, yet other numbers: also restarted.
    rewritten = chain(snap(reading(30_000)), snap(reading(29_000, refill=20, period=1), at=30)).states[0]
    assert rewritten.consumed_tokens is None


def test_step_refill_light_traffic_is_not_over_reported() -> None:
    # 1200 tokens arrive at once at t = 15, 75, ...; 5 tokens/s consumed; polls every 30 s.
    #   t=0 20000 | t=30 20000-150+1200 = 21050 | t=60 20900 | t=90 21950 | t=120 21800
    # Interval estimates (net drop + 600 credited): -450, +750, -450, +750. The old per-interval clamp at
    # 0 counted 0 + 750 + 0 + 750 = 1500; the true consumption is 4 x 150 = 600.
    balances = (20_000, 21_050, 20_900, 21_950, 21_800)
    derived = None
    states = []
    for i, balance in enumerate(balances):
        derived = derive(snap(reading(balance), at=30.0 * i), derived)
        states.append(derived.states[0])
    assert [s.consumed_tokens_total for s in states] == [0.0, 0.0, 300.0, 300.0, 600.0]
    assert [s.consumed_tokens for s in states] == [None, 0.0, 300.0, 0.0, 300.0]
    assert [s.signed_total for s in states] == [0.0, -450.0, 300.0, -150.0, 600.0]
    # Rates over a whole refill period (60 s back): 5 tokens/s = 300/min once a period is covered.
    assert states[2].consumption_rate_per_minute == pytest.approx(300.0)
    assert states[3].consumption_rate_per_minute == pytest.approx(300.0)
    assert states[4].consumption_rate_per_minute == pytest.approx(300.0)
    assert all(s.exhaustion_projection_seconds is None for s in states)  # 5/s < 20/s refill: never


def test_step_refill_draining_bucket_projection_does_not_flap() -> None:
    # 25 tokens/s consumed (750 per 30 s), 1200 at once at t = 15, 75, ...:
    #   t=0 20000 | t=30 20450 | t=60 19700 | t=90 20150 | t=120 19400
    # Per interval the estimate alternates 150 and 1350 (rates 5/s and 45/s around the 20/s refill), so a
    # projection per interval alternates "never" and 19700 / 25 = 788 s.
    balances = (20_000, 20_450, 19_700, 20_150, 19_400)
    derived = None
    states = []
    for i, balance in enumerate(balances):
        derived = derive(snap(reading(balance), at=30.0 * i), derived)
        states.append(derived.states[0])
    assert states[-1].consumed_tokens_total == 3000.0  # 4 x 750, exact
    # Over 60 s (one period, one step): 25 tokens/s, net drain 5/s.
    assert [s.consumption_rate_per_minute for s in states[2:]] == pytest.approx([1500.0] * 3)
    assert [s.exhaustion_projection_seconds for s in states[2:]] == pytest.approx(
        [19_700 / 5, 20_150 / 5, 19_400 / 5]
    )


def test_tokens_given_back_never_make_consumption_negative_and_the_deficit_is_bounded() -> None:
    # Capacity 50, refill 10/min (one step = 10 tokens). Payment orders give 20 tokens back in 6 s:
    # estimate -20 + 1 = -19, carried only down to one step (-10) below the counter.
    seq = [(20, 0), (40, 6), (38, 12), (30, 18)]
    derived = None
    states = []
    for balance, at in seq:
        derived = derive(snap(reading(balance, 50, 10, 60), at=at), derived)
        states.append(derived.states[0])
    assert [s.signed_total for s in states] == pytest.approx([0.0, -10.0, -7.0, 2.0])
    assert [s.consumed_tokens_total for s in states] == pytest.approx([0.0, 0.0, 0.0, 2.0])
    assert all(s.consumed_tokens is None or s.consumed_tokens >= 0 for s in states)


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
