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
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from exporter.receiver.payload import AlertNotification, to_bigint

# Bucket values: the alert's numeric annotations when the rules provide them, else the policy's latest
# snapshot in the exporter's history (same database), else NULL. Casts: a None parameter is untyped.
INSERT = """
INSERT INTO dict_rate_limit_alerts (
    fingerprint, alert_name, severity, endpoint_id, psp_category, status, starts_at, ends_at, resolved_at,
    resolved_by, available_tokens, capacity, utilization_percent, recovery_eta_seconds,
    exhaustion_projection_seconds, summary, description, labels, annotations, payload, generator_url)
SELECT %(fingerprint)s, %(alert_name)s, %(severity)s, %(endpoint_id)s::text, %(psp_category)s::text,
       %(status)s, %(starts_at)s, %(ends_at)s::timestamptz, CASE WHEN %(resolved)s THEN now() END,
       %(resolved_by)s::text,
       coalesce(%(available_tokens)s::bigint, s.available_tokens),
       coalesce(%(capacity)s::bigint, s.capacity),
       coalesce(%(utilization_percent)s::float8, s.utilization_percent),
       coalesce(%(recovery_eta_seconds)s::float8, s.recovery_eta_seconds),
       coalesce(%(exhaustion_projection_seconds)s::float8, s.exhaustion_projection_seconds),
       %(summary)s::text, %(description)s::text, %(labels)s, %(annotations)s, %(payload)s,
       %(generator_url)s::text
  FROM (SELECT 1) AS one
  LEFT JOIN LATERAL (
        SELECT st.available_tokens, st.capacity, st.utilization_percent, st.recovery_eta_seconds,
               st.exhaustion_projection_seconds
          FROM dict_rate_limit_states st
         WHERE st.endpoint_id = %(endpoint_id)s::text
           AND st.response_time <= now() + interval '1 day'  -- a row dated 9999 is never "latest"
         ORDER BY st.response_time DESC
         LIMIT 1) s ON true
ON CONFLICT (fingerprint, starts_at) DO NOTHING
RETURNING id
"""
RESOLVE = (
    "UPDATE dict_rate_limit_alerts"
    "   SET status = 'resolved', ends_at = %s, resolved_at = now(), resolved_by = 'alertmanager',"
    "       payload = %s, updated_at = now()"
    " WHERE fingerprint = %s AND starts_at = %s AND status = 'firing'"
    " RETURNING id"
)


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


def _insert_params(alert: AlertNotification) -> dict[str, Any]:
    resolved = alert.status == "resolved"
    return {
        "fingerprint": alert.fingerprint,
        "alert_name": alert.alert_name,
        "severity": alert.severity,
        "endpoint_id": alert.endpoint_id,
        "psp_category": alert.psp_category,
        "status": alert.status,
        "starts_at": alert.starts_at,
        "ends_at": alert.ends_at if resolved else None,
        "resolved": resolved,
        "resolved_by": "alertmanager" if resolved else None,
        "available_tokens": to_bigint(alert.number("available_tokens")),
        "capacity": to_bigint(alert.number("capacity")),
        "utilization_percent": alert.number("utilization_percent"),
        "recovery_eta_seconds": alert.number("recovery_eta_seconds"),
        "exhaustion_projection_seconds": alert.number("exhaustion_projection_seconds"),
        "summary": alert.annotations.get("summary"),
        "description": alert.annotations.get("description"),
        "labels": Jsonb(dict(alert.labels)),
        "annotations": Jsonb(dict(alert.annotations)),
        "payload": Jsonb(alert.raw, dumps=_dumps),
        "generator_url": alert.generator_url or None,
    }


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


async def _resolve(conn: AsyncConnection[Any], alert: AlertNotification) -> bool:
    cursor = await conn.execute(
        RESOLVE, [alert.ends_at, Jsonb(alert.raw, dumps=_dumps), alert.fingerprint, alert.starts_at]
    )
    return await cursor.fetchone() is not None


async def _record_one(conn: AsyncConnection[Any], alert: AlertNotification, result: RecordResult) -> None:
    if alert.status == "resolved" and await _resolve(conn, alert):
        result.transitions.append(_transition("resolved", alert))
        return
    cursor = await conn.execute(INSERT, _insert_params(alert))
    if await cursor.fetchone() is not None:
        result.transitions.append(_transition("created", alert))
        if alert.status == "resolved":
            result.transitions.append(_transition("resolved", alert))
        return
    # The insert lost to a concurrent transaction that committed the firing row meanwhile (two Alertmanager
    # peers, two receiver replicas): this statement sees that row now, so try the resolution once more.
    if alert.status == "resolved" and await _resolve(conn, alert):
        result.transitions.append(_transition("resolved", alert))
        return
    result.duplicates += 1


async def record_alerts(conn: AsyncConnection[Any], alerts: tuple[AlertNotification, ...]) -> RecordResult:
    """Records every alert of one notification in one transaction; returns what changed once committed."""
    result = RecordResult()
    async with conn.transaction():
        for alert in alerts:
            await _record_one(conn, alert, result)
    return result
