"""The alert lifecycle in PostgreSQL: one transaction per notification, idempotent per alert instance.

An alert instance is Alertmanager's fingerprint plus ``startsAt`` (the table's unique key). For each alert
of a notification:

- firing, unknown instance: insert a firing row (the outbox trigger of ``sql/0003`` queues ``created``);
- firing, known instance: nothing (a retry, a peer of an Alertmanager cluster, a repeat notification, or a
  late firing after the resolution: a resolved row is final);
- resolved, firing row: mark it resolved (``ends_at``, ``resolved_at``, ``resolved_by='alertmanager'``;
  the trigger queues ``resolved``);
- resolved, unknown instance (its firing notification was lost): insert it resolved (trigger: both events);
- resolved, resolved row: nothing.

The outbox rows are written by the trigger inside the same transaction, so "recorded" and "will be
published" commit together. Bucket values come from the alert's numeric annotations, else from the
policy's latest snapshot in ``dict_rate_limit_states``. Statements use only ``%s`` parameters.

A whole notification is one statement (:data:`RECORD`): the alerts are first folded per instance in
Python (:func:`fold`), because one statement cannot change a row twice, then inserted and resolved
together; their JSON is serialized once per notification and labels and annotations are read from it in
the statement. Applied in order, the rules above give the same rows, events and counts (the tests
compare both ways).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection

from exporter.receiver.payload import AlertNotification, to_bigint

# One row per alert instance of the notification (see fold()): inserted when unknown, firing or already
# resolved; resolved when a firing row exists. The CTEs share one snapshot, so the UPDATE never sees the
# rows this INSERT adds, and the INSERT never changes an existing row: each row is changed once at most.
# Bucket values: the alert's numeric annotations when the rules provide them, else the policy's latest
# snapshot in the exporter's history (same database), else NULL.
_RECORD_CTES = b"""
WITH raw AS (
    SELECT ordinality - 1 AS position, value AS alert
      FROM jsonb_array_elements(%(alerts)s::jsonb) WITH ORDINALITY
), instance AS (
    SELECT t.*, first.alert AS first_raw, resolving.alert AS resolving_raw
      FROM unnest(%(fingerprint)s::text[], %(starts_at)s::timestamptz[], %(first)s::integer[],
                  %(resolving)s::integer[], %(ends_at)s::timestamptz[], %(alert_name)s::text[],
                  %(severity)s::text[], %(endpoint_id)s::text[], %(psp_category)s::text[],
                  %(available_tokens)s::bigint[], %(capacity)s::bigint[], %(utilization_percent)s::float8[],
                  %(recovery_eta_seconds)s::float8[], %(exhaustion_projection_seconds)s::float8[],
                  %(summary)s::text[], %(description)s::text[], %(generator_url)s::text[])
           AS t (fingerprint, starts_at, first, resolving, ends_at, alert_name, severity, endpoint_id,
                 psp_category, available_tokens, capacity, utilization_percent, recovery_eta_seconds,
                 exhaustion_projection_seconds, summary, description, generator_url)
      JOIN raw first ON first.position = t.first
      LEFT JOIN raw resolving ON resolving.position = t.resolving
), inserted AS (
    INSERT INTO dict_rate_limit_alerts (
        fingerprint, alert_name, severity, endpoint_id, psp_category, status, starts_at, ends_at,
        resolved_at, resolved_by, available_tokens, capacity, utilization_percent, recovery_eta_seconds,
        exhaustion_projection_seconds, summary, description, labels, annotations, payload, generator_url)
    SELECT i.fingerprint, i.alert_name, i.severity, i.endpoint_id, i.psp_category,
           CASE WHEN i.resolving IS NULL THEN 'firing' ELSE 'resolved' END, i.starts_at, i.ends_at,
           CASE WHEN i.resolving IS NOT NULL THEN now() END,
           CASE WHEN i.resolving IS NOT NULL THEN 'alertmanager' END,
           coalesce(i.available_tokens, s.available_tokens),
           coalesce(i.capacity, s.capacity),
           coalesce(i.utilization_percent, s.utilization_percent),
           coalesce(i.recovery_eta_seconds, s.recovery_eta_seconds),
           coalesce(i.exhaustion_projection_seconds, s.exhaustion_projection_seconds),
           i.summary, i.description,
           coalesce(nullif(i.first_raw -> 'labels', 'null'), '{}'),
           coalesce(nullif(i.first_raw -> 'annotations', 'null'), '{}'),
           coalesce(i.resolving_raw, i.first_raw), i.generator_url
      FROM instance i
      LEFT JOIN LATERAL (
            SELECT st.available_tokens, st.capacity, st.utilization_percent, st.recovery_eta_seconds,
                   st.exhaustion_projection_seconds
              FROM dict_rate_limit_states st
             WHERE st.endpoint_id = i.endpoint_id
             ORDER BY st.response_time DESC
             LIMIT 1) s ON true
     ORDER BY i.first
    ON CONFLICT (fingerprint, starts_at) DO NOTHING
    RETURNING fingerprint, starts_at
"""
_RESOLVED_CTE = b"""), resolved AS (
    UPDATE dict_rate_limit_alerts a
       SET status = 'resolved', ends_at = i.ends_at, resolved_at = now(), resolved_by = 'alertmanager',
           payload = i.resolving_raw, updated_at = now()
      FROM instance i
     WHERE i.resolving IS NOT NULL
       AND a.fingerprint = i.fingerprint AND a.starts_at = i.starts_at AND a.status = 'firing'
    RETURNING a.fingerprint, a.starts_at
)"""
_RECORD_RESULT = b"""
SELECT (SELECT coalesce(array_agg(i.first), '{}')
          FROM instance i JOIN inserted USING (fingerprint, starts_at)),
       (SELECT coalesce(array_agg(i.first), '{}')
          FROM instance i JOIN resolved USING (fingerprint, starts_at))
"""
RECORD = _RECORD_CTES + _RESOLVED_CTE + _RECORD_RESULT
# A notification without resolutions: the same without the UPDATE, so that it can be prepared (a
# generic plan of the UPDATE was measured scanning every firing alert).
RECORD_FIRING = (
    _RECORD_CTES
    + b""")
SELECT (SELECT coalesce(array_agg(i.first), '{}')
          FROM instance i JOIN inserted USING (fingerprint, starts_at)),
       '{}'::integer[]
"""
)
# A resolution that neither inserted nor resolved a row may have lost to a concurrent transaction (two
# Alertmanager peers, two receiver replicas) that committed the firing row after RECORD's snapshot: this
# new statement sees it.
RESOLVE_LATE = b"""
UPDATE dict_rate_limit_alerts a
   SET status = 'resolved', ends_at = t.ends_at, resolved_at = now(), resolved_by = 'alertmanager',
       payload = t.payload, updated_at = now()
  FROM unnest(%s::text[], %s::timestamptz[], %s::timestamptz[], %s::jsonb[], %s::integer[])
       AS t (fingerprint, starts_at, ends_at, payload, first)
 WHERE a.fingerprint = t.fingerprint AND a.starts_at = t.starts_at AND a.status = 'firing'
RETURNING t.first
"""


@dataclass(frozen=True, slots=True)
class Transition:
    """A state change that was committed: what the seed counters count."""

    kind: str  # "created" or "resolved"
    endpoint_id: str
    severity: str
    psp_category: str


@dataclass(slots=True)
class RecordResult:
    """What one notification changed."""

    transitions: list[Transition] = field(default_factory=list)
    duplicates: int = 0

    @property
    def created(self) -> int:
        return sum(1 for t in self.transitions if t.kind == "created")

    @property
    def resolved(self) -> int:
        return sum(1 for t in self.transitions if t.kind == "resolved")


def _transition(kind: str, alert: AlertNotification) -> Transition:
    # Health alerts carry no policy: the seed counters get an empty label value for them.
    return Transition(kind, alert.endpoint_id or "", alert.severity, alert.psp_category or "")


def instance_key(alert: AlertNotification) -> tuple[str, datetime]:
    """The alert instance (the table's unique key): the identity computed by alert_payload."""
    return (alert.fingerprint, alert.starts_at)


@dataclass(slots=True)
class Instance:
    """The alerts of one notification that share an instance, folded: the only ones that can change it."""

    #: The first firing alert before any resolution (inserted when the instance is unknown), else the
    #: first resolution; positions in the notification.
    first: int
    #: The first resolution (resolves a firing row, or is inserted resolved), if any.
    resolving: int | None


def fold(alerts: Sequence[AlertNotification]) -> dict[tuple[str, datetime], Instance]:
    """Instances in order of first appearance. Applied in order, the lifecycle rules change an instance
    at most by its first firing alert before any resolution, then its first resolution; every other alert
    of the instance is a duplicate whatever the stored state."""
    instances: dict[tuple[str, datetime], Instance] = {}
    for position, alert in enumerate(alerts):
        key = instance_key(alert)
        known = instances.get(key)
        if known is None:
            resolving = position if alert.status == "resolved" else None
            instances[key] = Instance(position, resolving)
        elif alert.status == "resolved" and known.resolving is None:
            known.resolving = position
    return instances


Folded = list[tuple[tuple[str, datetime], Instance]]


def _params(alerts: Sequence[AlertNotification], instances: Folded) -> dict[str, Any]:
    """RECORD's parameters: the notification's alerts serialized once, one array element per instance."""
    firsts = [alerts[i.first] for _, i in instances]
    return {
        "alerts": _dumps([alert.raw for alert in alerts]),
        "fingerprint": [key[0] for key, _ in instances],
        "starts_at": [key[1] for key, _ in instances],
        "first": [i.first for _, i in instances],
        "resolving": [i.resolving for _, i in instances],
        "ends_at": [None if i.resolving is None else alerts[i.resolving].ends_at for _, i in instances],
        "alert_name": [a.alert_name for a in firsts],
        "severity": [a.severity for a in firsts],
        "endpoint_id": [a.endpoint_id for a in firsts],
        "psp_category": [a.psp_category for a in firsts],
        "available_tokens": [to_bigint(a.number("available_tokens")) for a in firsts],
        "capacity": [to_bigint(a.number("capacity")) for a in firsts],
        "utilization_percent": [a.number("utilization_percent") for a in firsts],
        "recovery_eta_seconds": [a.number("recovery_eta_seconds") for a in firsts],
        "exhaustion_projection_seconds": [a.number("exhaustion_projection_seconds") for a in firsts],
        "summary": [a.annotations.get("summary") for a in firsts],
        "description": [a.annotations.get("description") for a in firsts],
        "generator_url": [a.generator_url or None for a in firsts],
    }


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


async def record_alerts(conn: AsyncConnection[Any], alerts: tuple[AlertNotification, ...]) -> RecordResult:
    """Records every alert of one notification in one transaction; returns what changed once committed.

    On an autocommit connection a notification without resolutions is one statement, hence its own
    transaction: one round trip to PostgreSQL, no BEGIN and COMMIT.
    """
    if not alerts:
        return RecordResult()
    instances = list(fold(alerts).items())
    params = _params(alerts, instances)
    resolving = any(i.resolving is not None for _, i in instances)
    if conn.autocommit and not resolving:
        inserted, resolved = await _record(conn, params, resolving=False)
    else:
        async with conn.transaction():
            inserted, resolved = await _record(conn, params, resolving=resolving)
            late = [i for _, i in instances if i.resolving is not None and i.first not in inserted | resolved]
            if late:
                resolved |= await _resolve_late(conn, alerts, late)
    return _result(alerts, [i for _, i in instances], inserted, resolved)


async def _record(
    conn: AsyncConnection[Any], params: dict[str, Any], *, resolving: bool
) -> tuple[set[int], set[int]]:
    """RECORD (or RECORD_FIRING); the positions of the first alerts of the instances it inserted and
    resolved.

    RECORD is never prepared: PostgreSQL keeps a generic plan made from the tables as they were, and the
    one of its UPDATE was measured seq-scanning the alerts (2 ms per notification growing to 9 ms within
    1,200 notifications); planned for its own arrays each time it stays at ~2 ms. RECORD_FIRING has no
    UPDATE and is prepared, which saves its planning (~0.6 ms).
    """
    statement, prepare = (RECORD, False) if resolving else (RECORD_FIRING, None)
    cursor = await conn.execute(statement, params, prepare=prepare)
    row = await cursor.fetchone()
    assert row is not None
    return set(row[0]), set(row[1])


async def _resolve_late(
    conn: AsyncConnection[Any], alerts: Sequence[AlertNotification], late: list[Instance]
) -> set[int]:
    resolutions = [alerts[i.resolving] for i in late if i.resolving is not None]
    cursor = await conn.execute(
        RESOLVE_LATE,
        [
            [a.fingerprint for a in resolutions],
            [a.starts_at for a in resolutions],
            [a.ends_at for a in resolutions],
            [_dumps(a.raw) for a in resolutions],
            [i.first for i in late],
        ],
    )
    return {row[0] for row in await cursor.fetchall()}


def _result(
    alerts: Sequence[AlertNotification], instances: list[Instance], inserted: set[int], resolved: set[int]
) -> RecordResult:
    """The transitions in the order the alerts that caused them came, as if applied one by one."""
    changes: list[tuple[int, int, Transition]] = []
    used = 0
    for i in instances:
        if i.first in inserted:
            changes.append((i.first, 0, _transition("created", alerts[i.first])))
            used += 1
            if i.resolving is not None:
                changes.append((i.resolving, 1, _transition("resolved", alerts[i.resolving])))
                used += i.resolving != i.first
        elif i.first in resolved and i.resolving is not None:
            changes.append((i.resolving, 1, _transition("resolved", alerts[i.resolving])))
            used += 1
    changes.sort(key=lambda change: change[:2])
    return RecordResult([change[2] for change in changes], len(alerts) - used)
