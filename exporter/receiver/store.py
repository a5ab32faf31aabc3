"""The alert lifecycle in PostgreSQL: one transaction per notification, idempotent per alert instance.

An alert instance is its identity fingerprint (Alertmanager's, or recomputed without the Prometheus
replica labels: exporter/receiver/identity.py) plus its episode: the row of that fingerprint whose
``starts_at`` is within ``start_tolerance`` of the notification's ``startsAt`` and that had not ended
before it. Two Prometheus replicas start the same alert up to an evaluation interval apart; both copies
land on one row, so one ``created`` and one ``resolved`` event. Each fingerprint is serialized by a
transaction-level advisory lock, so receiver replicas never race each other into two rows.
For each alert of a notification:

- firing, unknown instance: insert a firing row (the outbox trigger of inserts, ``sql/0009``, queues
  ``created``);
- firing, known instance: nothing (a retry, a peer of an Alertmanager cluster, the other Prometheus
  replica's copy, a repeat notification, or a late firing after the resolution: a resolved row is final);
- resolved, firing row: mark it resolved (``ends_at``, ``resolved_at``, ``resolved_by`` = ``alertmanager``
  for a recovery, ``data_lost`` when the rules last held the alert on missing data) with the bucket values
  of the resolution (the firing values are replaced); the row trigger of ``sql/0003``/``0007`` queues
  ``resolved`` with them;
- resolved, unknown instance (its firing notification was lost): insert it resolved (trigger: both events);
- resolved, resolved row: nothing.

The outbox rows are written by the trigger inside the same transaction, so "recorded" and "will be
published" commit together, each outbox row with the bucket values of its own change (``sql/0007``).
Bucket values come from the alert's numeric annotations, else from the policy's latest plausible snapshot
in ``dict_rate_limit_states`` at that moment (firing: when recorded; resolution: when resolved).

These steps run on the server, in ``dict_rate_limit_record_alerts()`` (``sql/0009``): the whole notification
is one call, one round trip, with its alerts serialised once as a JSON document (issue 18: one round trip
per alert with three JSON serialisations each was most of a request). Statements use only ``%s`` parameters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from psycopg import AsyncConnection

from exporter.receiver.payload import AlertNotification, to_bigint

#: One notification, one statement (sql/0009): the sorted advisory locks, each alert's episode found
#: with the start tolerance, the inserts and resolutions, in one round trip. Autocommitted, the call is
#: its own transaction; "Statements use only %s parameters" still holds.
RECORD = "SELECT dict_rate_limit_record_alerts(%s, %s::jsonb, %s, %s)"
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


def _alert_document(alert: AlertNotification) -> dict[str, Any]:
    """What sql/0009 needs of one alert; the alert object itself goes once (annotations, summary and
    description are read from it in the database), the labels only when the replica labels were dropped."""
    resolved = alert.status == "resolved"
    document: dict[str, Any] = {
        "fingerprint": alert.fingerprint,
        "alert_name": alert.alert_name,
        "severity": alert.severity,
        "endpoint_id": alert.endpoint_id,
        "psp_category": alert.psp_category,
        "status": alert.status,
        "starts_at": alert.starts_at.isoformat(),
        "ends_at": alert.ends_at.isoformat() if resolved and alert.ends_at is not None else None,
        "resolved_by": resolved_by(alert) if resolved else None,
        "available_tokens": to_bigint(alert.number("available_tokens")),
        "capacity": to_bigint(alert.number("capacity")),
        "utilization_percent": alert.number("utilization_percent"),
        "recovery_eta_seconds": alert.number("recovery_eta_seconds"),
        "exhaustion_projection_seconds": alert.number("exhaustion_projection_seconds"),
        "generator_url": alert.generator_url or None,
        "payload": alert.raw,
    }
    if alert.labels != alert.raw.get("labels"):
        document["labels"] = alert.labels
    return document


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def resolved_by(alert: AlertNotification) -> str:
    """``data_lost`` when the rules held the alert on missing data until it ended, else ``alertmanager``."""
    return "data_lost" if alert.data_lost else "alertmanager"


def _result(alerts: tuple[AlertNotification, ...], outcomes: list[str]) -> RecordResult:
    result = RecordResult()
    for alert, outcome in zip(alerts, outcomes, strict=True):
        if outcome == "duplicate":
            result.duplicates += 1
            continue
        if outcome.startswith("created"):
            result.transitions.append(_transition("created", alert))
        if outcome.endswith("resolved"):
            result.transitions.append(_transition("resolved", alert))
    return result


async def record_alerts(
    conn: AsyncConnection[Any],
    alerts: tuple[AlertNotification, ...],
    start_tolerance: timedelta = DEFAULT_START_TOLERANCE,
    source: str = "",
) -> RecordResult:
    """Records every alert of one notification in one transaction; returns what changed once committed.

    ``source`` is the sending Alertmanager's external URL, kept on new rows for the reconciliation.
    On an autocommit connection (the receiver's pool) this is one round trip; otherwise it runs in a
    transaction of its own (or a savepoint of the caller's).
    """
    if not alerts:
        return RecordResult()
    # Every fingerprint's lock first, in one order (code points, as Python sorts): two notifications
    # sharing alerts (an Alertmanager cluster, retries) taking them in their own orders deadlock.
    locks = sorted({alert.fingerprint for alert in alerts})
    params = (locks, _dumps([_alert_document(alert) for alert in alerts]), start_tolerance, source)
    if conn.autocommit:
        row = await (await conn.execute(RECORD, params)).fetchone()
    else:
        async with conn.transaction():
            row = await (await conn.execute(RECORD, params)).fetchone()
    assert row is not None  # a function call returns one row
    return _result(alerts, list(row[0]))
