"""The poller alone: aligned schedule, DICT budget, outcomes and staleness, on a clock the test drives."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

import pytest

from exporter.bridge.client import (
    BridgeConfigError,
    BridgeMalformedError,
    BridgeResult,
    BridgeTransientError,
    Rejection,
)
from exporter.config import ConfigError
from exporter.service.poller import Poller, check_budget, next_poll_at
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


def test_budget_allows_two_calls_per_minute_and_refuses_more() -> None:
    assert check_budget(30.0, override=False) == 2.0
    assert check_budget(60.0, override=False) == 1.0
    with pytest.raises(ConfigError) as refused:
        check_budget(10.0, override=False)
    assert refused.value.key == "POLL_INTERVAL_SECONDS"
    assert "POLICIES_LIST" in refused.value.reason
    assert "refill 6/min, capacity 20" in refused.value.reason
    assert "POLL_BUDGET_OVERRIDE" in refused.value.reason


def test_override_above_dict_refill_warns_loudly(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="exporter.service.poller"):
        assert check_budget(1.0, override=True) == 60.0
    assert "only for simulators and benchmarks" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="exporter.service.poller"):
        check_budget(15.0, override=True)  # 4/min: above the safe budget, below DICT's refill
    assert "above the safe 2/min budget" in caplog.text
    assert "only for simulators" not in caplog.text


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
