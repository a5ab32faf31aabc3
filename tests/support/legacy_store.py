"""The store of the previous release, kept as the reference the batched store is compared with.

Issue 18 moved the alert lifecycle into one SQL function (sql/0009). This module is
exporter/receiver/store.py as it was before, unchanged but for this docstring: alert by alert from Python
(the sorted advisory locks, a look-up with the start tolerance, an INSERT or an UPDATE per alert). Only
tests/receiver/test_store_batched.py uses it: it replays the same notifications through both stores and
requires identical rows, outbox rows and results.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import timedelta
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
    exhaustion_projection_seconds, summary, description, labels, annotations, payload, generator_url,
    alertmanager_url)
SELECT %(fingerprint)s, %(alert_name)s, %(severity)s, %(endpoint_id)s::text, %(psp_category)s::text,
       %(status)s, %(starts_at)s, %(ends_at)s::timestamptz, CASE WHEN %(resolved)s THEN now() END,
       %(resolved_by)s::text,
       coalesce(%(available_tokens)s::bigint, s.available_tokens),
       coalesce(%(capacity)s::bigint, s.capacity),
       coalesce(%(utilization_percent)s::float8, s.utilization_percent),
       coalesce(%(recovery_eta_seconds)s::float8, s.recovery_eta_seconds),
       coalesce(%(exhaustion_projection_seconds)s::float8, s.exhaustion_projection_seconds),
       %(summary)s::text, %(description)s::text, %(labels)s, %(annotations)s, %(payload)s,
       %(generator_url)s::text, %(alertmanager_url)s::text
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
# A resolution records the bucket values of its own moment: the resolved alert's numeric annotations,
# else the policy's latest plausible snapshot now (sql/0007), else NULL. Keeping the firing values would
# publish numbers nobody observed at the resolution (issue 12).
RESOLVE = """
UPDATE dict_rate_limit_alerts a
   SET status = 'resolved', ends_at = %(ends_at)s, resolved_at = now(), resolved_by = %(resolved_by)s,
       payload = %(payload)s, updated_at = now(),
       (available_tokens, capacity, utilization_percent, recovery_eta_seconds,
        exhaustion_projection_seconds) =
       (SELECT coalesce(%(available_tokens)s::bigint, v.available_tokens),
               coalesce(%(capacity)s::bigint, v.capacity),
               coalesce(%(utilization_percent)s::float8, v.utilization_percent),
               coalesce(%(recovery_eta_seconds)s::float8, v.recovery_eta_seconds),
               coalesce(%(exhaustion_projection_seconds)s::float8, v.exhaustion_projection_seconds)
          FROM (SELECT 1) AS one
          LEFT JOIN LATERAL dict_rate_limit_latest_values(a.endpoint_id) v ON true)
 WHERE a.id = %(id)s AND a.status = 'firing'
RETURNING a.id
"""
LOCK = "SELECT pg_advisory_xact_lock(hashtextextended(%s, 28554171))"
# The episode a notification belongs to: same fingerprint, started within the tolerance, not ended
# before this copy started (a new episode starts after the previous one's end).
FIND = """
SELECT id, status
  FROM dict_rate_limit_alerts
 WHERE fingerprint = %(fingerprint)s
   AND starts_at BETWEEN %(starts_at)s - %(tolerance)s AND %(starts_at)s + %(tolerance)s
   AND (status = 'firing' OR ends_at IS NULL OR %(starts_at)s < ends_at)
 ORDER BY abs(extract(epoch FROM starts_at - %(starts_at)s))
 LIMIT 1
"""
#: How far apart two Prometheus replicas may start one alert (an evaluation interval plus margin).
DEFAULT_START_TOLERANCE = timedelta(minutes=5)


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


def _insert_params(alert: AlertNotification, source: str) -> dict[str, Any]:
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
        "resolved_by": resolved_by(alert) if resolved else None,
        **_numbers(alert),
        "summary": alert.annotations.get("summary"),
        "description": alert.annotations.get("description"),
        "labels": Jsonb(dict(alert.labels)),
        "annotations": Jsonb(dict(alert.annotations)),
        "payload": Jsonb(alert.raw, dumps=_dumps),
        "generator_url": alert.generator_url or None,
        "alertmanager_url": source or None,
    }


def _numbers(alert: AlertNotification) -> dict[str, Any]:
    return {
        "available_tokens": to_bigint(alert.number("available_tokens")),
        "capacity": to_bigint(alert.number("capacity")),
        "utilization_percent": alert.number("utilization_percent"),
        "recovery_eta_seconds": alert.number("recovery_eta_seconds"),
        "exhaustion_projection_seconds": alert.number("exhaustion_projection_seconds"),
    }


def _resolve_params(alert: AlertNotification, row_id: int) -> dict[str, Any]:
    return {
        "id": row_id,
        "ends_at": alert.ends_at,
        "resolved_by": resolved_by(alert),
        "payload": Jsonb(alert.raw, dumps=_dumps),
        **_numbers(alert),
    }


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def resolved_by(alert: AlertNotification) -> str:
    """``data_lost`` when the rules held the alert on missing data until it ended, else ``alertmanager``."""
    return "data_lost" if alert.data_lost else "alertmanager"


async def _find(
    conn: AsyncConnection[Any], alert: AlertNotification, tolerance: timedelta
) -> tuple[int, str] | None:
    cursor = await conn.execute(
        FIND, {"fingerprint": alert.fingerprint, "starts_at": alert.starts_at, "tolerance": tolerance}
    )
    row = await cursor.fetchone()
    return None if row is None else (int(row[0]), str(row[1]))


async def _record_one(
    conn: AsyncConnection[Any],
    alert: AlertNotification,
    result: RecordResult,
    tolerance: timedelta,
    source: str,
) -> None:
    found = await _find(conn, alert, tolerance)
    if found is not None:
        row_id, status = found
        if alert.status == "resolved" and status == "firing":
            cursor = await conn.execute(RESOLVE, _resolve_params(alert, row_id))
            if await cursor.fetchone() is not None:
                result.transitions.append(_transition("resolved", alert))
                return
        result.duplicates += 1
        return
    cursor = await conn.execute(INSERT, _insert_params(alert, source))
    if await cursor.fetchone() is None:  # the same instance exactly (fingerprint, startsAt): a retry
        result.duplicates += 1
        return
    result.transitions.append(_transition("created", alert))
    if alert.status == "resolved":
        result.transitions.append(_transition("resolved", alert))


async def record_alerts(
    conn: AsyncConnection[Any],
    alerts: tuple[AlertNotification, ...],
    start_tolerance: timedelta = DEFAULT_START_TOLERANCE,
    source: str = "",
) -> RecordResult:
    """Records every alert of one notification in one transaction; returns what changed once committed.

    ``source`` is the sending Alertmanager's external URL, kept on new rows for the reconciliation.
    """
    result = RecordResult()
    async with conn.transaction():
        # Every fingerprint's lock first, in one order: two notifications sharing alerts (an Alertmanager
        # cluster, retries) taking them alert by alert in their own orders deadlock each other.
        for fingerprint in sorted({alert.fingerprint for alert in alerts}):
            await conn.execute(LOCK, [fingerprint])
        for alert in alerts:
            await _record_one(conn, alert, result, start_tolerance, source)
    return result
