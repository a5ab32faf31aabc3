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

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

#: Column names another release may add to dict_rate_limit_states to tell participants apart (ISPB).
PARTICIPANT_COLUMNS = ("participant_ispb", "participant", "ispb")

CREATE_HOURS = b"""
CREATE TEMPORARY TABLE report_hours (
    endpoint_id       text             NOT NULL,
    hour              timestamp        NOT NULL,
    psp_category      char(1)          NOT NULL,
    capacity          bigint           NOT NULL,
    refill_tokens     bigint           NOT NULL,
    refill_period_sec integer          NOT NULL,
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
    changes           jsonb,
    gaps              jsonb
) ON COMMIT DROP"""

# The one pass per policy. {participant} is empty or "AND st.<column> = %(participant)s".
HOURS_OF_POLICY = """
INSERT INTO report_hours
WITH s AS (
    SELECT st.response_time AS t,
           st.psp_category AS category,
           st.capacity, st.refill_tokens, st.refill_period_sec,
           st.available_tokens, st.remaining_ratio, st.consumed_tokens, st.consumption_rate_per_minute,
           lag(st.psp_category) OVER w AS prev_category,
           lead(st.response_time) OVER w AS next_t
      FROM dict_rate_limit_states st
     WHERE st.endpoint_id = %(endpoint)s
       AND st.response_time >= %(since)s AND st.response_time < %(until)s {participant}
    WINDOW w AS (ORDER BY st.response_time)
), d AS (
    SELECT s.*,
           extract(epoch FROM least(coalesce(s.next_t, s.t + %(interval)s), s.t + %(cap)s, %(until)s) - s.t)
               ::double precision AS covered,
           coalesce(p.warning_threshold_percent, 20) AS warn_pct,
           coalesce(p.critical_threshold_percent, 10) AS crit_pct
      FROM s
      LEFT JOIN dict_rate_limit_policies p ON p.endpoint_id = %(endpoint)s AND p.psp_category = s.category
)
SELECT %(endpoint)s, date_trunc('hour', t, 'UTC') AT TIME ZONE 'UTC',
       category, capacity, refill_tokens, refill_period_sec, warn_pct, crit_pct,
       count(*), min(t), max(t), min(remaining_ratio), sum(consumed_tokens), max(consumption_rate_per_minute),
       sum(covered),
       coalesce(sum(covered) FILTER (WHERE remaining_ratio * 100 <= warn_pct), 0),
       coalesce(sum(covered) FILTER (WHERE remaining_ratio * 100 <= crit_pct), 0),
       coalesce(sum(covered) FILTER (WHERE available_tokens <= 0), 0),
       jsonb_agg(jsonb_build_object('at', t, 'from', prev_category, 'to', category))
           FILTER (WHERE prev_category IS DISTINCT FROM category AND prev_category IS NOT NULL),
       jsonb_agg(jsonb_build_object('start', t, 'end', next_t))
           FILTER (WHERE next_t - t > %(cap)s)
  FROM d
 GROUP BY 2, category, capacity, refill_tokens, refill_period_sec, warn_pct, crit_pct
"""

POLICIES = b"""
SELECT endpoint_id, min(first_seen_at) AS first_seen, max(last_seen_at) AS last_seen
  FROM dict_rate_limit_policies
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
    SELECT endpoint_id, date_trunc('day', hour) AS day, sum(consumed) AS consumed
      FROM report_hours GROUP BY 1, 2
)
SELECT h.endpoint_id, h.month::date AS month, h.consumed_tokens, d.peak_day_consumed, d.peak_day::date,
       h.covered_s, h.warning_s, h.critical_s, h.zero_s
  FROM (SELECT endpoint_id, date_trunc('month', hour) AS month, sum(consumed) AS consumed_tokens,
               sum(covered_s) AS covered_s, sum(warning_s) AS warning_s, sum(critical_s) AS critical_s,
               sum(zero_s) AS zero_s
          FROM report_hours GROUP BY 1, 2) h
  LEFT JOIN LATERAL (
        SELECT days.consumed AS peak_day_consumed, days.day AS peak_day
          FROM days
         WHERE days.endpoint_id = h.endpoint_id AND date_trunc('month', days.day) = h.month
           AND days.consumed IS NOT NULL
         ORDER BY days.consumed DESC, days.day
         LIMIT 1) d ON true
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

CHANGES = b"""
SELECT h.endpoint_id, (c->>'at')::timestamptz AS at, c->>'from' AS from_category, c->>'to' AS to_category
  FROM report_hours h, jsonb_array_elements(h.changes) c
 ORDER BY 1, 2
"""

GAPS = b"""
SELECT h.endpoint_id, (g->>'start')::timestamptz AS start, (g->>'end')::timestamptz AS "end"
  FROM report_hours h, jsonb_array_elements(h.gaps) g
 ORDER BY 1, 2
"""

# Alerts overlapping the period: started before its end and not ended before its start.
ALERTS = b"""
SELECT endpoint_id, alert_name, severity, status, starts_at, coalesce(resolved_at, ends_at) AS ended_at,
       summary
  FROM dict_rate_limit_alerts
 WHERE starts_at < %(until)s
   AND (status = 'firing' OR coalesce(resolved_at, ends_at, starts_at) >= %(since)s)
 ORDER BY endpoint_id NULLS FIRST, starts_at
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
    """--participant was given but the history has no participant column."""


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
    """The participant column of dict_rate_limit_states, if this schema has one."""
    row = conn.execute(
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_name = 'dict_rate_limit_states' AND column_name = ANY(%s)"
        " ORDER BY array_position(%s, column_name::text) LIMIT 1",
        [list(PARTICIPANT_COLUMNS), list(PARTICIPANT_COLUMNS)],
    ).fetchone()
    return None if row is None else str(row[0])


def _participant_clause(conn: psycopg.Connection[Any], period: Period) -> sql.Composable:
    if period.participant is None:
        return sql.SQL("")
    column = participant_column(conn)
    if column is None:
        raise ParticipantUnsupported(
            "dict_rate_limit_states has no participant column (one database holds one participant's "
            "history today); run without --participant"
        )
    return sql.SQL("AND st.{} = %(participant)s").format(sql.Identifier(column))


def params(period: Period, **extra: Any) -> dict[str, Any]:
    return {
        "since": period.since,
        "until": period.until,
        "interval": timedelta(seconds=period.poll_interval_seconds),
        "cap": timedelta(seconds=period.max_sample_seconds),
        "participant": period.participant,
        **extra,
    }


def aggregate_hours(conn: psycopg.Connection[Any], period: Period) -> Rows:
    """Fills report_hours with one pass per policy; returns the policies considered."""
    conn.execute("SET LOCAL TimeZone = 'UTC'")
    conn.execute(CREATE_HOURS)
    statement = sql.SQL(HOURS_OF_POLICY).format(participant=_participant_clause(conn, period))
    policies = _fetch(conn, POLICIES, params(period))
    for policy in policies:
        conn.execute(statement, params(period, endpoint=policy["endpoint_id"]))
    return policies


def collect(conn: psycopg.Connection[Any], period: Period) -> Aggregates:
    """Runs every query of the report in one transaction (one consistent snapshot of the history)."""
    with conn.transaction():
        # Not READ ONLY: the temporary table is a CREATE, which a read-only transaction refuses.
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        policies = aggregate_hours(conn, period)
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
            alerts=_fetch(conn, ALERTS, p),
        )


def _fetch(conn: psycopg.Connection[Any], query: bytes, values: dict[str, Any]) -> Rows:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query, values)
        return cur.fetchall()
