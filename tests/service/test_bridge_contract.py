"""Contract tests (issue 15): one exporter code against an old-style Bridge (no answer counts, no ISPB) and
a new one, over real gRPC and HTTP: what appears, with which values, and what is refused.

The simulator runs on a manual clock the test moves, so the answers it counted between two polls are
known exactly: the exported counters must equal them and the 404 share must be their ratio.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import grpc.aio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devstack.embedded import free_port
from exporter.bridge.proto import rate_limit_pb2 as pb
from exporter.bridge.proto import rate_limit_pb2_grpc as pb_grpc
from exporter.config import ExporterSettings
from exporter.service.app import ExporterService
from exporter.simulator import policy_table as dp
from exporter.simulator.clock import ManualClock, utc_ms
from exporter.simulator.scenario import builtin_scenario
from exporter.simulator.server import SimulatorServer

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
RESPONSES = "dict_rate_limit_dict_responses_total"
SHARE = "dict_rate_limit_error_404_rate"


def settings_for(address: str, **overrides: Any) -> ExporterSettings:
    values: dict[str, Any] = {
        "bridge_address": address,
        "listen_host": "127.0.0.1",
        "metrics_port": free_port(),
        "health_check_port": free_port(),
        "poll_interval_seconds": 1.0,
        "poll_lead_seconds": 0.25,
        "poll_budget_override": True,
        "stale_after_intervals": 30,
        "bridge_timeout_seconds": 0.5,
        **overrides,
    }
    return ExporterSettings(**values)


class Exporter:
    def __init__(self, service: ExporterService, http: aiohttp.ClientSession) -> None:
        self.service = service
        self.http = http
        self.base = f"http://127.0.0.1:{service.ports['metrics']}"

    async def samples(self) -> Samples:
        async with self.http.get(self.base + "/metrics") as response:
            text = await response.text()
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    async def until(self, check: Callable[[], Any], within: float = 10.0) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if await check():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"condition not met within {within} s")

    async def polled_at(self, moment: datetime) -> None:
        """Waits until /metrics serves the simulator's answer at ``moment`` (rendered after the poll)."""
        key = ("dict_rate_limit_snapshot_response_time_seconds", frozenset())

        async def served() -> bool:
            return (await self.samples()).get(key) == moment.timestamp()

        await self.until(served)


@pytest.fixture
async def start() -> AsyncIterator[Callable[[ExporterSettings], Any]]:
    services: list[ExporterService] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:

        async def starter(settings: ExporterSettings) -> Exporter:
            service = ExporterService(settings)
            await service.start()
            services.append(service)
            return Exporter(service, http)

        yield starter
        for service in services:
            await service.stop()


async def _simulator(scenario: str, *, legacy: bool = False) -> tuple[SimulatorServer, ManualClock]:
    clock = ManualClock(time.time())
    server = SimulatorServer(scenario=builtin_scenario(scenario), clock=clock, legacy=legacy)
    await server.start()
    return server, clock


def _labels(policy: str, **more: str) -> frozenset[tuple[str, str]]:
    return frozenset({"endpoint_id": policy, "psp_category": "A", **more}.items())


def _of(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: value for (found, labels), value in samples.items() if found == name}


@pytest.mark.parametrize("legacy", [True, False], ids=["old-bridge", "new-bridge"])
async def test_an_old_and_a_new_bridge_against_the_same_exporter(legacy: bool, start: Any) -> None:
    server, clock = await _simulator("404_storm", legacy=legacy)
    try:
        clock.advance(40)  # ten seconds into the storm: 15 % of the lookups answered 404
        exporter = await start(settings_for(server.address, participant_ispb="12345678"))
        await exporter.polled_at(utc_ms(clock))
        before = dict(server.engine.response_counts(dp.ANTISCAN))
        clock.advance(30)
        await exporter.polled_at(utc_ms(clock))
        after = dict(server.engine.response_counts(dp.ANTISCAN))
        samples = await exporter.samples()
        async with exporter.http.get(exporter.base + "/api/v1/policies") as response:
            api = await response.json()
    finally:
        await server.stop()
    antiscan = next(p for p in api["policies"] if p["name"] == dp.ANTISCAN)
    # The exporter asked for 12345678: the new Bridge names it, the old one names nobody (the one asked).
    assert api["participant_ispb"] == "12345678"
    # Both: the buckets, the Bridge up, the same policies.
    assert samples[("dict_rate_limit_bridge_up", frozenset())] == 1.0
    assert ("dict_rate_limit_available_tokens", _labels(dp.ANTISCAN)) in samples
    if legacy:
        # Nothing made up: no counter, and no 404 share (the deprecated ratio it sends is not read).
        assert _of(samples, RESPONSES) == {}
        assert _of(samples, SHARE) == {}
        assert (antiscan["response_counts"], antiscan["error_404_rate"]) == (None, None)
        return
    assert antiscan["response_counts"] == {str(code): count for code, count in after.items()}
    for code in (200, 404, 429):
        assert samples[(RESPONSES, _labels(dp.ANTISCAN, code=str(code)))] == after[code]
    counted = sum(after.values()) - sum(before.values())
    share = samples[(SHARE, _labels(dp.ANTISCAN))]
    assert share == (after[404] - before[404]) / counted
    assert share == pytest.approx(0.15, abs=0.01)  # the storm: well above the manual's 7 %
    assert antiscan["error_404_rate"] == share
    # A policy nobody used has its zero counters (the Bridge lists them) and no share (never a 0).
    assert samples[(RESPONSES, _labels("ENTRIES_UPDATE", code="429"))] == 0
    assert (SHARE, _labels("ENTRIES_UPDATE")) not in samples


async def test_a_bridge_restart_is_a_counter_reset_and_the_share_stays_right(start: Any) -> None:
    server, clock = await _simulator("404_storm")
    try:
        clock.advance(40)
        exporter = await start(settings_for(server.address))
        await exporter.polled_at(utc_ms(clock))
        first = dict(server.engine.response_counts(dp.ANTISCAN))
        clock.advance(30)
        await exporter.polled_at(utc_ms(clock))
        second = dict(server.engine.response_counts(dp.ANTISCAN))
        server.restart_counts()  # the Bridge restarts: its counts start again from 0
        clock.advance(30)
        await exporter.polled_at(utc_ms(clock))
        third = dict(server.engine.response_counts(dp.ANTISCAN))
        samples = await exporter.samples()
    finally:
        await server.stop()
    assert third[200] < second[200]  # the restart: counted again from 0
    # Passed through: the counter goes down, which Prometheus reads as a reset.
    assert samples[(RESPONSES, _labels(dp.ANTISCAN, code="200"))] == third[200]
    assert samples[(RESPONSES, _labels(dp.ANTISCAN, code="404"))] == third[404]
    # The share over the window: the increase before the restart plus everything counted after it.
    not_found = (second[404] - first[404]) + third[404]
    answers = (sum(second.values()) - sum(first.values())) + sum(third.values())
    assert samples[(SHARE, _labels(dp.ANTISCAN))] == not_found / answers


async def test_429_on_one_policy_shows_in_that_policys_counter_only(start: Any) -> None:
    server, clock = await _simulator("429_on_one_policy")
    try:
        clock.advance(100)
        exporter = await start(settings_for(server.address))
        await exporter.polled_at(utc_ms(clock))
        samples = await exporter.samples()
    finally:
        await server.stop()
    refused = {
        dict(labels)["endpoint_id"]: value
        for labels, value in _of(samples, RESPONSES).items()
        if dict(labels)["code"] == "429"
    }
    assert refused.pop("ENTRIES_UPDATE") > 1_500
    assert set(refused.values()) == {0.0}


class _Liar(pb_grpc.RateLimitServiceServicer):
    """A Bridge that answers about ``answer_ispb``, whatever it is asked."""

    def __init__(self) -> None:
        self.answer_ispb = "12345678"
        self.available = 30_000
        self.asked: list[str] = []

    async def GetRateLimitPolicies(
        self, request: pb.GetRateLimitPoliciesRequest, context: object
    ) -> pb.GetRateLimitPoliciesResponse:
        self.asked.append(request.participant_ispb)
        policy = pb.RateLimitPolicy(
            name="ENTRIES_WRITE", available_tokens=self.available, capacity=36_000, refill_tokens=1200,
            refill_period_sec=60, response_counts=[pb.ResponseCount(code=200, count=self.available)],
        )  # fmt: skip
        response = pb.GetRateLimitPoliciesResponse(
            correlation_id="0" * 32, category="A", policies=[policy], participant_ispb=self.answer_ispb
        )
        response.response_time.FromDatetime(datetime.now(UTC) - timedelta(milliseconds=1))
        return response


async def test_an_answer_about_another_participant_is_refused_and_the_series_keep_their_values(
    start: Any,
) -> None:
    liar = _Liar()
    server = grpc.aio.server()
    pb_grpc.add_RateLimitServiceServicer_to_server(liar, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        exporter = await start(settings_for(f"127.0.0.1:{port}", participant_ispb="12345678"))
        write = _labels("ENTRIES_WRITE")

        async def value(name: str, labels: frozenset[tuple[str, str]] = frozenset()) -> float | None:
            return (await exporter.samples()).get((name, labels))

        async def first_served() -> bool:
            return await value("dict_rate_limit_available_tokens", write) == 30_000

        await exporter.until(first_served)
        liar.answer_ispb, liar.available = "87654321", 1_000  # another participant's, nearly empty, bucket

        async def refused() -> bool:
            reason = frozenset({"reason": "participant_mismatch"}.items())
            return (await value("dict_rate_limit_invalid_policies_total", reason) or 0) >= 2

        await exporter.until(refused)
        samples = await exporter.samples()
        error = exporter.service.poller.last_error
    finally:
        await server.stop(None)
    assert set(liar.asked) == {"12345678"}
    assert samples[("dict_rate_limit_bridge_up", frozenset())] == 0.0
    assert samples[("dict_rate_limit_polls_total", frozenset({"result": "failure"}.items()))] >= 2
    # Never mixed: the series still hold the participant's own last values.
    assert samples[("dict_rate_limit_available_tokens", write)] == 30_000
    assert samples[(RESPONSES, _labels("ENTRIES_WRITE", code="200"))] == 30_000
    assert error is not None
    assert "participant_mismatch" in error
    assert "87654321" in error
