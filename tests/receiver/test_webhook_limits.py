"""The receiver's HTTP servers under connection floods (real sockets on loopback, real PostgreSQL): half-open
and slow clients are closed after the header timeout, connections beyond the cap are refused at once, and
all the while the webhook and /health keep answering. Also: SIGTERM ends a start-up that waits for the
database, and Pulsar is reported up once connected, before any event."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest

from devstack.embedded import EmbeddedPulsar, free_port
from exporter.config import Settings
from exporter.receiver.metrics import ReceiverMetrics
from exporter.receiver.webhook import serve
from tests.support.receiver import AUTH, TOKEN, alert, migrate, payload, unique_topic

HALF_OPEN = 300


@asynccontextmanager
async def running(database_url: str, **changes: Any) -> AsyncIterator[tuple[Settings, ReceiverMetrics]]:
    ops = free_port()
    values: dict[str, Any] = {
        "database_url": database_url,
        "webhook_bearer_token": TOKEN,
        "listen_host": "127.0.0.1",
        "receiver_port": free_port(),
        "metrics_port": ops,
        "health_check_port": ops,
        "pulsar_url": f"pulsar://127.0.0.1:{free_port()}",
    }
    settings = Settings(**(values | changes))
    metrics = ReceiverMetrics()
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop, metrics=metrics))
    try:
        async with asyncio.timeout(30):
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", settings.health_check_port)
                    writer.close()
                    break
                except OSError:
                    await asyncio.sleep(0.1)
        yield settings, metrics
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def open_half(port: int, count: int, head: bytes = b"") -> list[tuple[asyncio.StreamReader, Any]]:
    """``count`` connections that send ``head`` (nothing, or part of a request head) and then stall."""
    connections = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        if head:
            writer.write(head)
        connections.append((reader, writer))
    return connections


async def closed_by_server(connections: list[tuple[asyncio.StreamReader, Any]], within: float) -> int:
    async def one(reader: asyncio.StreamReader) -> bool:
        try:
            return await asyncio.wait_for(reader.read(1), within) == b""
        except (TimeoutError, ConnectionError):
            return False

    results = await asyncio.gather(*(one(reader) for reader, _ in connections))
    return sum(results)


async def answers(
    session: aiohttp.ClientSession, settings: Settings, fingerprint: str
) -> tuple[int, int, float]:
    started = time.perf_counter()
    webhook = await session.post(
        f"http://127.0.0.1:{settings.receiver_port}/alerts",
        json=payload(alert(fingerprint=fingerprint)),
        headers=AUTH,
    )
    health = await session.get(f"http://127.0.0.1:{settings.health_check_port}/health/ready")
    return webhook.status, health.status, time.perf_counter() - started


async def test_hundreds_of_half_open_connections_neither_stop_the_webhook_nor_health(
    database_url: str,
) -> None:
    migrate(database_url)
    async with running(database_url, http_header_timeout_seconds=3.0) as (settings, _):
        silent = await open_half(settings.receiver_port, HALF_OPEN)
        slowloris = await open_half(
            settings.receiver_port, HALF_OPEN // 3, b"POST /alerts HTTP/1.1\r\nHost: x\r\n"
        )
        on_health = await open_half(settings.health_check_port, HALF_OPEN // 3)
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for index in range(5):
                webhook, health, seconds = await answers(session, settings, f"during-{index}")
                assert (webhook, health) == (200, 200)
                assert seconds < 5
        # Every stalled connection is closed by the server after the header timeout (3 s, margin for load).
        stalled = silent + slowloris + on_health
        assert await closed_by_server(stalled, within=20) == len(stalled)
        for _, writer in stalled:
            writer.close()


async def test_connections_beyond_the_cap_are_refused_and_counted_while_health_answers(
    database_url: str,
) -> None:
    migrate(database_url)
    async with running(database_url, http_max_connections=50, http_header_timeout_seconds=2.0) as (
        settings,
        _,
    ):
        flood = await open_half(settings.receiver_port, 120)
        # The 70 beyond the cap are closed at once; the 50 inside it after the header timeout.
        refused = await closed_by_server(flood, within=1.0)
        assert refused >= 60, refused
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            health = await session.get(f"http://127.0.0.1:{settings.health_check_port}/health/live")
            assert health.status == 200  # its own port, its own cap
            assert await closed_by_server(flood, within=15) == len(flood)
            webhook, health_status, _ = await answers(session, settings, "after-flood")
            assert (webhook, health_status) == (200, 200)
        for _, writer in flood:
            writer.close()


async def test_a_trickled_body_gets_408_counted(database_url: str) -> None:
    migrate(database_url)
    async with running(database_url, http_body_timeout_seconds=1.0) as (settings, metrics):
        body = json.dumps(payload(alert())).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", settings.receiver_port)
        writer.write(
            b"POST /alerts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body[:10]
        )
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 15)
        writer.close()
        assert status_line.split()[1] == b"408", status_line
        sample = metrics.registry.get_sample_value
        assert sample("dict_rate_limit_webhook_invalid_payloads_total", {"reason": "too_slow"}) == 1
        assert sample("dict_rate_limit_webhook_requests_total", {"status": "408"}) == 1


def test_sigterm_ends_a_start_up_waiting_for_the_database() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WEBHOOK_", "PULSAR_", "CONFIG_FILE"))}
    env.update(
        DATABASE_URL=f"postgresql://postgres@127.0.0.1:{free_port()}/postgres?connect_timeout=2",
        WEBHOOK_ALLOW_UNAUTHENTICATED="true",
        LISTEN_HOST="127.0.0.1",
        RECEIVER_PORT=str(free_port()),
        METRICS_PORT=str(ops := free_port()),
        HEALTH_CHECK_PORT=str(ops),
        LOG_FORMAT="json",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "exporter.cli", "receiver"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(3.0)  # imports done, waiting for the database (up to 30 s)
        assert process.poll() is None
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)
        assert time.monotonic() - started < 5
        assert process.returncode == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


async def test_pulsar_is_reported_up_once_connected_before_any_publish(
    database_url: str, pulsar_broker: EmbeddedPulsar
) -> None:
    migrate(database_url)
    async with running(database_url, pulsar_url=pulsar_broker.url, pulsar_topic=unique_topic()) as (
        settings,
        metrics,
    ):
        assert metrics.registry.get_sample_value("dict_rate_limit_pulsar_publishes_total") == 0
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            deadline = time.monotonic() + 20
            checks: dict[str, str] = {}
            while time.monotonic() < deadline:
                response = await session.get(f"http://127.0.0.1:{settings.health_check_port}/health/ready")
                checks = (await response.json())["checks"]
                if checks.get("pulsar") == "ok":
                    break
                await asyncio.sleep(0.2)
        assert checks == {"database": "ok", "pulsar": "ok"}
        assert metrics.registry.get_sample_value("dict_rate_limit_pulsar_publishes_total") == 0


@pytest.mark.parametrize(
    ("url", "options"),
    [
        ("pulsar+ssl://broker:6651", {"tls_validate_hostname": True, "tls_allow_insecure_connection": False}),
        ("pulsar://broker:6650", {}),
    ],
)
def test_the_pulsar_client_validates_broker_hostnames_with_tls(url: str, options: dict[str, bool]) -> None:
    from exporter.receiver.publisher import tls_options

    assert tls_options(url) == options
