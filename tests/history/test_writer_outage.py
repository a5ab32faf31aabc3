"""PostgreSQL outages seen by the history writer: a real TCP proxy between the writer and the server is
stopped mid-run and started again; submit() never blocks; what fits in the queue is written once, in order."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from exporter.history import migrations
from exporter.history.writer import HistoryWriter
from tests.history.test_writer import POLICIES, drained, eventually, rows, sample, snapshots
from tests.support.tcp_proxy import TcpProxy


@pytest.fixture
def proxy(database_url: str) -> Iterator[TcpProxy]:
    migrations.apply(database_url)
    with TcpProxy.for_postgres(database_url) as running:
        yield running


def submit_all(writer: HistoryWriter, batch: list) -> float:  # type: ignore[type-arg]
    """Submit every snapshot; return the slowest submit() in seconds."""
    slowest = 0.0
    for derived in batch:
        started = time.perf_counter()
        writer.submit(derived)
        slowest = max(slowest, time.perf_counter() - started)
    return slowest


def connection_errors(writer: HistoryWriter) -> float:
    return sample(writer, "dict_rate_limit_history_write_errors_total", {"kind": "connection"}) or 0


async def test_an_outage_delays_snapshots_and_loses_none_within_the_queue(
    database_url: str, proxy: TcpProxy
) -> None:
    writer = HistoryWriter(proxy.url_for(database_url), queue_size=50, retry_max_delay=0.3)
    await writer.start()
    batch = snapshots(40)
    submit_all(writer, batch[:10])
    await drained(writer)
    assert writer.database_ok

    proxy.stop()
    assert submit_all(writer, batch[10:35]) < 0.01  # the poller is never held up by the database
    await eventually(lambda: connection_errors(writer) > 0 and not writer.database_ok)
    assert writer.queue_depth >= 24
    assert sample(writer, "dict_rate_limit_history_queue_depth") == writer.queue_depth

    proxy.start()
    submit_all(writer, batch[35:])
    await drained(writer)
    assert writer.database_ok
    await writer.stop()

    stored = rows(
        database_url,
        "SELECT response_time, count(*), count(DISTINCT endpoint_id) FROM dict_rate_limit_states"
        " GROUP BY response_time ORDER BY min(created_at)",
    )
    # Every snapshot exactly once (3 policies each), written in the order it was taken.
    assert stored == [(d.snapshot.response_time, len(POLICIES), len(POLICIES)) for d in batch]
    assert sample(writer, "dict_rate_limit_history_dropped_total") == 0
    assert sample(writer, "dict_rate_limit_history_rows_written_total") == 40 * len(POLICIES)


async def test_an_outage_longer_than_the_queue_keeps_the_newest_and_counts_the_rest(
    database_url: str, proxy: TcpProxy
) -> None:
    proxy.stop()  # down before the writer even starts: start() must not fail
    writer = HistoryWriter(proxy.url_for(database_url), queue_size=5, retry_max_delay=0.3)
    await writer.start()
    batch = snapshots(12)
    submit_all(writer, batch)
    await eventually(lambda: connection_errors(writer) > 0)
    assert not writer.database_ok
    assert writer.queue_depth == 5
    assert sample(writer, "dict_rate_limit_history_dropped_total") == 7

    proxy.start()
    await drained(writer)
    await writer.stop()
    stored = rows(database_url, "SELECT DISTINCT response_time FROM dict_rate_limit_states ORDER BY 1")
    assert [t for (t,) in stored] == [d.snapshot.response_time for d in batch[7:]]
