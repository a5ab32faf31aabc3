"""The exporter in-process against the Bridge simulator over real gRPC, scraped over real HTTP."""

from __future__ import annotations

import asyncio
import gzip
import itertools
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devstack.embedded import free_port
from exporter.config import Settings
from exporter.service.app import ExporterService
from exporter.simulator.server import SimulatorServer
from tests.support.env import require_binary

SLOW = "CLAIMS_LIST_WITHOUT_ROLE"  # refills 10/min: a balance set by the test stays put for a while


def settings_for(address: str, **overrides: Any) -> Settings:
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
    return Settings(**values)


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
async def start(http: aiohttp.ClientSession) -> AsyncIterator[Callable[[Settings], Any]]:
    services: list[ExporterService] = []

    async def starter(settings: Settings) -> Running:
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
