"""The history part of /metrics is rendered once per change: the cached bytes are always exactly what a
fresh render of the writer's collector gives, before and after its counters, gauges and histograms move."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from exporter.bridge.client import BridgeResult
from exporter.config import ExporterSettings
from exporter.history import migrations
from exporter.history.writer import HistoryWriter, disabled_collector, disabled_metrics
from exporter.service.app import ExporterService
from exporter.service.derivation import DerivedSnapshot, derive
from exporter.service.selfmetrics import SelfMetrics
from exporter.snapshot import PolicyReading, Snapshot

T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)


def snapshot(i: int) -> Snapshot:
    readings = (
        PolicyReading("ENTRIES_WRITE", 900 - 10 * i, 1000, 20, 60),
        PolicyReading("KEYS", 5, 10, 1, 1),
    )
    return Snapshot(T0 + timedelta(seconds=30 * i), f"c{i}", "A", readings)


def derived(count: int) -> list[DerivedSnapshot]:
    result: list[DerivedSnapshot] = []
    for i in range(count):
        result.append(derive(snapshot(i), result[-1] if result else None))
    return result


async def until(predicate: Callable[[], object]) -> None:
    async with asyncio.timeout(20):
        while not predicate():  # noqa: ASYNC110 - plain attributes and metric values, no event to wait on
            await asyncio.sleep(0.01)


def sample(writer: HistoryWriter, name: str, **labels: str) -> float | None:
    registry = CollectorRegistry()
    registry.register(writer.collector)
    return registry.get_sample_value(name, labels)


def fresh(writer: HistoryWriter) -> bytes:
    registry = CollectorRegistry()
    registry.register(writer.collector)
    return generate_latest(registry)


async def test_cached_history_metrics_equal_a_fresh_render_through_every_change(database_url: str) -> None:
    writer = HistoryWriter(database_url, queue_size=2, maintenance_interval=3600, retry_max_delay=0.1)
    batch = derived(4)
    seen: list[bytes] = []

    def check() -> None:
        cached = writer.render_metrics()
        assert cached == fresh(writer)
        seen.append(cached)

    check()
    assert writer.render_metrics() is seen[-1]  # nothing changed: the same bytes, not rendered again
    for item in batch[:3]:  # queue of 2: the first is dropped (dropped_total, queue depth)
        writer.submit(item)
        check()
    await writer.start()  # unmigrated database: writes and maintenance fail (write_errors, runs{failure})
    await until(lambda: sample(writer, "dict_rate_limit_history_write_errors_total", kind="query"))
    check()
    await asyncio.to_thread(migrations.apply, database_url)
    await until(lambda: writer.queue_depth == 0)  # the queue is written (rows, durations, depth 0)
    check()
    # The write loop is idle now: what follows changes the metrics only through the calls below.
    assert await writer.write(batch[3]) == 2
    check()
    await writer.maintenance.run_once()  # runs{success}, last success timestamp
    check()
    await writer.stop()
    check()
    assert len(set(seen)) >= 5  # the values did change along the way
    for moved in (b"dict_rate_limit_history_rows_written_total 0.0", b'runs_total{result="failure"} 0.0'):
        assert moved in seen[0]
        assert moved not in seen[-1]


def test_disabled_history_metrics_are_those_of_the_disabled_collector() -> None:
    registry = CollectorRegistry()
    registry.register(disabled_collector())
    assert disabled_metrics() == generate_latest(registry)


async def test_whole_exposition_with_history_on_equals_an_uncached_render(database_url: str) -> None:
    migrations.apply(database_url)
    snapshots = iter([snapshot(i) for i in range(4)])

    async def fetch(_deadline: float | None) -> BridgeResult:
        return BridgeResult(next(snapshots), ())

    settings = ExporterSettings(
        database_url=database_url, log_level="warning", maintenance_interval_seconds=3600
    )
    service = ExporterService(settings, fetch=fetch, serve_http=False)
    await service.start()
    try:
        history = service.history
        assert isinstance(history, HistoryWriter)
        for _ in range(3):
            await service.poller.poll_once()
            await until(lambda: history.queue_depth == 0)
            plain = service.metrics_body(gzip=False)
            assert _steady(plain) == _steady(_uncached(service))
            assert _steady(gzip.decompress(service.metrics_body(gzip=True))) == _steady(plain)
    finally:
        await service.stop()


def _steady(exposition: bytes) -> bytes:
    """Without process_* (CPU time and memory move between two renders: read live, never cached)."""
    return b"\n".join(line for line in exposition.split(b"\n") if b"process_" not in line)


def _uncached(service: ExporterService) -> bytes:
    """Every part rendered from scratch: buckets, the self-metrics, the history, the poller lease's gauges."""
    metrics: SelfMetrics = service.metrics
    history: Any = service.history
    lease = generate_latest(service._poller_registry)
    return service._rendered.text + generate_latest(metrics.registry) + fresh(history) + lease
