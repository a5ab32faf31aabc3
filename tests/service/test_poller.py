"""The poller alone: aligned schedule, DICT budget, outcomes and staleness, on a clock the test drives."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from exporter.bridge.budget import CallBudget
from exporter.bridge.client import (
    BridgeBudgetError,
    BridgeConfigError,
    BridgeMalformedError,
    BridgeResult,
    BridgeTransientError,
    Rejection,
)
from exporter.service.poller import Poller, next_poll_at
from exporter.service.selfmetrics import SelfMetrics
from exporter.snapshot import PolicyReading, Snapshot


class FakeClock:
    """Wall and monotonic time that move only when the poller sleeps (or the test says so)."""

    def __init__(self, start: float) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


class ScriptedBridge:
    """Answers each poll with the next scripted outcome: a category letter (success) or an exception."""

    def __init__(self, clock: FakeClock, *outcomes: str | Exception) -> None:
        self.clock = clock
        self.outcomes = list(outcomes)
        self.calls: list[float] = []

    async def __call__(self, deadline: float | None) -> BridgeResult:
        self.calls.append(self.clock.now)
        outcome = self.outcomes.pop(0) if self.outcomes else "A"
        if isinstance(outcome, Exception):
            raise outcome
        at = datetime.fromtimestamp(self.clock.now, UTC)
        policies = (PolicyReading("ENTRIES_WRITE", 30_000, 36_000, 1200, 60),)
        snapshot = Snapshot(at, f"{len(self.calls):032x}", outcome, policies)
        return BridgeResult(snapshot, (Rejection("", "missing_field"),) if len(self.calls) == 1 else ())


def make(clock: FakeClock, bridge: ScriptedBridge, stale_after: int = 3) -> tuple[Poller, SelfMetrics]:
    metrics = SelfMetrics(30.0)
    poller = Poller(bridge, metrics, interval=30.0, lead=2.0, stale_after=stale_after, clock=clock)
    return poller, metrics


def test_next_poll_is_lead_seconds_before_each_multiple_of_the_interval() -> None:
    assert next_poll_at(100.0, 30.0, 2.0) == 118.0
    assert next_poll_at(117.9, 30.0, 2.0) == 118.0
    assert next_poll_at(118.0, 30.0, 2.0) == 148.0
    assert next_poll_at(100.0, 30.0, 0.0) == 120.0
    assert next_poll_at(10.5, 1.0, 0.25) == 10.75


async def test_first_poll_runs_at_once_then_on_aligned_boundaries() -> None:
    clock = FakeClock(1000.0)
    bridge = ScriptedBridge(clock)
    poller, _ = make(clock, bridge)
    poller.start()
    for _ in range(1000):  # the fake clock never waits: a few loop turns per poll
        if len(bridge.calls) >= 4:
            break
        await asyncio.sleep(0)
    await poller.stop(1.0)
    assert bridge.calls == [1000.0, 1018.0, 1048.0, 1078.0]


async def test_outcomes_are_counted_and_failures_keep_the_last_snapshot() -> None:
    clock = FakeClock(1000.0)
    bridge = ScriptedBridge(
        clock,
        "A",
        BridgeTransientError("down", code="UNAVAILABLE"),
        BridgeMalformedError("bad category", reason="unknown_category"),
        BridgeConfigError("denied", code="PERMISSION_DENIED"),
        "G",
    )
    poller, metrics = make(clock, bridge)
    r = metrics.registry
    assert await poller.poll_once() is True
    assert r.get_sample_value("dict_rate_limit_bridge_up") == 1
    assert r.get_sample_value("dict_rate_limit_invalid_policies_total", {"reason": "missing_field"}) == 1
    for _ in range(3):
        assert await poller.poll_once() is False
    assert r.get_sample_value("dict_rate_limit_bridge_up") == 0
    assert r.get_sample_value("dict_rate_limit_polls_total", {"result": "failure"}) == 3
    assert r.get_sample_value("dict_rate_limit_invalid_policies_total", {"reason": "unknown_category"}) == 1
    assert poller.latest is not None
    assert poller.latest.snapshot.category == "A"
    assert poller.last_error is not None
    assert "CONFIGURATION ERROR" in poller.last_error
    assert await poller.poll_once() is True
    assert r.get_sample_value("dict_rate_limit_polls_total", {"result": "success"}) == 2
    assert r.get_sample_value("dict_rate_limit_category_changes_total") == 1
    assert r.get_sample_value("dict_rate_limit_last_success_timestamp_seconds") == 1000.0
    assert r.get_sample_value("dict_rate_limit_poll_duration_seconds_count") == 5


async def test_data_is_stale_after_the_configured_number_of_intervals() -> None:
    clock = FakeClock(1000.0)
    poller, _ = make(clock, ScriptedBridge(clock), stale_after=3)
    assert poller.is_stale() is False  # nothing to withdraw before the first success
    await poller.poll_once()
    clock.now += 90.0
    assert (poller.is_stale(), poller.is_fresh()) == (False, True)
    clock.now += 0.01
    assert (poller.is_stale(), poller.is_fresh()) == (True, False)
    await poller.poll_once()
    assert poller.is_stale() is False
    assert poller.latest is not None
    assert poller.latest.snapshot.response_time == datetime.fromtimestamp(1000.0, UTC) + timedelta(
        seconds=90.01
    )


async def test_stop_waits_for_the_in_flight_poll_within_the_bound() -> None:
    release = asyncio.Event()
    clock = FakeClock(0.0)

    async def slow(deadline: float | None) -> BridgeResult:
        await release.wait()
        return await ScriptedBridge(clock)(deadline)

    poller = Poller(slow, SelfMetrics(30.0), interval=30.0, lead=2.0, stale_after=3, clock=clock)
    poller.start()
    await asyncio.sleep(0.01)
    asyncio.get_running_loop().call_later(0.05, release.set)
    await poller.stop(2.0)
    assert poller.attempted == 1
    assert poller.latest is not None
    poller2 = Poller(
        lambda _d: asyncio.sleep(60), SelfMetrics(30.0), interval=30.0, lead=2.0, stale_after=3, clock=clock
    )  # type: ignore[arg-type]
    poller2.start()
    await asyncio.sleep(0.01)
    started = asyncio.get_running_loop().time()
    await poller2.stop(0.1)
    assert asyncio.get_running_loop().time() - started < 1.0
    assert poller2.latest is None


async def test_a_bug_after_a_poll_ends_the_loop_visibly() -> None:
    clock = FakeClock(0.0)

    async def broken(_derived: object) -> None:
        raise ValueError("render bug")

    poller = Poller(
        ScriptedBridge(clock),
        SelfMetrics(30.0),
        interval=30.0,
        lead=2.0,
        stale_after=3,
        on_snapshot=broken,
        clock=clock,
    )
    assert poller.failed is None
    poller.start()
    for _ in range(100):
        if poller.failed is not None:
            break
        await asyncio.sleep(0)
    assert isinstance(poller.failed, ValueError)
    await poller.stop(0.1)


# --- answers that cannot be served, policies that go missing, the call ceiling (issues 12 and 17)


class AnswerBridge:
    """Answers each poll with the next scripted BridgeResult builder (given the clock), or raises."""

    def __init__(self, clock: FakeClock, *outcomes: Callable[[float], BridgeResult] | Exception) -> None:
        self.clock = clock
        self.outcomes = list(outcomes)
        self.calls: list[float] = []

    async def __call__(self, deadline: float | None) -> BridgeResult:
        self.calls.append(self.clock.now)
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome(self.clock.now)


def answer(
    *names: str, category: str = "A", at: float | None = None, rejected: tuple[Rejection, ...] = ()
) -> Callable[[float], BridgeResult]:
    def build(now: float) -> BridgeResult:
        policies = tuple(PolicyReading(name, 30_000, 36_000, 1200, 60) for name in names)
        when = datetime.fromtimestamp(now if at is None else at, UTC)
        return BridgeResult(Snapshot(when, "c" * 32, category, policies), rejected)

    return build


def reasons(metrics: SelfMetrics, reason: str) -> float | None:
    return metrics.registry.get_sample_value("dict_rate_limit_invalid_policies_total", {"reason": reason})


async def test_an_answer_without_any_usable_policy_is_a_failed_poll() -> None:
    clock = FakeClock(1000.0)
    every_invalid = answer(rejected=(Rejection("ENTRIES_WRITE", "capacity_not_positive"),))
    bridge = AnswerBridge(clock, answer("ENTRIES_WRITE"), answer(), every_invalid)
    poller, metrics = make(clock, bridge)  # type: ignore[arg-type]
    assert await poller.poll_once() is True
    assert await poller.poll_once() is False  # empty list
    assert metrics.registry.get_sample_value("dict_rate_limit_bridge_up") == 0
    assert poller.last_error is not None
    assert "no usable policy (empty list)" in poller.last_error
    assert await poller.poll_once() is False  # every policy invalid
    assert "no usable policy (1 left out: capacity_not_positive)" in poller.last_error
    assert reasons(metrics, "no_usable_policy") == 2
    assert reasons(metrics, "capacity_not_positive") == 1
    assert poller.latest is not None
    assert [s.reading.name for s in poller.latest.states] == ["ENTRIES_WRITE"]  # the last good one served


async def test_implausible_response_times_are_rejected_and_the_next_good_one_goes_through() -> None:
    clock = FakeClock(1000.0)
    far_future = datetime(9999, 12, 31, tzinfo=UTC).timestamp()
    bridge = AnswerBridge(
        clock,
        answer("ENTRIES_WRITE"),
        answer("ENTRIES_WRITE", at=far_future),
        answer("ENTRIES_WRITE", at=1000.0 - 301),  # past the 300 s skew bound
        answer("ENTRIES_WRITE", at=990.0),  # within the bound, but before the previous snapshot
        answer("ENTRIES_WRITE", at=1000.0 + 299),  # within the bound, after the previous one
    )
    poller, metrics = make(clock, bridge)  # type: ignore[arg-type]
    assert [await poller.poll_once() for _ in range(5)] == [True, False, False, False, True]
    assert reasons(metrics, "implausible_response_time") == 2
    assert reasons(metrics, "response_time_backwards") == 1
    assert poller.latest is not None
    assert poller.latest.snapshot.response_time.timestamp() == 1299.0


async def test_an_unusable_category_keeps_the_previous_letter_or_fails_the_first_poll() -> None:
    clock = FakeClock(1000.0)
    bad = (Rejection("", "unknown_category"),)
    bridge = AnswerBridge(
        clock, answer("ENTRIES_WRITE", category="", rejected=bad), answer("ENTRIES_WRITE", category="G"),
        answer("ENTRIES_WRITE", category="", rejected=bad),
    )  # fmt: skip
    poller, metrics = make(clock, bridge)  # type: ignore[arg-type]
    assert await poller.poll_once() is False
    assert reasons(metrics, "no_usable_category") == 1
    assert await poller.poll_once() is True
    clock.now += 30
    assert await poller.poll_once() is True
    assert poller.latest is not None
    assert poller.latest.snapshot.category == "G"
    assert poller.latest.category_changed is False
    assert [s.reading.name for s in poller.latest.states] == ["ENTRIES_WRITE"]
    assert reasons(metrics, "unknown_category") == 2


async def test_a_policy_seen_before_and_now_absent_is_missing_until_it_returns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock(1000.0)
    bridge = AnswerBridge(
        clock,
        answer("ENTRIES_WRITE", "KEYS_CHECK"),
        answer("ENTRIES_WRITE"),
        BridgeTransientError("down", code="UNAVAILABLE"),
        answer("ENTRIES_WRITE"),
        answer("ENTRIES_WRITE", "KEYS_CHECK"),
    )
    metrics = SelfMetrics(30.0)
    poller = Poller(
        bridge, metrics, interval=30.0, lead=2.0, stale_after=3, clock=clock,  # type: ignore[arg-type]
        known_policies={"STATISTICS_READ"},  # remembered by history from before a restart
    )  # fmt: skip
    missing = []
    for _ in range(5):
        await poller.poll_once()
        clock.now += 30
        assert poller.latest is not None
        missing.append(poller.latest.missing)
    assert missing == [
        ("STATISTICS_READ",),
        ("KEYS_CHECK", "STATISTICS_READ"),
        ("KEYS_CHECK", "STATISTICS_READ"),  # a failed poll changes nothing
        ("KEYS_CHECK", "STATISTICS_READ"),
        ("STATISTICS_READ",),
    ]
    warnings = [r.getMessage() for r in caplog.records if "missing from the Bridge" in r.getMessage()]
    assert warnings == [
        "policy STATISTICS_READ, seen before, is missing from the Bridge's answer",
        "policy KEYS_CHECK, seen before, is missing from the Bridge's answer",
    ]


async def test_a_threshold_naming_a_policy_the_bridge_does_not_return_is_reported_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock(1000.0)
    bridge = AnswerBridge(clock, *(answer("ENTRIES_WRITE", "KEYS_CHECK") for _ in range(3)))
    metrics = SelfMetrics(30.0)
    poller = Poller(
        bridge, metrics, interval=30.0, lead=2.0, stale_after=3, clock=clock,  # type: ignore[arg-type]
        thresholds={"KEYS_READ", "KEYS_CHECK"},
    )  # fmt: skip
    assert (
        metrics.registry.get_sample_value(
            "dict_rate_limit_threshold_policy_unmatched", {"endpoint_id": "KEYS_READ"}
        )
        is None
    )
    for _ in range(3):
        await poller.poll_once()
        clock.now += 30
    r = metrics.registry
    assert r.get_sample_value("dict_rate_limit_threshold_policy_unmatched", {"endpoint_id": "KEYS_READ"}) == 1
    assert (
        r.get_sample_value("dict_rate_limit_threshold_policy_unmatched", {"endpoint_id": "KEYS_CHECK"})
        is None
    )
    warnings = [r.getMessage() for r in caplog.records if "POLICY_THRESHOLDS names" in r.getMessage()]
    assert len(warnings) == 1
    assert "KEYS_READ" in warnings[0]


async def test_no_failure_mode_spends_more_than_the_ceiling_in_any_minute() -> None:
    """Every call fails; the fetch spends from the budget as the Bridge client does for each attempt
    (first call and retries alike). Over 10 simulated minutes no 60 s window holds more than 2 calls."""
    clock = FakeClock(1000.0)
    budget = CallBudget(2, clock=clock.monotonic)
    calls: list[float] = []

    async def failing(deadline: float | None) -> BridgeResult:
        for _attempt in range(5):  # a client that would retry 5 times if the budget let it
            if not budget.acquire():
                raise BridgeBudgetError("spent")
            calls.append(clock.now)
            clock.now += 0.5
        raise BridgeTransientError("down", code="UNAVAILABLE")

    metrics = SelfMetrics(30.0)
    poller = Poller(failing, metrics, interval=30.0, lead=2.0, stale_after=3, clock=clock, budget=budget)
    poller.start()
    for _ in range(20_000):
        if clock.now > 1600:
            break
        await asyncio.sleep(0)
    await poller.stop(1.0)
    assert len(calls) >= 19  # about 2 per minute for 10 minutes: the ceiling is used, not starved
    for start in calls:
        assert sum(1 for t in calls if start <= t < start + 60) <= 2
    assert metrics.registry.get_sample_value("dict_rate_limit_polls_total", {"result": "skipped"}) >= 1


async def test_a_retry_after_passed_by_the_bridge_defers_the_next_calls() -> None:
    clock = FakeClock(1000.0)
    bridge = AnswerBridge(
        clock, BridgeTransientError("maintenance", code="UNAVAILABLE", retry_after=100.0),
        *(answer("ENTRIES_WRITE") for _ in range(10)),
    )  # fmt: skip
    poller, metrics = make(clock, bridge)  # type: ignore[arg-type]
    poller.start()
    for _ in range(5000):
        if len(bridge.calls) >= 3:
            break
        await asyncio.sleep(0)
    await poller.stop(1.0)
    # 1000 failed with Retry-After 100 s: 1018, 1048, 1078 are skipped; 1108 is the first call after.
    assert bridge.calls[:3] == [1000.0, 1108.0, 1138.0]
    assert metrics.registry.get_sample_value("dict_rate_limit_polls_total", {"result": "skipped"}) == 3


async def test_a_healthy_run_at_the_ceiling_skips_only_the_poll_right_after_start_up() -> None:
    """2 calls/min at 30 s exactly fills the ceiling; each call is made a little after its boundary (here
    5 ms), so the boundary two polls later comes just before that call leaves the window: it must wait
    those milliseconds, not skip the poll."""
    clock = FakeClock(1000.0)
    budget = CallBudget(2, clock=clock.monotonic)
    calls: list[float] = []

    async def fetch(deadline: float | None) -> BridgeResult:
        clock.now += 0.005  # scheduling and channel set-up before the call leaves
        if not budget.acquire():
            raise BridgeBudgetError("spent")
        calls.append(clock.now)
        return answer("ENTRIES_WRITE")(clock.now)

    metrics = SelfMetrics(30.0)
    poller = Poller(fetch, metrics, interval=30.0, lead=2.0, stale_after=3, clock=clock, budget=budget)
    poller.start()
    for _ in range(20_000):
        if clock.now > 1600:
            break
        await asyncio.sleep(0)
    await poller.stop(1.0)
    r = metrics.registry
    assert (
        r.get_sample_value("dict_rate_limit_polls_total", {"result": "skipped"}) == 1
    )  # 1048: 1000 is too near
    assert r.get_sample_value("dict_rate_limit_polls_total", {"result": "failure"}) == 0
    assert len(calls) >= 19
    assert all(b - a >= 30 for a, b in itertools.pairwise(calls[1:]))
    for start in calls:
        assert sum(1 for t in calls if start <= t < start + 60) <= 2


async def test_the_poll_tells_the_bridge_how_long_it_may_take_never_a_real_clock_reading() -> None:
    # The poller's time is its injected clock; a time.monotonic() reading would leak the real clock in.
    clock = FakeClock(1_000_000.0)
    seen: list[float | None] = []
    bridge = ScriptedBridge(clock)

    async def fetch(seconds: float | None) -> BridgeResult:
        seen.append(seconds)
        return await bridge(seconds)

    poller = Poller(fetch, SelfMetrics(30.0), interval=30.0, lead=2.0, stale_after=3, clock=clock)
    assert await poller.poll_once()
    assert seen == [24.0]  # 80 % of the interval, retries included
