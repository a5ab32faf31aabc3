"""The SQL of the history writer and the rows it sends (one per policy of a snapshot)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from psycopg import sql

from exporter.config import PolicyThreshold
from exporter.service.derivation import DerivedSnapshot, PolicyState

STATE_COLUMNS = (
    "endpoint_id",
    "psp_category",
    "available_tokens",
    "capacity",
    "refill_tokens",
    "refill_period_sec",
    "utilization_percent",
    "remaining_ratio",
    "consumption_rate_per_minute",
    "consumed_tokens",
    "recovery_eta_seconds",
    "exhaustion_projection_seconds",
    "error_404_rate",
    "response_time",
    "correlation_id",
)
_COLUMNS = sql.SQL(", ").join(map(sql.Identifier, STATE_COLUMNS))
COPY_STATES = sql.SQL("COPY dict_rate_limit_states ({}) FROM STDIN").format(_COLUMNS)
# The path for a snapshot that is (partly) stored already: a retry after a lost commit acknowledgement, or
# another replica. The temporary table is created once per pooled connection, with its own column list so
# that it exists even before `migrate` has run; no ON COMMIT DELETE ROWS, which truncates at every commit
# (measured: ~4 ms per transaction, more than the whole write).
CREATE_INCOMING = b"""
CREATE TEMP TABLE IF NOT EXISTS dict_rate_limit_states_incoming (
    endpoint_id text, psp_category char(1), available_tokens bigint, capacity bigint, refill_tokens bigint,
    refill_period_sec bigint, utilization_percent double precision, remaining_ratio double precision,
    consumption_rate_per_minute double precision, consumed_tokens double precision,
    recovery_eta_seconds double precision, exhaustion_projection_seconds double precision,
    error_404_rate double precision, response_time timestamptz, correlation_id text
)"""
CLEAR_INCOMING = b"DELETE FROM dict_rate_limit_states_incoming"
COPY_INCOMING = sql.SQL("COPY dict_rate_limit_states_incoming ({}) FROM STDIN").format(_COLUMNS)
INSERT_INCOMING = sql.SQL(
    "INSERT INTO dict_rate_limit_states ({columns}) SELECT {columns} FROM dict_rate_limit_states_incoming"
    " ON CONFLICT (endpoint_id, response_time) DO NOTHING"
).format(columns=_COLUMNS)
# A replayed older snapshot never rolls a policy's values back (the WHERE on last_seen_at), but a row
# stamped in the far future (a bad clock, a forged answer already stored) does not freeze it either.
UPSERT_POLICIES = b"""
INSERT INTO dict_rate_limit_policies AS p (endpoint_id, psp_category, capacity, refill_tokens,
    refill_period_sec, warning_threshold_percent, critical_threshold_percent, first_seen_at, last_seen_at)
SELECT endpoint_id, %(category)s, capacity, refill_tokens, refill_period_sec, warning, critical,
       %(seen)s, %(seen)s
  FROM unnest(%(names)s::text[], %(capacity)s::bigint[], %(refill)s::bigint[], %(period)s::bigint[],
              %(warning)s::float8[], %(critical)s::float8[])
       AS t (endpoint_id, capacity, refill_tokens, refill_period_sec, warning, critical)
ON CONFLICT (endpoint_id, psp_category) DO UPDATE
   SET capacity = EXCLUDED.capacity, refill_tokens = EXCLUDED.refill_tokens,
       refill_period_sec = EXCLUDED.refill_period_sec,
       warning_threshold_percent = EXCLUDED.warning_threshold_percent,
       critical_threshold_percent = EXCLUDED.critical_threshold_percent,
       first_seen_at = least(p.first_seen_at, EXCLUDED.first_seen_at),
       last_seen_at = EXCLUDED.last_seen_at, updated_at = now()
 WHERE p.last_seen_at <= EXCLUDED.last_seen_at OR p.last_seen_at > now() + interval '1 day'"""
SET_ASIDE = b"""
INSERT INTO dict_rate_limit_rejected_snapshots
    (response_time, correlation_id, psp_category, reason, error, snapshot)
VALUES (%s, %s, %s, %s, %s, %s)"""
#: Set-aside snapshots are evidence for an operator, not history: a month of them is plenty, and a Bridge
#: answering poison at every poll must not grow the table without bound.
PRUNE_SET_ASIDE = (
    b"DELETE FROM dict_rate_limit_rejected_snapshots WHERE rejected_at < now() - interval '30 days'"
)


def rows_of(
    derived: DerivedSnapshot, thresholds: Callable[[str], PolicyThreshold] | None
) -> list[tuple[Any, ...]]:
    """The COPY rows of one snapshot (a policy name appearing twice is kept once: the first)."""
    snapshot = derived.snapshot
    seen: set[str] = set()
    rows = []
    for state in derived.states:
        name = state.reading.name
        if name in seen:
            continue
        seen.add(name)
        rows.append(
            (
                *_state_values(state, snapshot.category),
                snapshot.response_time,
                snapshot.correlation_id,
                *_percentages(name, thresholds),
            )
        )
    return rows


def _state_values(state: PolicyState, category: str) -> tuple[Any, ...]:
    r = state.reading
    return (
        r.name, category, r.available_tokens, r.capacity, r.refill_tokens, r.refill_period_sec,
        state.utilization_percent, state.remaining_ratio, state.consumption_rate_per_minute,
        state.consumed_tokens, state.recovery_eta_seconds, state.exhaustion_projection_seconds,
        r.error_404_rate,
    )  # fmt: skip


def policy_params(derived: DerivedSnapshot, rows: list[tuple[Any, ...]]) -> dict[str, Any]:
    """Parameters of UPSERT_POLICIES: one array per column, in the order of ``rows``."""
    return {
        "category": derived.snapshot.category,
        "seen": derived.snapshot.response_time,
        "names": [row[0] for row in rows],
        "capacity": [row[3] for row in rows],
        "refill": [row[4] for row in rows],
        "period": [row[5] for row in rows],
        "warning": [row[-2] for row in rows],
        "critical": [row[-1] for row in rows],
    }


def _percentages(name: str, thresholds: Callable[[str], PolicyThreshold] | None) -> tuple[float, float]:
    if thresholds is None:
        return (20.0, 10.0)
    threshold = thresholds(name)
    return (threshold.warning * 100.0, threshold.critical * 100.0)
