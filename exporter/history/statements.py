"""The SQL of the history writer and the rows it sends (one per policy of a snapshot)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from psycopg import AsyncConnection, sql

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
    "participant",
)
#: The binary COPY types of STATE_COLUMNS (refill_period_sec is bigint since 0005). char(1) takes the text
#: encoding: their binary forms are equal.
STATE_TYPES = (
    "text", "text", "int8", "int8", "int8", "int8", "float8", "float8", "float8", "float8", "float8",
    "float8", "float8", "timestamptz", "text", "text",
)  # fmt: skip
_COLUMNS = sql.SQL(", ").join(map(sql.Identifier, STATE_COLUMNS))
# Binary: no number is formatted as text by the client nor parsed by the server (measured ~25 % of the
# COPY at 3,000 rows).
COPY_STATES = sql.SQL("COPY dict_rate_limit_states ({}) FROM STDIN (FORMAT BINARY)").format(_COLUMNS)
# The path for a snapshot that is (partly) stored already: a retry after a lost commit acknowledgement, or
# another replica. The temporary table is created once per pooled connection, with its own column list so
# that it exists even before `migrate` has run; no ON COMMIT DELETE ROWS, which truncates at every commit
# (measured: ~4 ms per transaction, more than the whole write).
CREATE_INCOMING = b"""
CREATE TEMP TABLE IF NOT EXISTS dict_rate_limit_states_incoming_0008 (
    endpoint_id text, psp_category char(1), available_tokens bigint, capacity bigint, refill_tokens bigint,
    refill_period_sec bigint, utilization_percent double precision, remaining_ratio double precision,
    consumption_rate_per_minute double precision, consumed_tokens double precision,
    recovery_eta_seconds double precision, exhaustion_projection_seconds double precision,
    error_404_rate double precision, response_time timestamptz, correlation_id text, participant text
)"""
# The table's name carries the column list's version: a pooled connection never meets an older one.
CLEAR_INCOMING = b"DELETE FROM dict_rate_limit_states_incoming_0008"
COPY_INCOMING = sql.SQL("COPY dict_rate_limit_states_incoming_0008 ({}) FROM STDIN (FORMAT BINARY)").format(
    _COLUMNS
)
INSERT_INCOMING = sql.SQL(
    "INSERT INTO dict_rate_limit_states ({columns})"
    " SELECT {columns} FROM dict_rate_limit_states_incoming_0008"
    " ON CONFLICT (endpoint_id, response_time, participant) DO NOTHING"
).format(columns=_COLUMNS)
#: How stale ``last_seen_at`` may get: an unchanged policy row is rewritten at most this often, not at
#: every snapshot (rewriting 3,000 unchanged rows cost more server time than the snapshot's COPY).
LAST_SEEN_REFRESH = timedelta(minutes=5)
# Only rows that change something are rewritten: new parameters or thresholds, or a last_seen_at older
# than LAST_SEEN_REFRESH; a replayed older snapshot never rolls a policy's values back (p.last_seen_at),
# but a row stamped in the far future (a bad clock, a forged answer already stored) does not freeze it.
# Arrays are sent in binary (%b). The writer normally sends only the rows that are due (PolicyRows);
# the WHERE keeps a second replica, or the first snapshot after a start, from rewriting the others.
UPSERT_POLICIES = b"""
INSERT INTO dict_rate_limit_policies AS p (endpoint_id, psp_category, capacity, refill_tokens,
    refill_period_sec, warning_threshold_percent, critical_threshold_percent, first_seen_at, last_seen_at,
    participant)
SELECT endpoint_id, %(category)s, capacity, refill_tokens, refill_period_sec, warning, critical,
       %(seen)s, %(seen)s, %(participant)s
  FROM unnest(%(names)b::text[], %(capacity)b::bigint[], %(refill)b::bigint[], %(period)b::bigint[],
              %(warning)b::float8[], %(critical)b::float8[])
       AS t (endpoint_id, capacity, refill_tokens, refill_period_sec, warning, critical)
ON CONFLICT (endpoint_id, psp_category, participant) DO UPDATE
   SET capacity = EXCLUDED.capacity, refill_tokens = EXCLUDED.refill_tokens,
       refill_period_sec = EXCLUDED.refill_period_sec,
       warning_threshold_percent = EXCLUDED.warning_threshold_percent,
       critical_threshold_percent = EXCLUDED.critical_threshold_percent,
       first_seen_at = least(p.first_seen_at, EXCLUDED.first_seen_at),
       last_seen_at = EXCLUDED.last_seen_at, updated_at = now()
 WHERE p.last_seen_at > now() + interval '1 day'
    OR (p.last_seen_at <= EXCLUDED.last_seen_at
        AND ((p.capacity, p.refill_tokens, p.refill_period_sec, p.warning_threshold_percent,
              p.critical_threshold_percent)
             IS DISTINCT FROM (EXCLUDED.capacity, EXCLUDED.refill_tokens, EXCLUDED.refill_period_sec,
                               EXCLUDED.warning_threshold_percent, EXCLUDED.critical_threshold_percent)
             OR p.last_seen_at <= EXCLUDED.last_seen_at - %(refresh)s::interval))"""
SET_ASIDE = b"""
INSERT INTO dict_rate_limit_rejected_snapshots
    (response_time, correlation_id, psp_category, reason, error, snapshot)
VALUES (%s, %s, %s, %s, %s, %s)"""
#: Set-aside snapshots are evidence for an operator, not history: a month of them is plenty, and a Bridge
#: answering poison at every poll must not grow the table without bound.
PRUNE_SET_ASIDE = (
    b"DELETE FROM dict_rate_limit_rejected_snapshots WHERE rejected_at < now() - interval '30 days'"
)


async def copy_rows(conn: AsyncConnection[Any], statement: sql.Composed, rows: list[tuple[Any, ...]]) -> None:
    """The state columns of ``rows`` through one binary COPY (``statement``: COPY_STATES or COPY_INCOMING)."""
    width = len(STATE_COLUMNS)
    async with conn.cursor().copy(statement) as copy:
        copy.set_types(STATE_TYPES)
        for row in rows:
            await copy.write_row(row[:width])


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
                derived.participant,
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
        state.error_404_share,  # the exporter's share over ERROR_404_WINDOW_SECONDS (issue 15)
    )  # fmt: skip


def policy_params(derived: DerivedSnapshot, rows: Sequence[tuple[Any, ...]]) -> dict[str, Any]:
    """Parameters of UPSERT_POLICIES: one array per column, in the order of ``rows``."""
    return {
        "category": derived.snapshot.category,
        "participant": derived.participant,
        "seen": derived.snapshot.response_time,
        "refresh": LAST_SEEN_REFRESH,
        "names": [row[0] for row in rows],
        "capacity": [row[3] for row in rows],
        "refill": [row[4] for row in rows],
        "period": [row[5] for row in rows],
        "warning": [row[-2] for row in rows],
        "critical": [row[-1] for row in rows],
    }


@dataclass(frozen=True, slots=True)
class _Written:
    values: tuple[Any, ...]  # capacity, refill tokens, refill period, warning %, critical %
    seen: datetime


class PolicyRows:
    """Which policy rows a snapshot must upsert: those this writer has not written with the same values
    within LAST_SEEN_REFRESH. What it remembers is only what committed (:meth:`committed`)."""

    def __init__(self) -> None:
        self._written: dict[tuple[str, str, str], _Written] = {}  # (participant, name, category)

    def due(self, derived: DerivedSnapshot, rows: list[tuple[Any, ...]]) -> dict[str, Any] | None:
        """UPSERT_POLICIES parameters for the rows that change something; None when none does."""
        category, seen = derived.snapshot.category, derived.snapshot.response_time
        due = []
        for row in rows:
            known = self._written.get((derived.participant, row[0], category))
            if (
                known is None
                or (known.values != _values(row) and seen >= known.seen)
                or seen - known.seen >= LAST_SEEN_REFRESH
            ):
                due.append(row)
        return policy_params(derived, due) if due else None

    def committed(self, params: dict[str, Any] | None) -> None:
        """Remember the rows of a committed upsert (a replayed older snapshot never moves one back)."""
        if params is None:
            return
        participant, category, seen = params["participant"], params["category"], params["seen"]
        columns = zip(
            params["names"], params["capacity"], params["refill"], params["period"],
            params["warning"], params["critical"], strict=True,
        )  # fmt: skip
        for name, *values in columns:
            known = self._written.get((participant, name, category))
            if known is None or seen >= known.seen:
                self._written[(participant, name, category)] = _Written(tuple(values), seen)


def _values(row: tuple[Any, ...]) -> tuple[Any, ...]:
    return (row[3], row[4], row[5], row[-2], row[-1])


def _percentages(name: str, thresholds: Callable[[str], PolicyThreshold] | None) -> tuple[float, float]:
    if thresholds is None:
        return (20.0, 10.0)
    threshold = thresholds(name)
    return (threshold.warning * 100.0, threshold.critical * 100.0)
