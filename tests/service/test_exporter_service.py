"""The exporter in-process against the Bridge simulator over real gRPC, scraped over real HTTP."""

from __future__ import annotations

import asyncio
import gzip
import itertools
import math
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devstack.embedded import free_port
from exporter.bridge.budget import CallBudget
from exporter.config import ExporterSettings, PolicyThreshold
from exporter.service.app import ExporterService
from exporter.simulator.clock import ManualClock
from exporter.simulator.scenario import resolve_scenario
from exporter.simulator.server import SimulatorServer
from tests.support.env import require_binary

SLOW = "CLAIMS_LIST_WITHOUT_ROLE"  # refills 10/min: a balance set by the test stays put for a while


def settings_for(address: str, **overrides: Any) -> ExporterSettings:
    values: dict[str, Any] = {
        "bridge_address": address,
        "listen_host": "127.0.0.1",
        "metrics_port": free_port(),
        "health_check_port": free_port(),
        "poll_interval_seconds": 1.0,
        "poll_lead_seconds": 0.25,
        "poll_budget_override": True,
        "stale_after_intervals": 2,
        "bridge_timeout_seconds": 0.5,
    }
    values.update(overrides)
    return ExporterSettings(**values)


@pytest.fixture
async def sim() -> AsyncIterator[SimulatorServer]:
    server = SimulatorServer(category="A", seed=1)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


class Running:
    """A started service plus helpers to read its endpoints."""

    def __init__(self, service: ExporterService, http: aiohttp.ClientSession) -> None:
        self.service = service
        self.http = http
        self.base = f"http://127.0.0.1:{service.ports['metrics']}"
        self.health = f"http://127.0.0.1:{service.ports['health']}"

    async def text(self) -> str:
        async with self.http.get(self.base + "/metrics") as response:
            assert response.status == 200
            return await response.text()

    async def samples(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        result = {}
        for family in text_string_to_metric_families(await self.text()):
            for sample in family.samples:
                result[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return result

    async def value(self, name: str, **labels: str) -> float | None:
        return (await self.samples()).get((name, frozenset(labels.items())))

    async def status(self, path: str) -> tuple[int, Any]:
        base = self.health if path.startswith("/health") else self.base
        async with self.http.get(base + path) as response:
            return response.status, await response.json()

    async def until(self, check: Callable[[], Any], within: float = 8.0) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if await check():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"condition not met within {within} s")


@pytest.fixture
async def start(http: aiohttp.ClientSession) -> AsyncIterator[Callable[[ExporterSettings], Any]]:
    services: list[ExporterService] = []

    async def starter(settings: ExporterSettings) -> Running:
        service = ExporterService(settings)
        await service.start()
        services.append(service)
        return Running(service, http)

    yield starter
    for service in services:
        await service.stop()


async def test_polls_arrive_just_before_each_interval_boundary(sim: SimulatorServer, start: Any) -> None:
    arrivals: list[float] = []
    original = sim.engine.correlation_id

    def spy() -> str:
        arrivals.append(time.time())
        return original()

    sim.engine.correlation_id = spy  # type: ignore[method-assign]
    started = time.time()
    running = await start(settings_for(sim.address, poll_interval_seconds=1.0, poll_lead_seconds=0.3))
    await running.until(lambda: asyncio.sleep(0, len(arrivals) >= 4))
    assert arrivals[0] - started < 0.5  # the first poll runs at start-up, not at a boundary
    for arrival in arrivals[1:4]:
        # Due at k - 0.3; measured on the simulator's side of a real gRPC call. Unaligned polls would
        # land in this quarter of the interval by chance 1.6% of the time for all three.
        phase = (arrival + 0.3) % 1.0
        assert phase < 0.25, f"list call {phase:.3f} s after its aligned time"
    gaps = [b - a for a, b in itertools.pairwise(arrivals[1:4])]
    assert all(0.75 < gap < 1.25 for gap in gaps), gaps


async def test_fifty_concurrent_scrapes_make_no_bridge_call(sim: SimulatorServer, start: Any) -> None:
    running = await start(settings_for(sim.address, poll_interval_seconds=30.0, poll_budget_override=False))
    await running.until(lambda: asyncio.sleep(0, running.service.poller.attempted >= 1))
    before = sim.list_calls
    assert before == 1

    async def scrape(path: str) -> int:
        async with running.http.get(running.base + path) as response:
            body = await response.read()
            assert b"ENTRIES_WRITE" in body
            return response.status

    statuses = await asyncio.gather(*(scrape("/metrics" if i % 5 else "/api/v1/policies") for i in range(50)))
    assert statuses == [200] * 50
    assert sim.list_calls == before


async def test_bridge_outage_withdraws_series_then_recovers(sim: SimulatorServer, start: Any) -> None:
    port = int(sim.address.rpartition(":")[2])
    running = await start(settings_for(sim.address, stale_after_intervals=2))
    await running.until(lambda: running.value("dict_rate_limit_bridge_up"))
    write = {"endpoint_id": "ENTRIES_WRITE", "psp_category": "A"}
    assert await running.value("dict_rate_limit_available_tokens", **write) is not None
    assert (await running.status("/health/ready"))[0] == 200
    await sim.stop()
    await running.until(lambda: _equals(running.value("dict_rate_limit_bridge_up"), 0.0))
    # After two intervals without success the bucket series go, the health series stay.
    await running.until(lambda: _equals(running.value("dict_rate_limit_stale"), 1.0))
    samples = await running.samples()
    assert not any(name.startswith("dict_rate_limit_available_tokens") for name, _ in samples)
    assert not any(name == "dict_rate_limit_psp_category_info" for name, _ in samples)
    assert samples[("dict_rate_limit_bridge_up", frozenset())] == 0.0
    assert samples[("dict_rate_limit_bridge_requests_total", frozenset({("code", "UNAVAILABLE")}))] >= 1
    assert samples[("dict_rate_limit_polls_total", frozenset({("result", "failure")}))] >= 1
    status, body = await running.status("/health/ready")
    assert status == 503
    assert body["status"] == "unavailable"
    assert "withdrawn" in body["checks"]["bridge"]
    assert (await running.status("/health/live"))[0] == 200
    revived = SimulatorServer(category="A", seed=2, listen=f"127.0.0.1:{port}")
    await revived.start()
    try:
        await running.until(lambda: _equals(running.value("dict_rate_limit_stale"), 0.0))
        assert await running.value("dict_rate_limit_bridge_up") == 1.0
        assert await running.value("dict_rate_limit_available_tokens", **write) is not None
        assert (await running.status("/health/ready"))[0] == 200
    finally:
        await running.service.stop()
        await revived.stop()


async def _equals(value: Any, expected: float) -> bool:
    return bool(await value == expected)


async def test_category_change_and_negative_balance_are_exported(sim: SimulatorServer, start: Any) -> None:
    sim.engine.set_tokens(SLOW, -15)
    running = await start(settings_for(sim.address))
    await running.until(lambda: running.value("dict_rate_limit_psp_category_info", psp_category="A"))
    slow = {"endpoint_id": SLOW, "psp_category": "A"}
    balance = await running.value("dict_rate_limit_available_tokens", **slow)
    assert balance is not None
    assert -15 <= balance <= -14  # refill of 10/min over the seconds since the test set it
    assert await running.value("dict_rate_limit_exhaustion_projection_seconds", **slow) == 0.0
    assert await running.value("dict_rate_limit_category_changes_total") == 0.0
    sim.engine.set_category("G")
    await running.until(lambda: running.value("dict_rate_limit_psp_category_info", psp_category="G"))
    samples = await running.samples()
    assert ("dict_rate_limit_psp_category_info", frozenset({("psp_category", "A")})) not in samples
    assert samples[("dict_rate_limit_category_changes_total", frozenset())] == 1.0
    antiscan = frozenset({("endpoint_id", "ENTRIES_READ_PARTICIPANT_ANTISCAN"), ("psp_category", "G")})
    assert samples[("dict_rate_limit_capacity", antiscan)] == 250.0


async def test_live_exposition_passes_promtool_and_gzip_matches(sim: SimulatorServer, start: Any) -> None:
    promtool = require_binary("promtool")
    running = await start(settings_for(sim.address))
    await running.until(lambda: _at_least(running, 2))  # two polls: rates and projections exist
    await running.service.poller.stop(1.0)  # hold the data still for the comparison below
    text = await running.text()
    assert "dict_rate_limit_consumption_rate_per_minute{" in text
    result = await asyncio.to_thread(
        subprocess.run,
        [promtool, "check", "metrics"],
        input=text.encode(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert (result.returncode, result.stdout.decode(), result.stderr.decode()) == (0, "", "")
    headers = {"Accept-Encoding": "gzip"}
    async with running.http.get(
        running.base + "/metrics", headers=headers, auto_decompress=False
    ) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert gzip.decompress(await response.read()).decode() == await running.text()


async def _at_least(running: Running, polls: float) -> bool:
    return (await running.value("dict_rate_limit_polls_total", result="success") or 0) >= polls


async def test_endpoints_before_and_after_the_first_poll(sim: SimulatorServer, start: Any) -> None:
    sim.engine.inject_latency(1.0)
    sim.engine.add_policy("EVENT_LIST", 50, 0, 60, available=10)  # unknown name, no refill
    running = await start(settings_for(sim.address, poll_interval_seconds=30.0, bridge_timeout_seconds=5.0))
    status, body = await running.status("/api/v1/policies")
    assert (status, body["status"]) == (503, "unavailable")
    assert (await running.status("/health/startup"))[0] == 503
    assert (await running.status("/health/live"))[0] == 200
    assert "dict_rate_limit_available_tokens{" not in await running.text()
    await running.until(lambda: asyncio.sleep(0, running.service.poller.attempted >= 1))
    status, body = await running.status("/api/v1/policies")
    assert status == 200
    assert len(body["correlation_id"]) == 32
    assert body["category"] == "A"
    assert body["stale"] is False
    write = next(p for p in body["policies"] if p["name"] == "ENTRIES_WRITE")
    assert write["capacity"] == 36_000
    assert write["warning_remaining_ratio"] == 0.2
    assert write["consumption_rate_per_minute"] is None
    event = next(p for p in body["policies"] if p["name"] == "EVENT_LIST")
    assert event["recovery_eta_seconds"] is None  # never: JSON has no infinity
    event_labels = {"endpoint_id": "EVENT_LIST", "psp_category": "A"}
    assert await running.value("dict_rate_limit_recovery_eta_seconds", **event_labels) == float("inf")
    assert (await running.status("/health/startup")) == (
        200,
        {"status": "ok", "checks": {"first_poll": "done"}},
    )
    assert (await running.status("/health/ready"))[1]["checks"]["bridge"] == "ok"
    async with running.http.get(running.base + "/") as response:
        assert response.status == 200
        assert 'href="/metrics"' in await response.text()


async def test_unreachable_bridge_keeps_serving_and_retrying(start: Any) -> None:
    running = await start(settings_for(f"127.0.0.1:{free_port()}"))
    await running.until(lambda: _failures_at_least(running, 2))
    samples = await running.samples()
    assert samples[("dict_rate_limit_bridge_up", frozenset())] == 0.0
    assert samples[("dict_rate_limit_last_success_timestamp_seconds", frozenset())] == 0.0
    assert samples[("dict_rate_limit_stale", frozenset())] == 0.0
    assert not any(name.startswith("dict_rate_limit_capacity") for name, _ in samples)
    assert (await running.status("/health/startup"))[0] == 200
    status, body = await running.status("/health/ready")
    assert status == 503
    assert body["checks"]["bridge"].startswith("no successful poll yet")


async def _failures_at_least(running: Running, count: float) -> bool:
    return (await running.value("dict_rate_limit_polls_total", result="failure") or 0) >= count


async def test_one_port_serves_metrics_and_health(sim: SimulatorServer, start: Any) -> None:
    port = free_port()
    running = await start(settings_for(sim.address, metrics_port=port, health_check_port=port))
    assert running.service.ports == {"metrics": port, "health": port}
    assert (await running.status("/health/live"))[0] == 200
    assert "dict_rate_limit_bridge_up" in await running.text()


async def test_history_is_written_and_part_of_readiness(
    sim: SimulatorServer, start: Any, database_url: str
) -> None:
    from exporter.history import migrations

    await asyncio.to_thread(migrations.apply, database_url)
    running = await start(settings_for(sim.address, database_url=database_url))
    await running.until(lambda: _rows_written_at_least(running, 2 * len(sim.engine.policy_names())))
    status, body = await running.status("/health/ready")
    assert (status, body["checks"]) == (200, {"bridge": "ok", "database": "ok"})
    assert await running.value("dict_rate_limit_history_enabled") == 1.0
    write_count = await running.value(
        "dict_rate_limit_monitoring_duration_seconds_count", operation="history_write"
    )
    assert write_count is not None
    assert write_count >= 1


async def _rows_written_at_least(running: Running, rows: int) -> bool:
    return (await running.value("dict_rate_limit_history_rows_written_total") or 0) >= rows


async def test_without_database_history_is_visibly_disabled(sim: SimulatorServer, start: Any) -> None:
    running = await start(settings_for(sim.address))
    assert await running.value("dict_rate_limit_history_enabled") == 0.0
    await running.until(lambda: asyncio.sleep(0, running.service.poller.attempted >= 1))
    assert "database" not in (await running.status("/health/ready"))[1]["checks"]


# --- truthful numbers and the polling budget against the simulator (issues 12 and 17)

ANTISCAN = "ENTRIES_READ_PARTICIPANT_ANTISCAN"


def _max_in_window(times: list[float], window: float) -> int:
    return max((sum(1 for t in times if start <= t < start + window) for start in times), default=0)


@pytest.fixture
async def start_budgeted(
    http: aiohttp.ClientSession,
) -> AsyncIterator[Callable[[ExporterSettings, CallBudget], Any]]:
    services: list[ExporterService] = []

    async def starter(settings: ExporterSettings, budget: CallBudget) -> Running:
        service = ExporterService(settings, budget=budget)
        await service.start()
        services.append(service)
        return Running(service, http)

    yield starter
    for service in services:
        await service.stop()


@pytest.mark.parametrize("failure", ["empty-policies-list", "UNAVAILABLE", "slower-than-timeout"])
async def test_no_failure_mode_spends_more_list_calls_than_the_ceiling(
    start_budgeted: Any, failure: str
) -> None:
    """Time scaled by 6: a 10 s window holding at most 10 calls is the 60/min ceiling of a 1 s interval.

    Without the ceiling, UNAVAILABLE and DEADLINE_EXCEEDED are retried inside each poll (2-3 calls per
    second here) and the old client retried RESOURCE_EXHAUSTED too; with it, no 10 s window of the
    simulator's log holds more."""
    if failure == "UNAVAILABLE":
        sim = SimulatorServer(category="A", seed=1)
        sim.engine.inject_errors("UNAVAILABLE", 100_000)
    elif failure == "slower-than-timeout":
        # Each call reaches the Bridge (and DICT) and is answered after the client gave up: 0.5 s > 0.3 s.
        sim = SimulatorServer(category="A", seed=1)
        sim.engine.inject_latency(0.5)
    else:
        sim = SimulatorServer(category="A", seed=1, scenario=resolve_scenario(failure))
    await sim.start()
    try:
        budget = CallBudget(60, window_seconds=10.0)
        running = await start_budgeted(settings_for(sim.address, bridge_timeout_seconds=0.3), budget)
        await asyncio.sleep(14.0)
        await running.service.stop()
        samples = await _final_samples(running)
    finally:
        await sim.stop()
    calls = sim.list_call_times
    assert len(calls) >= 10  # the budget is used: polling goes on
    # Arrival times at the Bridge carry the client's scheduling jitter (the ceiling is enforced where calls
    # are sent): a window 0.5 s shorter than the ceiling's absorbs it. Without the ceiling this fails.
    assert _max_in_window(calls, 9.5) <= 10
    codes = {labels: value for (name, labels), value in samples.items() if name.endswith("requests_total")}
    assert sum(codes.values()) == len(calls)  # every call reached the Bridge was counted
    assert samples[("dict_rate_limit_bridge_up", frozenset())] == 0.0
    if failure == "empty-policies-list":
        # 429s are never retried: one call per poll, and polls are at most one per second.
        polls = sum(
            samples[("dict_rate_limit_polls_total", frozenset({("result", r)}))]
            for r in ("success", "failure")
        )
        assert len(calls) == polls
        assert (
            samples[("dict_rate_limit_bridge_requests_total", frozenset({("code", "RESOURCE_EXHAUSTED")}))]
            >= 8
        )


async def _final_samples(running: Running) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    result = {}
    text = running.service.metrics_body(gzip=False).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            result[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return result


async def test_an_empty_or_all_invalid_answer_is_a_failed_poll_with_the_reason(
    sim: SimulatorServer, start: Any
) -> None:
    running = await start(settings_for(sim.address, stale_after_intervals=10))
    await running.until(lambda: running.value("dict_rate_limit_bridge_up"))
    sim.engine.inject_fault("empty", 3)
    await running.until(lambda: _equals(running.value("dict_rate_limit_bridge_up"), 0.0))
    status, body = await running.status("/health/ready")
    assert status == 200  # data is still fresh (stale after 10 intervals), but the poll failed, and why:
    assert body["checks"]["bridge"] == "ok"
    assert "no usable policy (empty list)" in body["checks"]["last_poll"]
    assert (await running.value("dict_rate_limit_invalid_policies_total", reason="no_usable_policy")) >= 1
    sim.engine.inject_fault("zero_capacity", 100)
    await running.until(
        lambda: _value_at_least(
            running.value("dict_rate_limit_invalid_policies_total", reason="capacity_not_positive"), 30
        )
    )
    assert await running.value("dict_rate_limit_bridge_up") == 0.0
    assert "no usable policy" in (running.service.poller.last_error or "")
    # Bucket series of the last good snapshot are still served (not vanished, not zeroed).
    write = {"endpoint_id": "ENTRIES_WRITE", "psp_category": "A"}
    assert await running.value("dict_rate_limit_capacity", **write) == 36_000.0


async def _value_at_least(value: Any, minimum: float) -> bool:
    return bool((await value or 0) >= minimum)


async def test_readiness_says_why_before_the_first_usable_answer(sim: SimulatorServer, start: Any) -> None:
    sim.engine.inject_fault("empty", 100)
    running = await start(settings_for(sim.address))
    await running.until(lambda: _failures_at_least(running, 1))
    status, body = await running.status("/health/ready")
    assert status == 503
    assert "no usable policy (empty list)" in body["checks"]["bridge"]


async def test_a_policy_that_disappears_is_reported_missing(sim: SimulatorServer, start: Any) -> None:
    running = await start(settings_for(sim.address))
    keys = {"endpoint_id": "KEYS_CHECK", "psp_category": "A"}
    await running.until(lambda: _equals(running.value("dict_rate_limit_policy_missing", **keys), 0.0))
    sim.engine.remove_policy("KEYS_CHECK")
    await running.until(lambda: _equals(running.value("dict_rate_limit_policy_missing", **keys), 1.0))
    samples = await running.samples()
    assert ("dict_rate_limit_available_tokens", frozenset(keys.items())) not in samples
    assert samples[("dict_rate_limit_bridge_up", frozenset())] == 1.0
    write = frozenset({"endpoint_id": "ENTRIES_WRITE", "psp_category": "A"}.items())
    assert samples[("dict_rate_limit_policy_missing", write)] == 0.0


async def test_the_bridges_deprecated_404_ratio_is_ignored_even_nan_and_never_a_500(
    sim: SimulatorServer, start: Any
) -> None:
    for policy, rate in (("ENTRIES_WRITE", math.nan), ("CLAIMS_READ", math.inf), ("KEYS_CHECK", -1.0),
                         ("REFUNDS_READ", 1e308), ("CLAIMS_WRITE", 0.25)):  # fmt: skip
        sim.engine.set_error_404_rate(policy, rate)
    running = await start(settings_for(sim.address))

    # The share comes from the counts: the list calls are the only answers the simulator counts here.
    async def share_exported() -> bool:
        return await running.value("dict_rate_limit_error_404_rate", **_labels("POLICIES_LIST")) is not None

    await running.until(share_exported)
    status, body = await running.status("/api/v1/policies")
    assert status == 200
    rates = {p["name"]: p["error_404_rate"] for p in body["policies"]}
    assert [
        rates[n] for n in ("ENTRIES_WRITE", "CLAIMS_READ", "KEYS_CHECK", "REFUNDS_READ", "CLAIMS_WRITE")
    ] == [None] * 5
    samples = await running.samples()
    exported = {
        dict(labels)["endpoint_id"]: value
        for (name, labels), value in samples.items()
        if name == "dict_rate_limit_error_404_rate"
    }
    assert exported == {"POLICIES_LIST": 0.0}  # answered 200 every time: a true 0, from the counts


def _labels(policy: str, **more: str) -> dict[str, str]:
    return {"endpoint_id": policy, "psp_category": "A", **more}


async def test_category_change_with_clamping_adds_no_consumption_and_history_says_so(
    start: Any, database_url: str
) -> None:
    from exporter.history import migrations

    await asyncio.to_thread(migrations.apply, database_url)
    clock = ManualClock()
    sim = SimulatorServer(category="A", seed=1, clock=clock)
    await sim.start()
    try:
        sim.engine.consume(ANTISCAN, 1000)  # 49,000 of 50,000
        running = await start(settings_for(sim.address, database_url=database_url))
        labels_a = {"endpoint_id": ANTISCAN, "psp_category": "A"}
        await running.until(lambda: running.value("dict_rate_limit_available_tokens", **labels_a))
        clock.advance(1.0)  # 1 s at 25,000/min refills 416.7 of the 1,000 missing
        sim.engine.consume(ANTISCAN, 400)
        await running.until(
            lambda: _value_at_least(running.value("dict_rate_limit_consumed_tokens_total", **labels_a), 1)
        )
        before = await running.value("dict_rate_limit_consumed_tokens_total", **labels_a)
        assert before == pytest.approx(400, abs=2)
        clock.advance(1.0)
        sim.engine.set_category("H")  # capacity 50, refill 2/min: the balance is clamped to 50
        labels_h = {"endpoint_id": ANTISCAN, "psp_category": "H"}
        await running.until(lambda: running.value("dict_rate_limit_available_tokens", **labels_h))
        # The old formula counted 49,000-ish tokens "consumed" here and projected exhaustion in 0.03 s.
        assert await running.value("dict_rate_limit_consumed_tokens_total", **labels_h) == before
        assert await running.value("dict_rate_limit_exhaustion_projection_seconds", **labels_h) is None
        await running.until(lambda: _rows_written_at_least(running, 3 * len(sim.engine.policy_names())))
    finally:
        await sim.stop()
    import psycopg

    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cursor = await conn.execute(
            "SELECT psp_category, available_tokens, consumed_tokens, exhaustion_projection_seconds "
            "FROM dict_rate_limit_states WHERE endpoint_id = %s ORDER BY response_time",
            (ANTISCAN,),
        )
        rows = await cursor.fetchall()
    changed = next(row for row in rows if row[0] == "H")
    assert changed[1] == 50
    assert changed[2] is None  # nothing measured over the interval of the change
    assert changed[3] is None
    assert all(row[2] is None or row[2] < 1000 for row in rows)


async def test_a_restart_remembers_policies_from_history_and_reports_them_missing(
    sim: SimulatorServer, start: Any, database_url: str
) -> None:
    from exporter.history import migrations

    await asyncio.to_thread(migrations.apply, database_url)
    first = await start(settings_for(sim.address, database_url=database_url))
    await first.until(lambda: _rows_written_at_least(first, len(sim.engine.policy_names())))
    await first.service.stop()
    sim.engine.remove_policy("KEYS_CHECK")
    second = await start(settings_for(sim.address, database_url=database_url))
    keys = {"endpoint_id": "KEYS_CHECK", "psp_category": "A"}
    await second.until(lambda: _equals(second.value("dict_rate_limit_policy_missing", **keys), 1.0))


async def test_an_orphaned_threshold_is_warned_about_and_exported(
    sim: SimulatorServer, start: Any, caplog: pytest.LogCaptureFixture
) -> None:
    thresholds = {"KEYS_READ": PolicyThreshold(0.3, 0.1), "KEYS_CHECK": PolicyThreshold(0.3, 0.1)}
    running = await start(settings_for(sim.address, policy_thresholds=thresholds))
    await running.until(
        lambda: _equals(
            running.value("dict_rate_limit_threshold_policy_unmatched", endpoint_id="KEYS_READ"), 1.0
        )
    )
    assert await running.value("dict_rate_limit_threshold_policy_unmatched", endpoint_id="KEYS_CHECK") is None
    text = caplog.text
    assert "not a policy of DICT's table" in text  # at start-up
    assert "which the Bridge does not return" in text  # after the first poll that shows it


async def test_step_refill_counter_follows_true_consumption_and_projection_holds(start: Any) -> None:
    """The real exporter against the step-refill scenario: 10 simulated minutes, one poll per 30 s of the
    simulator's clock (moved by the test after each poll), read back from /metrics."""
    clock = ManualClock()
    sim = SimulatorServer(category="A", seed=1, clock=clock, scenario=resolve_scenario("step-refill"))
    await sim.start()
    write = {"endpoint_id": "ENTRIES_WRITE", "psp_category": "A"}
    try:
        # The simulator's clock runs ahead of the local one by 30 s per poll: allow it.
        running = await start(settings_for(sim.address, bridge_max_clock_skew_seconds=1e6))
        await running.until(lambda: asyncio.sleep(0, running.service.poller.latest is not None))
        first_true = sim.engine.consumed("ENTRIES_WRITE")
        projections = []
        for _ in range(20):
            polls = running.service.poller.attempted
            clock.advance(30.0)
            await running.until(lambda p=polls: asyncio.sleep(0, running.service.poller.attempted > p))
            # `attempted` counts the poll before its snapshot is rendered: wait for /metrics to serve it.
            await running.until(lambda: _serves(running, clock.time()))
            projections.append(await running.value("dict_rate_limit_exhaustion_projection_seconds", **write))
        true = sim.engine.consumed("ENTRIES_WRITE") - first_true
        counter = await running.value("dict_rate_limit_consumed_tokens_total", **write)
    finally:
        await sim.stop()
    assert true == 15_000  # 1,500 requests/min for 10 minutes, none refused
    assert counter == pytest.approx(true, rel=0.03)
    # Draining by 5 tokens/s net from about 18,000 down to about 15,000: 3,600 s falling to 3,000 s, never
    # "never" once a whole period is seen (per interval it alternated between about 700 s and "never").
    assert all(p is not None and 2_900 < p < 3_700 for p in projections[1:]), projections
    assert projections[-1] < projections[1]


async def _serves(running: Running, moment: float) -> bool:
    """True once /metrics serves the snapshot of the simulator's time ``moment`` (milliseconds)."""
    served = await running.value("dict_rate_limit_snapshot_response_time_seconds")
    return served is not None and abs(served - int(moment * 1000) / 1000) < 1e-6


async def test_poison_answers_never_reach_history_and_the_next_good_one_does(
    sim: SimulatorServer, start: Any, database_url: str
) -> None:
    """A ResponseTime of 9999-12-31, a NUL in a policy name and broken answer counts: refused or cleaned
    at the edge, counted, and the next good answer is stored within an interval."""
    from exporter.history import migrations

    await asyncio.to_thread(migrations.apply, database_url)
    sim.engine.inject_fault("future_time", 1)
    sim.engine.inject_fault("nul_name", 1)
    sim.engine.inject_fault("bad_counts", 1)
    running = await start(settings_for(sim.address, database_url=database_url))
    policies = len(sim.engine.policy_names())
    # Poll 1 refused, polls 2 (29 policies) and 3 (no counts) stored, then 4 (a new count window) and 5
    # (the first share since).
    await running.until(lambda: _rows_written_at_least(running, 4 * policies + 29), within=15)
    assert (
        await running.value("dict_rate_limit_invalid_policies_total", reason="implausible_response_time") == 1
    )
    assert await running.value("dict_rate_limit_invalid_policies_total", reason="invalid_name") == 1
    assert (
        await running.value("dict_rate_limit_invalid_policies_total", reason="duplicate_response_code")
        == policies
    )
    status, body = await running.status("/health/ready")
    assert (status, body["checks"]["database"]) == (200, "ok")
    import psycopg

    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cursor = await conn.execute(
            "SELECT max(response_time) > now() + interval '1 hour', count(DISTINCT response_time) "
            "FROM dict_rate_limit_states"
        )
        far_future, snapshots = await cursor.fetchone() or (None, None)
        cursor = await conn.execute(
            "SELECT array_agg(error_404_rate ORDER BY response_time) FROM dict_rate_limit_states "
            "WHERE endpoint_id = 'POLICIES_LIST'"
        )
        (shares,) = await cursor.fetchone() or (None,)
    assert far_future is False
    assert snapshots >= 4
    # The computed share is what history stores: none for the first snapshot, the one whose counts were
    # dropped and the one after (a new window), then the list calls' true 0.
    assert shares[:3] == [None, None, None]
    assert shares[3] == 0.0
