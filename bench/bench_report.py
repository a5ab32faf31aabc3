"""Report benchmark: ``dict-rate-limit report`` over a year of 30-second snapshots of 30 policies, timed
against the SQL aggregation alone (the floor: the report cannot be faster than its queries).

    .venv/bin/python -m bench.bench_report                     # full size: 31,536,000 rows (~6 min to load)
    .venv/bin/python -m bench.bench_report --rows 3000000      # quick run: the last 35 days
    .venv/bin/python -m bench.bench_report --database-url postgresql://postgres@127.0.0.1:5432/postgres

The rows are loaded with COPY (text, one stream per month) into a database created for the run and dropped
afterwards (on the embedded server unless ``--database-url`` names an administrative database). Each of the
30 policies gets a daily and weekly rhythm, bursts, a category change and a two-hour gap, so every FILTER and
window of the queries has work to do. Target: the full report (HTML with 60 charts) in under a minute.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from psycopg import sql

from bench.bench_history import bench_database
from exporter import cli
from exporter.history import migrations
from exporter.report import queries

POLICIES = 30
STEP = timedelta(seconds=30)
FULL_ROWS = POLICIES * 365 * 2880  # 31,536,000
END = datetime(2026, 11, 1, tzinfo=UTC)
COLUMNS = (
    "endpoint_id", "psp_category", "available_tokens", "capacity", "refill_tokens", "refill_period_sec",
    "utilization_percent", "remaining_ratio", "consumption_rate_per_minute", "consumed_tokens",
    "recovery_eta_seconds", "response_time", "correlation_id", "created_at",
)  # fmt: skip
COPY = sql.SQL("COPY dict_rate_limit_states ({}) FROM STDIN").format(
    sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
)
POLICY_ROWS = """
INSERT INTO dict_rate_limit_policies (endpoint_id, psp_category, capacity, refill_tokens, refill_period_sec,
       first_seen_at, last_seen_at)
SELECT endpoint_id, psp_category, max(capacity), max(refill_tokens), max(refill_period_sec),
       %(since)s, %(end)s
  FROM (SELECT DISTINCT endpoint_id, psp_category, capacity, refill_tokens, refill_period_sec
          FROM dict_rate_limit_states WHERE response_time >= %(end)s - interval '60 days'
        UNION
        SELECT DISTINCT endpoint_id, psp_category, capacity, refill_tokens, refill_period_sec
          FROM dict_rate_limit_states WHERE response_time < %(since)s + interval '60 days') AS seen
 GROUP BY endpoint_id, psp_category
"""


def _lines(policy: int, start: datetime, count: int, since: datetime) -> Iterator[str]:
    """Text COPY lines of one policy: ~1 us of Python per row, the rest is the server's."""
    name = f"POLICY_{policy:02d}"
    change = since + timedelta(days=120 + 5 * policy)
    gap = (since + timedelta(days=200 + policy, hours=3), since + timedelta(days=200 + policy, hours=5))
    seed = policy * 7919
    for i in range(count):
        t = start + i * STEP
        if gap[0] <= t < gap[1]:
            continue
        category, capacity, refill = ("A", 12000, 1200) if t < change else ("B", 18000, 1800)
        seed = (seed * 1103515245 + 12345) % 2147483648
        hour = t.hour + t.minute / 60
        rhythm = 0.2 + 0.8 * max(0.0, math.sin(math.pi * (hour - 7) / 13)) * (1.0 if t.weekday() < 5 else 0.5)
        growth = 1 + (t - since).days / 365 * (0.05 + policy / 100)
        pressure = min(1.05, rhythm * growth * (0.3 + policy / 60) + (0.4 if seed % 5000 == 0 else 0.0))
        available = round(capacity * (1 - pressure))
        consumed = round(rhythm * growth * (200 + 10 * policy) * (1 + seed % 100 / 500), 2)
        ratio = available / capacity
        stamp = t.isoformat()
        yield (
            f"{name}\t{category}\t{available}\t{capacity}\t{refill}\t60\t"
            f"{100 - 100 * ratio:.4f}\t{ratio:.6f}\t"
            f"{consumed * 2}\t{consumed}\t{max(0.0, (capacity - available) / refill * 60):.1f}\t{stamp}\t"
            f"c{i}\t{stamp}\n"
        )


def load(url: str, rows: int) -> tuple[datetime, float]:
    """COPY ``rows`` rows (30 policies, ending at END); returns the first timestamp and the seconds taken."""
    per_policy = rows // POLICIES
    since = END - per_policy * STEP
    started = time.monotonic()
    with psycopg.connect(url) as conn:
        month = since.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        while month < END:
            conn.execute("SELECT create_dict_rate_limit_state_partition(%s::date)", [month.date()])
            month = (month + timedelta(days=32)).replace(day=1)
        conn.commit()
        chunk = 30 * 2880  # a month of one policy per COPY: bounded memory, visible progress
        for offset in range(0, per_policy, chunk):
            count = min(chunk, per_policy - offset)
            with conn.cursor().copy(COPY) as copy:
                for policy in range(1, POLICIES + 1):
                    block = "".join(_lines(policy, since + offset * STEP, count, since))
                    copy.write(block.encode())
            conn.commit()
            done = (offset + count) * POLICIES
            print(f"  loaded {done:,} rows ({done / (time.monotonic() - started):,.0f} rows/s)", flush=True)
        conn.execute(POLICY_ROWS, {"since": since, "end": END})
        conn.commit()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE) dict_rate_limit_states")
    return since, time.monotonic() - started


def time_sql(url: str, period: queries.Period) -> float:
    started = time.monotonic()
    aggregates = queries.collect(url, period)
    assert len(aggregates.policies) == POLICIES, len(aggregates.policies)
    return time.monotonic() - started


def time_report(url: str, since: datetime, fmt: str, output: Path) -> float:
    started = time.monotonic()
    code = cli.main(
        ["report", "--log-level", "warning", "--database-url", url, "--since", since.isoformat(),
         "--until", END.isoformat(), "--format", fmt, "--output", str(output)]
    )  # fmt: skip
    assert code == 0, code
    return time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=FULL_ROWS, help=f"rows to load (full size {FULL_ROWS:,})")
    parser.add_argument(
        "--database-url", help="administrative database of the server to use (default: embedded)"
    )
    parser.add_argument("--quick", action="store_true", help="35 days of history instead of a year")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows = min(args.rows, 3_000_000)
    with bench_database(args.database_url) as url, tempfile.TemporaryDirectory() as out:
        migrations.apply(url)
        with psycopg.connect(url) as conn:
            print(f"PostgreSQL {conn.info.parameter_status('server_version')}")
        since, seconds = load(url, args.rows)
        print(f"loaded {args.rows:,} rows with COPY in {seconds:.0f} s ({args.rows / seconds:,.0f} rows/s)")
        period = queries.Period(since, END, 30.0)
        sql_seconds = min(time_sql(url, period) for _ in range(2))
        html_seconds = time_report(url, since, "html", Path(out) / "report.html")
        json_seconds = time_report(url, since, "json", Path(out) / "report.json")
        size = (Path(out) / "report.html").stat().st_size
        print(f"SQL aggregation alone (best of 2): {sql_seconds:.2f} s")
        print(
            f"report --format html: {html_seconds:.2f} s ({html_seconds / sql_seconds:.2f}x the SQL), "
            f"{size:,} bytes"
        )
        print(f"report --format json: {json_seconds:.2f} s ({json_seconds / sql_seconds:.2f}x the SQL)")
        if args.rows >= FULL_ROWS:
            verdict = "meets" if html_seconds < 60 else "MISSES"
            print(f"full-size report in {html_seconds:.1f} s {verdict} the 60 s target")
    return 0


if __name__ == "__main__":
    sys.exit(main())
