"""The simulator's bucket and engine: properties of one bucket (hypothesis), scenarios played on a manual
clock, determinism under the seed."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.simulator import policy_table as dp
from exporter.simulator import scenario as sc
from exporter.simulator.bucket import CONTINUOUS, PERIOD, SimBucket
from exporter.simulator.clock import ManualClock
from exporter.simulator.engine import BucketEngine
from exporter.simulator.scenario import builtin_scenario

capacities = st.integers(min_value=1, max_value=100_000)
periods = st.sampled_from([1, 60, 3600, 86400])
steps = st.floats(min_value=0.0, max_value=5_000.0, allow_nan=False)


def _bucket(capacity: int, refill: int, period: int, tokens: float, mode: str = CONTINUOUS) -> SimBucket:
    return SimBucket("P", capacity, refill, period, tokens, updated=0.0, epoch=0.0, mode=mode)


@settings(max_examples=150, deadline=None)
@given(
    capacity=capacities,
    refill=st.integers(min_value=0, max_value=50_000),
    period=periods,
    mode=st.sampled_from([CONTINUOUS, PERIOD]),
    ops=st.lists(
        st.tuples(steps, st.sampled_from(["admit", "admit404", "charge", "limits"]), st.integers(0, 60_000)),
        max_size=30,
    ),
)
def test_tokens_never_exceed_capacity(
    capacity: int, refill: int, period: int, mode: str, ops: list[tuple[float, str, int]]
) -> None:
    bucket = _bucket(capacity, refill, period, float(capacity), mode)
    now = 0.0
    for dt, op, amount in ops:
        now += dt
        bucket.refill_to(now)
        if op == "admit":
            bucket.admit(amount)
        elif op == "admit404":
            bucket.admit(amount, dp.NOT_FOUND_COST)
        elif op == "charge":
            bucket.charge(amount)
        else:
            bucket.set_limits(max(1, amount), refill, period)
        assert bucket.tokens <= bucket.capacity
        assert bucket.available <= bucket.capacity


@settings(max_examples=200, deadline=None)
@given(
    capacity=capacities,
    refill=st.integers(min_value=0, max_value=50_000),
    period=periods,
    start=st.floats(min_value=-300_000, max_value=100_000, allow_nan=False),
    cuts=st.lists(steps, min_size=1, max_size=10),
)
def test_refill_over_dt_never_adds_more_than_rate_times_dt(
    capacity: int, refill: int, period: int, start: float, cuts: list[float]
) -> None:
    tokens = min(start, float(capacity))
    bucket = _bucket(capacity, refill, period, tokens)
    elapsed = 0.0
    for dt in cuts:  # read at arbitrary moments: refill is path-independent
        elapsed += dt
        bucket.refill_to(elapsed)
    rate = refill / period
    assert bucket.tokens - tokens <= rate * elapsed + 1e-6 * max(1.0, rate * elapsed)
    assert bucket.tokens == pytest.approx(min(float(capacity), tokens + rate * elapsed), rel=1e-9, abs=1e-6)


@settings(max_examples=150, deadline=None)
@given(
    refill=st.integers(min_value=1, max_value=1_000),
    period=st.sampled_from([1, 60, 3600]),
    k=st.integers(min_value=1, max_value=20),
)
def test_period_refill_adds_whole_refills_never_more_than_one_per_period(
    refill: int, period: int, k: int
) -> None:
    bucket = _bucket(10**9, refill, period, 0.0, PERIOD)
    bucket.refill_to(k * period - 0.001)
    assert bucket.tokens == (k - 1) * refill
    bucket.refill_to(k * period)
    assert bucket.tokens == k * refill


@settings(max_examples=150, deadline=None)
@given(
    deficit=st.integers(min_value=1, max_value=10_000),
    refill=st.integers(min_value=1, max_value=2_400),
    seconds=st.floats(min_value=0.0, max_value=600.0, allow_nan=False),
)
def test_negative_balances_recover_at_the_refill_rate(deficit: int, refill: int, seconds: float) -> None:
    bucket = _bucket(50_000, refill, 60, float(-deficit))
    assert bucket.admit(1) == 0  # refused while negative: a 429 costs nothing
    bucket.refill_to(seconds)
    assert bucket.tokens == pytest.approx(-deficit + refill / 60 * seconds, abs=1e-6)


def test_a_404_costs_three_tokens_and_can_leave_a_negative_balance() -> None:
    bucket = _bucket(50, 2, 60, 2.0)
    assert bucket.admit(5, dp.NOT_FOUND_COST) == 1  # admitted at 2 tokens, charged 3
    assert bucket.tokens == -1.0
    assert bucket.available == -1
    assert bucket.admit(1) == 0


def test_admission_serves_whole_tokens_only() -> None:
    bucket = _bucket(100, 1, 1, 3.5)
    assert bucket.admit(10) == 3
    assert bucket.tokens == 0.5
    assert bucket.available == 0


# --- the engine, on a manual clock


def _ratio(engine: BucketEngine, policy: str) -> float:
    reading = engine.reading(policy)
    assert reading is not None
    return reading.available_tokens / reading.capacity


def test_default_scenario_crosses_warning_then_critical_then_recovers() -> None:
    clock = ManualClock(0.0)
    engine = BucketEngine(scenario=builtin_scenario("default"), clock=clock)
    series: dict[int, float] = {}
    for second in range(0, 601):
        series[second] = _ratio(engine, "ENTRIES_WRITE")
        clock.advance(1)
    first_warning = min(t for t, r in series.items() if r <= 0.20)
    first_critical = min(t for t, r in series.items() if r <= 0.10)
    critical_ends = min(t for t, r in series.items() if t > first_critical and r > 0.10)
    warning_ends = min(t for t, r in series.items() if t > critical_ends and r > 0.20)
    assert 55 <= first_warning <= 70
    assert 75 <= first_critical <= 90
    assert critical_ends - first_critical >= 60  # long enough for a short `for:` to fire
    assert warning_ends <= 420  # back above 20% in a few minutes of refill
    assert min(series.values()) > 0.05
    assert series[0] == 1.0


def test_quiet_scenario_never_crosses_a_threshold() -> None:
    clock = ManualClock(0.0)
    engine = BucketEngine(scenario=builtin_scenario("quiet"), clock=clock, seed=5)
    lowest = 1.0
    for _ in range(0, 900, 15):
        clock.advance(15)
        lowest = min(lowest, *(r.available_tokens / r.capacity for r in engine.readings()))
    assert lowest > 0.5
    rate = engine.error_404_rate(dp.ANTISCAN)
    assert rate is not None
    assert rate == pytest.approx(0.02, abs=0.005)
    assert engine.error_404_rate("ENTRIES_WRITE") is None


def _series(seed: int, scenario: sc.Scenario) -> list[tuple[int, ...]]:
    clock = ManualClock(0.0)
    engine = BucketEngine(scenario=scenario, clock=clock, seed=seed)
    out = []
    for step in range(60):
        clock.advance(7.5 if step % 2 else 2.5)  # uneven reads: the series must not depend on them
        out.append(tuple(r.available_tokens for r in engine.readings()))
    return out


def test_the_same_seed_gives_the_same_consumption_series() -> None:
    scenario = builtin_scenario("default")
    assert _series(42, scenario) == _series(42, scenario)
    assert _series(42, scenario) != _series(43, scenario)


def test_reads_do_not_change_the_history() -> None:
    scenario = builtin_scenario("default")
    often, rarely = ManualClock(0.0), ManualClock(0.0)
    a = BucketEngine(scenario=scenario, clock=often, seed=1)
    b = BucketEngine(scenario=scenario, clock=rarely, seed=1)
    for _ in range(300):
        often.advance(1)
        a.readings()
    rarely.advance(300)
    assert a.readings() == b.readings()


def test_events_replayed_late_act_at_their_own_time() -> None:
    text = """
traffic:
  ENTRIES_READ_PARTICIPANT_ANTISCAN: {rate: 30000, jitter: 0.1}
events:
  - {at: 50, category: D}
  - at: 60
    add_policy: {name: EVENT_LIST, capacity: 100, refill_tokens: 60, refill_period_sec: 60, available: 0}
  - {at: 70, traffic: {policy: EVENT_LIST, rate: 30}}
"""
    scenario = sc.parse_scenario(text, "late.yaml")
    often, once = ManualClock(0.0), ManualClock(0.0)
    a = BucketEngine(scenario=scenario, clock=often, seed=4)
    b = BucketEngine(scenario=scenario, clock=once, seed=4)
    for _ in range(200):
        often.advance(1)
        a.readings()
    once.advance(200)
    assert a.readings() == b.readings()
    added = b.reading("EVENT_LIST")
    assert added is not None
    assert added.available_tokens == 75  # 0 at 60 s, +1/s, then +1 - 0.5 per s from 70 s: 10 + 65


def _play(text: str, seconds: float, category: str = "A") -> BucketEngine:
    clock = ManualClock(0.0)
    engine = BucketEngine(scenario=sc.parse_scenario(text, "t.yaml"), clock=clock, category=category)
    clock.advance(seconds)
    engine.advance()
    return engine


def test_a_404_storm_drives_a_small_antiscan_bucket_negative() -> None:
    # Category H: 50 tokens, 2/min. 600 lookups/min, all 404 (3 tokens each).
    engine = _play("events: [{at: 0, storm_404: {rate: 600, for: 30}}]", 10, category="H")
    reading = engine.reading(dp.ANTISCAN)
    assert reading is not None
    assert reading.available_tokens < 0
    assert engine.error_404_rate(dp.ANTISCAN) == 1.0


def test_events_change_category_policies_latency_and_errors(caplog: pytest.LogCaptureFixture) -> None:
    text = """
events:
  - {at: 5, category: G}
  - {at: 6, add_policy: {name: EVENT_LIST, capacity: 100, refill_tokens: 10, refill_period_sec: 60}}
  - {at: 7, remove_policy: KEYS_CHECK}
  - {at: 8, latency: {seconds: 0.5, for: 10}}
  - {at: 9, error: {code: UNAVAILABLE, count: 2}}
  - {at: 10, burst: {policy: ENTRIES_UPDATE, requests: 700}}
"""
    with caplog.at_level(logging.INFO, logger="exporter.simulator.engine"):
        engine = _play(text, 10)
    assert engine.category == "G"
    antiscan = engine.reading(dp.ANTISCAN)
    assert antiscan is not None
    assert (antiscan.capacity, antiscan.available_tokens) == (250, 250)
    assert "EVENT_LIST" in engine.policy_names()
    assert "KEYS_CHECK" not in engine.policy_names()
    assert engine.latency() == 0.5
    assert [engine.next_error(), engine.next_error(), engine.next_error()] == [
        "UNAVAILABLE",
        "UNAVAILABLE",
        None,
    ]
    update = engine.reading("ENTRIES_UPDATE")
    assert update is not None
    assert update.available_tokens == 0  # 600 served, 100 refused
    events = [r for r in caplog.records if r.getMessage() == "scenario event"]
    assert len(events) == 6  # one log line per event


def test_latency_and_error_windows_end_on_time() -> None:
    text = "events: [{at: 1, latency: {seconds: 2, for: 5}}, {at: 1, error: {code: INTERNAL, by: 4}}]"
    engine = _play(text, 3)
    assert (engine.latency(), engine.next_error()) == (2.0, "INTERNAL")
    engine.clock.advance(2)  # type: ignore[attr-defined]
    assert (engine.latency(), engine.next_error()) == (2.0, None)  # t=5: the errors ended at 4
    engine.clock.advance(1)  # type: ignore[attr-defined]
    assert engine.latency() == 0.0  # t=6: 5 s after it began


def test_repeat_replays_the_events_every_cycle() -> None:
    text = """
repeat: 100
traffic: {ENTRIES_UPDATE: {rate: 0}}
events:
  - {at: 10, burst: {policy: CLAIMS_LIST_WITHOUT_ROLE, requests: 50}}
"""
    clock = ManualClock(0.0)
    engine = BucketEngine(scenario=sc.parse_scenario(text, "t.yaml"), clock=clock)
    clock.advance(10)
    assert engine.tokens("CLAIMS_LIST_WITHOUT_ROLE") == 0
    clock.advance(100)  # refilled (10/min for 100 s = 16.7), then emptied again at 110 s
    assert engine.tokens("CLAIMS_LIST_WITHOUT_ROLE") == pytest.approx(0.67, abs=0.01)


def test_drain_with_a_rate_for_a_duration_then_stops() -> None:
    engine = _play("events: [{at: 0, drain: {policy: CLAIMS_READ, rate: 1200, for: 60}}]", 60)
    # CLAIMS_READ: 18,000 tokens, 600/min refill; net -600/min for one minute.
    drained = engine.tokens("CLAIMS_READ")
    assert drained == pytest.approx(17_400, abs=11)
    engine.clock.advance(60)  # type: ignore[attr-defined]
    assert engine.tokens("CLAIMS_READ") == drained + 600  # the drain stopped: refill alone


def test_all_thirty_policies_for_every_category() -> None:
    for letter, (refill, capacity) in dp.CATEGORY_LIMITS.items():
        specs = {s.name: s for s in dp.policies_for(letter)}
        assert len(specs) == 30
        assert (specs[dp.ANTISCAN].refill_tokens, specs[dp.ANTISCAN].capacity) == (refill, capacity)
    assert dp.spec("CIDS_FILES_WRITE", "A") == dp.PolicySpec("CIDS_FILES_WRITE", 40, 86400, 200)
    assert dp.spec("EVENT_LIST", "A") is None
