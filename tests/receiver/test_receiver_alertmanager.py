"""End to end with a real Alertmanager (Debian package): alerts posted to its API reach the receiver through
the rendered alertmanager.yml, end as one row with both times and two events read by a real `core-dict`
consumer; with PostgreSQL cut off the receiver answers 503 and Alertmanager's retries lose nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp

from devstack.alertmanager_config import render_alertmanager_config
from devstack.embedded import EmbeddedPulsar, free_port
from exporter.config import Settings
from exporter.receiver.metrics import ReceiverMetrics
from exporter.receiver.webhook import serve
from tests.support.env import require_binary
from tests.support.receiver import TOKEN, EventConsumer, alertmanager, am_alert, migrate, rows, unique_topic
from tests.support.tcp_proxy import TcpProxy

LABELS = {
    "alertname": "DICTRateLimitCritical",
    "severity": "critical",
    "endpoint_id": "ENTRIES_WRITE",
    "psp_category": "A",
    "job": "dict-rate-limit-exporter",
}
ROW = "SELECT status, starts_at, ends_at, resolved_by FROM dict_rate_limit_alerts"


@asynccontextmanager
async def running_receiver(settings: Settings, metrics: ReceiverMetrics) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop, metrics=metrics))
    await asyncio.sleep(0)
    try:
        for _ in range(100):
            if task.done():
                task.result()
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", settings.receiver_port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            writer.close()
            await writer.wait_closed()
            break
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def receiver_settings(database_url: str, broker: EmbeddedPulsar, topic: str, token_file: Path) -> Settings:
    token_file.write_text(TOKEN + "\n")
    ops = free_port()
    return Settings(
        database_url=database_url,
        webhook_bearer_token=TOKEN,
        listen_host="127.0.0.1",
        receiver_port=free_port(),
        metrics_port=ops,
        health_check_port=ops,
        pulsar_url=broker.url,
        pulsar_topic=topic,
    )


def alertmanager_config(settings: Settings, directory: Path) -> Path:
    """alertmanager.yml rendered for this receiver and its token file, with one-second grouping."""
    webhook = f"http://127.0.0.1:{settings.receiver_port}/alerts"
    return render_alertmanager_config(webhook, directory / "token", directory / "am.yml", fast=True)


async def statuses(database_url: str, expected: str, seconds: float) -> list[tuple[object, ...]]:
    """The alert rows' statuses once they are all ``expected`` (or whatever they are after ``seconds``)."""
    return await eventually("SELECT status FROM dict_rate_limit_alerts", database_url, [(expected,)], seconds)


async def eventually(
    query: str, database_url: str, expected: object, seconds: float
) -> list[tuple[object, ...]]:
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        found = rows(database_url, query)
        if found == expected or asyncio.get_running_loop().time() > deadline:
            return found
        await asyncio.sleep(0.2)


def sample(metrics: ReceiverMetrics, **labels: str) -> float:
    return metrics.registry.get_sample_value("dict_rate_limit_webhook_requests_total", labels) or 0.0


async def eventually_true(predicate: Callable[[], bool], seconds: float) -> bool:
    deadline = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.2)
    return predicate()


async def test_firing_then_resolved_through_alertmanager_is_one_row_and_two_events(
    tmp_path: Path, database_url: str, pulsar_broker: EmbeddedPulsar
) -> None:
    binary = require_binary("prometheus-alertmanager")
    migrate(database_url)
    topic = unique_topic()
    settings = receiver_settings(database_url, pulsar_broker, topic, tmp_path / "token")
    config = alertmanager_config(settings, tmp_path)
    consumer = EventConsumer(pulsar_broker.url, topic)
    starts = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=20)
    try:
        async with running_receiver(settings, ReceiverMetrics()):
            with alertmanager(binary, config, tmp_path) as manager:
                manager.post(am_alert(LABELS, starts_at=starts))
                assert await statuses(database_url, "firing", 20) == [("firing",)]
                manager.post(am_alert(LABELS, starts_at=starts, resolved=True))
                assert await statuses(database_url, "resolved", 20) == [("resolved",)]
                events = await asyncio.to_thread(consumer.receive, 2, 20)
            async with aiohttp.ClientSession() as session:
                health = f"http://127.0.0.1:{settings.health_check_port}/health/ready"
                async with session.get(health) as response:
                    readiness = (response.status, await response.json())
    finally:
        consumer.close()
    assert readiness == (200, {"status": "ok", "checks": {"database": "ok", "pulsar": "ok"}})
    [(status, starts_at, ends_at, resolved_by)] = rows(database_url, ROW)
    assert (status, resolved_by) == ("resolved", "alertmanager")
    assert starts_at == starts
    assert ends_at is not None
    assert ends_at > starts_at
    assert [e.event["event_type"] for e in events] == [
        "rate_limit.alert.created",
        "rate_limit.alert.resolved",
    ]
    assert {e.key for e in events} == {"ENTRIES_WRITE"}
    assert events[0].event["severity"] == "critical"
    assert events[1].event["ends_at"] is not None


async def test_database_cut_off_gets_503_and_alertmanager_retries_until_recorded(
    tmp_path: Path, database_url: str, pulsar_broker: EmbeddedPulsar
) -> None:
    binary = require_binary("prometheus-alertmanager")
    migrate(database_url)
    topic = unique_topic()
    metrics = ReceiverMetrics()
    consumer = EventConsumer(pulsar_broker.url, topic)
    with TcpProxy.for_postgres(database_url) as proxy:
        settings = receiver_settings(proxy.url_for(database_url), pulsar_broker, topic, tmp_path / "token")
        config = alertmanager_config(settings, tmp_path)
        try:
            async with running_receiver(settings, metrics):
                with alertmanager(binary, config, tmp_path) as manager:
                    await asyncio.to_thread(proxy.stop)
                    manager.post(am_alert(LABELS))
                    refused = await eventually_true(lambda: bool(sample(metrics, status="503")), 30)
                    assert refused, "the receiver never answered 503 while PostgreSQL was cut off"
                    assert rows(database_url, "SELECT count(*) FROM dict_rate_limit_alerts") == [(0,)]
                    await asyncio.to_thread(proxy.start)
                    assert await statuses(database_url, "firing", 40) == [("firing",)]
                    events = await asyncio.to_thread(consumer.receive, 1, 20)
        finally:
            consumer.close()
    assert [e.event["event_type"] for e in events] == ["rate_limit.alert.created"]
    assert (
        metrics.registry.get_sample_value(
            "dict_rate_limit_alerts_created_total",
            {"endpoint_id": "ENTRIES_WRITE", "severity": "critical", "psp_category": "A"},
        )
        == 1
    )
