"""The report's SQL: one pass over each policy's rows into hourly buckets, then small queries on those.

The raw rows never reach Python. Each policy's rows of the period are read once (primary-key order, so the
window functions need no sort) and folded into one row per UTC hour in the temporary table
``report_hours``; days, the week-by-hour grid, months, category changes and gaps are then aggregated from
that table (about 9 000 rows per policy and year).

Sampling: every state row stands for the time until the next row of its policy, capped at
``max_sample_seconds`` (twice the poll interval), so a history outage is not counted as time spent in the
last state seen before it; the rest of a longer interval is a *gap*. The newest row of a policy in the period
stands for one poll interval. Time is attributed to the hour its row starts in.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

#: The column that tells participants apart (sql/0008: the `participant` label of a multi-participant
#: exporter, '' for a single participant).
PARTICIPANT_COLUMN = "participant"

CREATE_HOURS = b"""
CREATE TEMPORARY TABLE report_hours (
    endpoint_id       text             NOT NULL,
    hour              timestamp        NOT NULL,
    psp_category      char(1)          NOT NULL,
    capacity          bigint           NOT NULL,
    refill_tokens     bigint           NOT NULL,
    refill_period_sec bigint           NOT NULL,
    warning_percent   double precision NOT NULL,
    critical_percent  double precision NOT NULL,
    samples           bigint           NOT NULL,
    first_sample      timestamptz      NOT NULL,
    last_sample       timestamptz      NOT NULL,
    min_ratio         double precision NOT NULL,
    consumed          double precision,
    peak_rate         double precision,
    covered_s         double precision NOT NULL,
    warning_s         double precision NOT NULL,
    critical_s        double precision NOT NULL,
    zero_s            double precision NOT NULL,
    gaps              jsonb
) ON COMMIT DROP"""

# The one pass per policy. {participant} is empty or "AND st.<column> = %(participant)s"; {warn} and
# {crit} are CASEs over the policy's categories with their thresholds as parameters (read beforehand from
# dict_rate_limit_policies: a join per row costs a fifth of the pass). A category change inside an hour
# gives that hour two rows.
HOURS_OF_POLICY = """
WITH s AS (
    SELECT st.response_time AS t,
           st.psp_category AS category,
           st.capacity, st.refill_tokens, st.refill_period_sec,
           st.available_tokens, st.remaining_ratio, st.consumed_tokens, st.consumption_rate_per_minute,
           lead(st.response_time) OVER w AS next_t
      FROM dict_rate_limit_states st
     WHERE st.endpoint_id = %(endpoint)s
       AND st.response_time >= %(since)s AND st.response_time < %(until)s {participant}
    WINDOW w AS (ORDER BY st.response_time)
), d AS (
    SELECT s.*,
           extract(epoch FROM least(coalesce(s.next_t, s.t + %(interval)s), s.t + %(cap)s, %(until)s) - s.t)
               ::double precision AS covered,
           ({warn})::double precision AS warn_pct,
           ({crit})::double precision AS crit_pct
      FROM s
)
SELECT %(endpoint)s, date_trunc('hour', t, 'UTC') AT TIME ZONE 'UTC',
       category, max(capacity), max(refill_tokens), max(refill_period_sec), max(warn_pct), max(crit_pct),
       count(*), min(t), max(t), min(remaining_ratio), sum(consumed_tokens), max(consumption_rate_per_minute),
       sum(covered),
       coalesce(sum(covered) FILTER (WHERE remaining_ratio * 100 <= warn_pct), 0),
       coalesce(sum(covered) FILTER (WHERE remaining_ratio * 100 <= crit_pct), 0),
       coalesce(sum(covered) FILTER (WHERE available_tokens <= 0), 0),
       jsonb_agg(jsonb_build_object('start', t, 'end', next_t))
           FILTER (WHERE next_t - t > %(cap)s)
  FROM d
 GROUP BY 2, category
"""

# {participant}: empty, or "WHERE participant = %(participant)s" (each participant has its thresholds).
POLICIES = """
SELECT endpoint_id, min(first_seen_at) AS first_seen, max(last_seen_at) AS last_seen,
       array_agg(psp_category::text ORDER BY psp_category) AS categories,
       array_agg(warning_threshold_percent ORDER BY psp_category) AS warning_percents,
       array_agg(critical_threshold_percent ORDER BY psp_category) AS critical_percents
  FROM dict_rate_limit_policies {participant}
 GROUP BY endpoint_id
HAVING max(last_seen_at) >= %(since)s AND min(first_seen_at) < %(until)s
 ORDER BY endpoint_id
"""

DAYS = b"""
SELECT endpoint_id, date_trunc('day', hour)::date AS day,
       min(min_ratio) * 100 AS min_remaining_percent,
       sum(consumed) AS consumed_tokens,
       max(peak_rate) AS peak_rate_per_minute,
       sum(covered_s) AS covered_s, sum(warning_s) AS warning_s, sum(critical_s) AS critical_s,
       sum(zero_s) AS zero_s,
       min(refill_tokens::double precision * 86400 / refill_period_sec + capacity) AS daily_allowance,
       min(warning_percent) AS warning_percent, min(critical_percent) AS critical_percent
  FROM report_hours
 GROUP BY 1, 2
 ORDER BY 1, 2
"""

# isodow 1 = Monday. The cell is the mean consumption of the hours that have data (NULL: none).
WEEK_HOURS = b"""
SELECT endpoint_id, extract(isodow FROM hour)::int - 1 AS weekday,
       extract(hour FROM hour)::int AS hour_of_day,
       sum(consumed) / count(DISTINCT hour) AS mean_consumed
  FROM report_hours
 WHERE consumed IS NOT NULL
 GROUP BY 1, 2, 3
"""

MONTHS = b"""
WITH days AS (
    -- Rounded so that days of equal consumption tie whatever the order the floats were summed in.
    SELECT endpoint_id, date_trunc('day', hour) AS day, round(sum(consumed)::numeric, 6) AS consumed
      FROM report_hours GROUP BY 1, 2
), peaks AS (
    SELECT DISTINCT ON (endpoint_id, date_trunc('month', day)) endpoint_id, date_trunc('month', day) AS month,
           consumed::double precision AS peak_day_consumed, day AS peak_day
      FROM days
     WHERE consumed IS NOT NULL
     ORDER BY endpoint_id, date_trunc('month', day), consumed DESC, day
)
SELECT h.endpoint_id, h.month::date AS month, h.consumed_tokens, d.peak_day_consumed, d.peak_day::date,
       h.covered_s, h.warning_s, h.critical_s, h.zero_s
  FROM (SELECT endpoint_id, date_trunc('month', hour) AS month, sum(consumed) AS consumed_tokens,
               sum(covered_s) AS covered_s, sum(warning_s) AS warning_s, sum(critical_s) AS critical_s,
               sum(zero_s) AS zero_s
          FROM report_hours GROUP BY 1, 2) h
  LEFT JOIN peaks d ON d.endpoint_id = h.endpoint_id AND d.month = h.month
 ORDER BY 1, 2
"""

SUMMARY = b"""
SELECT endpoint_id, sum(samples)::bigint AS samples, min(first_sample) AS first_sample,
       max(last_sample) AS last_sample, sum(covered_s) AS covered_s, sum(warning_s) AS warning_s,
       sum(critical_s) AS critical_s, sum(zero_s) AS zero_s
  FROM report_hours
 GROUP BY 1
"""

# The latest category (and its bucket) of each policy in the period: the basis of the projection.
CURRENT = b"""
SELECT DISTINCT ON (endpoint_id) endpoint_id, psp_category, capacity, refill_tokens, refill_period_sec,
       warning_percent, critical_percent
  FROM report_hours
 ORDER BY endpoint_id, last_sample DESC
"""

# A category change is where an hour's category differs from the previous hour row's (an hour holding a
# change has one row per category); its time is the first snapshot of the new category, to the second.
CHANGES = b"""
SELECT endpoint_id, first_sample AS at, previous AS from_category, psp_category AS to_category
  FROM (SELECT endpoint_id, first_sample, psp_category,
               lag(psp_category) OVER (PARTITION BY endpoint_id ORDER BY first_sample) AS previous
          FROM report_hours) h
 WHERE previous <> psp_category
 ORDER BY 1, 2
"""

GAPS = b"""
SELECT h.endpoint_id, (g->>'start')::timestamptz AS start, (g->>'end')::timestamptz AS "end"
  FROM report_hours h, jsonb_array_elements(h.gaps) g
 ORDER BY 1, 2
"""

# Alerts overlapping the period: started before its end and not ended before its start. {participant}:
# empty, or the alerts of one participant (its `participant` label).
ALERTS = """
SELECT endpoint_id, alert_name, severity, status, starts_at, coalesce(resolved_at, ends_at) AS ended_at,
       summary
  FROM dict_rate_limit_alerts
 WHERE starts_at < %(until)s
   AND (status = 'firing' OR coalesce(resolved_at, ends_at, starts_at) >= %(since)s) {participant}
 ORDER BY endpoint_id NULLS FIRST, starts_at
"""

# The participants whose policies were seen in the period.
PARTICIPANTS = b"""
SELECT DISTINCT participant FROM dict_rate_limit_policies
 WHERE last_seen_at >= %(since)s AND first_seen_at < %(until)s
 ORDER BY 1
"""


@dataclass(frozen=True, slots=True)
class Period:
    """The report's half-open period [since, until) and how samples are weighted."""

    since: datetime
    until: datetime
    poll_interval_seconds: float
    participant: str | None = None

    @property
    def max_sample_seconds(self) -> float:
        return 2 * self.poll_interval_seconds


class ParticipantUnsupported(Exception):
    """--participant names no participant of the history, or is missing where several are."""


Rows = list[dict[str, Any]]


@dataclass(slots=True)
class Aggregates:
    """Every aggregate the figures are built from (rows as dicts, small)."""

    policies: Rows
    summary: Rows
    current: Rows
    days: Rows
    week_hours: Rows
    months: Rows
    changes: Rows
    gaps: Rows
    alerts: Rows


def participant_column(conn: psycopg.Connection[Any]) -> str | None:
    """The participant column of dict_rate_limit_states, if this schema has one (0008 and later)."""
    row = conn.execute(
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_name = 'dict_rate_limit_states' AND column_name = %s",
        [PARTICIPANT_COLUMN],
    ).fetchone()
    return None if row is None else str(row[0])


@dataclass(frozen=True, slots=True)
class Clauses:
    """The participant filter of each query that reads rows of several participants."""

    states: sql.Composable
    policies: sql.Composable
    alerts: sql.Composable


NO_FILTER = Clauses(sql.SQL(""), sql.SQL(""), sql.SQL(""))


def _participant_clauses(conn: psycopg.Connection[Any], period: Period) -> Clauses:
    """One participant's rows: the one asked for, or the only one there is. Several and none chosen is
    refused: summing two participants' buckets of the same policy would report a bucket nobody has."""
    if participant_column(conn) is None:
        if period.participant is not None:
            raise ParticipantUnsupported(
                "dict_rate_limit_states has no participant column (a schema before 0008); "
                "run dict-rate-limit migrate, or run without --participant"
            )
        return NO_FILTER
    names = [str(name) for (name,) in conn.execute(PARTICIPANTS, params(period)).fetchall()]
    if period.participant is None:
        if len(names) > 1:
            raise ParticipantUnsupported(
                f"the history of the period holds {len(names)} participants ({_listed(names)}): "
                "choose one with --participant NAME"
            )
        return NO_FILTER
    if names and period.participant not in names:
        raise ParticipantUnsupported(
            f"no participant {period.participant!r} in the period (known: {_listed(names)})"
        )
    return Clauses(
        states=sql.SQL("AND st.participant = %(participant)s"),
        policies=sql.SQL("WHERE participant = %(participant)s"),
        alerts=sql.SQL("AND coalesce(labels ->> 'participant', '') = %(participant)s"),
    )


def _listed(names: list[str]) -> str:
    # '' is the participant of a single-participant exporter (no label).
    return ", ".join(repr(name) for name in names)


def params(period: Period, **extra: Any) -> dict[str, Any]:
    return {
        "since": period.since,
        "until": period.until,
        "interval": timedelta(seconds=period.poll_interval_seconds),
        "cap": timedelta(seconds=period.max_sample_seconds),
        "participant": period.participant,
        **extra,
    }


def _threshold_case(
    policy: dict[str, Any], column: str, default: float
) -> tuple[sql.Composable, dict[str, Any]]:
    """CASE category WHEN %(column_c0)s THEN %(column_v0)s ... ELSE default END, and its parameters."""
    values: dict[str, Any] = {f"{column}_default": default}
    branches = []
    for i, (category, percent) in enumerate(zip(policy["categories"], policy[column], strict=True)):
        values[f"{column}_c{i}"], values[f"{column}_v{i}"] = category, percent
        branches.append(
            sql.SQL("WHEN {} THEN {}").format(
                sql.Placeholder(f"{column}_c{i}"), sql.Placeholder(f"{column}_v{i}")
            )
        )
    case = sql.SQL("CASE category::text {} ELSE {}::double precision END").format(
        sql.SQL(" ").join(branches), sql.Placeholder(f"{column}_default")
    )
    return case, values


def _session(conn: psycopg.Connection[Any]) -> None:
    conn.execute("SET LOCAL TimeZone = 'UTC'")
    # The planner cannot know that date_trunc keeps the primary key's order: without a penalty on sorts
    # it sorts every policy's rows twice (for the window, then for the hours), on disk past work_mem.
    # With it, the window reads the index in order and the hours are hashed. JIT costs more than it saves
    # on a million rows of simple expressions.
    conn.execute("SET LOCAL enable_sort = off")
    conn.execute("SET LOCAL work_mem = '64MB'")
    conn.execute("SET LOCAL jit = off")


def _passes(
    policies: Rows, participant: sql.Composable, period: Period
) -> list[tuple[sql.Composed, dict[str, Any]]]:
    """The COPY ... TO STDOUT of each policy's pass, its values bound client-side (COPY takes no
    server-side parameters; psycopg quotes them)."""
    passes = []
    for policy in policies:
        warn, warn_values = _threshold_case(policy, "warning_percents", 20.0)
        crit, crit_values = _threshold_case(policy, "critical_percents", 10.0)
        select = sql.SQL(HOURS_OF_POLICY).format(participant=participant, warn=warn, crit=crit)
        values = params(period, endpoint=policy["endpoint_id"], **warn_values, **crit_values)
        passes.append((sql.SQL("COPY ({}) TO STDOUT (FORMAT BINARY)").format(select), values))
    return passes


def _fill_hours(
    conn: psycopg.Connection[Any],
    database_url: str,
    snapshot: str,
    passes: list[tuple[sql.Composed, dict[str, Any]]],
    workers: int,
) -> None:
    """Runs the passes on ``workers`` connections sharing the main transaction's snapshot (so the report
    is one consistent view) and copies each policy's hours into the main session's report_hours. A window
    function runs on one core; PostgreSQL would not parallelise it, two connections do."""
    lock = threading.Lock()

    def work(chunk: list[tuple[sql.Composed, dict[str, Any]]]) -> None:
        with psycopg.connect(database_url, connect_timeout=10) as worker, worker.transaction():
            worker.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            worker.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
            _session(worker)
            for statement, values in chunk:
                data = bytearray()
                with worker.cursor().copy(statement, values) as out:
                    for block in out:
                        data += block
                with lock, conn.cursor().copy(b"COPY report_hours FROM STDIN (FORMAT BINARY)") as into:
                    into.write(data)

    chunks = [passes[i::workers] for i in range(workers) if passes[i::workers]]
    with ThreadPoolExecutor(max_workers=max(1, len(chunks)), thread_name_prefix="report-pass") as pool:
        for future in [pool.submit(work, chunk) for chunk in chunks]:
            future.result()


def collect(database_url: str, period: Period, workers: int = 2) -> Aggregates:
    """Runs every query of the report on one snapshot of the history: the per-policy passes on ``workers``
    connections, the rest on the main one."""
    with psycopg.connect(database_url, connect_timeout=10) as conn, conn.transaction():
        # Not READ ONLY: the temporary table is a CREATE, which a read-only transaction refuses.
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        _session(conn)
        conn.execute(CREATE_HOURS)
        clauses = _participant_clauses(conn, period)
        policies = _fetch(conn, sql.SQL(POLICIES).format(participant=clauses.policies), params(period))
        snapshot = str(conn.execute("SELECT pg_export_snapshot()").fetchone()[0])  # type: ignore[index]
        _fill_hours(conn, database_url, snapshot, _passes(policies, clauses.states, period), workers)
        conn.execute("SET LOCAL enable_sort = on")
        p = params(period)
        return Aggregates(
            policies=policies,
            summary=_fetch(conn, SUMMARY, p),
            current=_fetch(conn, CURRENT, p),
            days=_fetch(conn, DAYS, p),
            week_hours=_fetch(conn, WEEK_HOURS, p),
            months=_fetch(conn, MONTHS, p),
            changes=_fetch(conn, CHANGES, p),
            gaps=_fetch(conn, GAPS, p),
            alerts=_fetch(conn, sql.SQL(ALERTS).format(participant=clauses.alerts), p),
        )


def _fetch(conn: psycopg.Connection[Any], query: bytes | sql.Composed, values: dict[str, Any]) -> Rows:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query, values)
        return cur.fetchall()
