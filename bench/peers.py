"""What a user would write instead of the exporter, with prometheus_client as its documentation shows:
(a) a custom collector that calls the Bridge on each scrape; (b) global Gauges set by a poll thread. Both
serve with ``start_http_server`` and export the same 14 series per policy as the exporter. The raw-socket
floor (c) answers every GET with pre-rendered bytes and does nothing else: the limit of a scrape."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import grpc
from prometheus_client import REGISTRY, Gauge, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from exporter.bridge.proto import rate_limit_pb2 as pb
from exporter.bridge.proto import rate_limit_pb2_grpc as pb_grpc

LABELS = ["endpoint_id", "psp_category"]
#: 14 series per policy, as the exporter's bucket families (values computed the simple way).
SERIES = (
    "available_tokens", "capacity", "utilization_percent", "remaining_ratio", "refill_tokens",
    "refill_period_seconds", "refill_rate_tokens_per_second", "consumed_tokens_total",
    "consumption_rate_per_minute", "recovery_eta_seconds", "exhaustion_projection_seconds",
    "error_404_rate", "warning_remaining_ratio", "critical_remaining_ratio",
)  # fmt: skip


def _values(policy: pb.RateLimitPolicy) -> list[float]:
    available, capacity = float(policy.available_tokens), float(policy.capacity)
    rate = policy.refill_tokens / policy.refill_period_sec
    missing = capacity - available
    return [
        available, capacity, 100 * (1 - available / capacity), available / capacity,
        float(policy.refill_tokens), float(policy.refill_period_sec), rate, 0.0, 0.0,
        missing / rate if rate else float("inf"), 0.0, policy.error_404_rate, 0.2, 0.1,
    ]  # fmt: skip


class BridgeCollector(Collector):
    """(a) Calls the Bridge in collect(): every scrape costs one DICT list call (and its token)."""

    def __init__(self, address: str) -> None:
        self._stub = pb_grpc.RateLimitServiceStub(grpc.insecure_channel(address))  # type: ignore[no-untyped-call]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("dict_rate_limit_bridge_up", "1 when the Bridge answered this scrape.")
        try:
            response = self._stub.GetRateLimitPolicies(pb.GetRateLimitPoliciesRequest(), timeout=2.0)
        except grpc.RpcError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        families = [GaugeMetricFamily(f"dict_rate_limit_{name}", name, labels=LABELS) for name in SERIES]
        for policy in response.policies:
            for family, value in zip(families, _values(policy), strict=True):
                family.add_metric([policy.name, response.category], value)
        yield from families


def serve_per_scrape(port: int, bridge: str) -> None:
    REGISTRY.register(BridgeCollector(bridge))
    start_http_server(port, addr="127.0.0.1")
    threading.Event().wait()


def serve_gauges(port: int, bridge: str, interval: float) -> None:
    """(b) Module-style global Gauges, set by a thread that polls the Bridge every ``interval``."""
    gauges = [Gauge(f"dict_rate_limit_{name}", name, LABELS) for name in SERIES]
    up = Gauge("dict_rate_limit_bridge_up", "1 when the last poll succeeded.")
    stub = pb_grpc.RateLimitServiceStub(grpc.insecure_channel(bridge))  # type: ignore[no-untyped-call]

    def poll() -> None:
        while True:
            try:
                response = stub.GetRateLimitPolicies(pb.GetRateLimitPoliciesRequest(), timeout=2.0)
                for policy in response.policies:
                    for gauge, value in zip(gauges, _values(policy), strict=True):
                        gauge.labels(policy.name, response.category).set(value)
                up.set(1)
            except grpc.RpcError:
                up.set(0)
            time.sleep(interval)

    threading.Thread(target=poll, daemon=True).start()
    start_http_server(port, addr="127.0.0.1")
    threading.Event().wait()


class _Floor(asyncio.Protocol):
    """(c) HTTP/1.1 keep-alive: one pre-built response per request head, nothing parsed beyond its end."""

    def __init__(self, response: bytes) -> None:
        self._response = response
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while b"\r\n\r\n" in self._buffer:
            _, _, self._buffer = self._buffer.partition(b"\r\n\r\n")
            assert self._transport is not None
            self._transport.write(self._response)


def serve_floor(port: int, body: bytes) -> None:
    head = (
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    response = head.encode() + body

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Floor(response), "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    asyncio.run(main())
