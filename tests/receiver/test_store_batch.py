"""One statement per notification records exactly what the per-alert statements did (the previous store,
kept here as the reference): same rows, same events in the same order per alert, same counts, with
duplicates, late firings and resolutions of an instance inside one notification."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import AsyncConnection, sql
from psycopg.types.json import Jsonb

from exporter.receiver.payload import AlertNotification, parse_payload, to_bigint
from exporter.receiver.store import RecordResult, Transition, fold, record_alerts
from tests.support.receiver import alert, migrate, payload, rows

# --- the reference: the per-alert store as it was before batching (one INSERT or UPDATE per alert)

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


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _transition(kind: str, a: AlertNotification) -> Transition:
    return Transition(kind, a.endpoint_id or "", a.severity, a.psp_category or "")


def _insert_params(a: AlertNotification) -> dict[str, Any]:
    resolved = a.status == "resolved"
    return {
        "fingerprint": a.fingerprint, "alert_name": a.alert_name, "severity": a.severity,
        "endpoint_id": a.endpoint_id, "psp_category": a.psp_category, "status": a.status,
        "starts_at": a.starts_at, "ends_at": a.ends_at if resolved else None, "resolved": resolved,
        "resolved_by": "alertmanager" if resolved else None,
        "available_tokens": to_bigint(a.number("available_tokens")),
        "capacity": to_bigint(a.number("capacity")),
        "utilization_percent": a.number("utilization_percent"),
        "recovery_eta_seconds": a.number("recovery_eta_seconds"),
        "exhaustion_projection_seconds": a.number("exhaustion_projection_seconds"),
        "summary": a.annotations.get("summary"), "description": a.annotations.get("description"),
        "labels": Jsonb(dict(a.labels)), "annotations": Jsonb(dict(a.annotations)),
        "payload": Jsonb(a.raw, dumps=_dumps), "generator_url": a.generator_url or None,
    }  # fmt: skip


async def _resolve(conn: AsyncConnection[Any], a: AlertNotification) -> bool:
    cursor = await conn.execute(RESOLVE, [a.ends_at, Jsonb(a.raw, dumps=_dumps), a.fingerprint, a.starts_at])
    return await cursor.fetchone() is not None


async def reference(conn: AsyncConnection[Any], alerts: tuple[AlertNotification, ...]) -> RecordResult:
    result = RecordResult()
    async with conn.transaction():
        for a in alerts:
            if a.status == "resolved" and await _resolve(conn, a):
                result.transitions.append(_transition("resolved", a))
                continue
            cursor = await conn.execute(INSERT, _insert_params(a))
            if await cursor.fetchone() is not None:
                result.transitions.append(_transition("created", a))
                if a.status == "resolved":
                    result.transitions.append(_transition("resolved", a))
                continue
            result.duplicates += 1
    return result


# --- the cases

END = "2026-11-23T09:05:00Z"


def resolved(**labels: Any) -> dict[str, Any]:
    return alert("resolved", ends_at=END, **labels)


NOTIFICATIONS: list[list[dict[str, Any]]] = [
    [
        alert(fingerprint="a"),
        alert(fingerprint="b", endpoint_id="CLAIMS_READ"),
        alert(fingerprint="a"),  # a duplicate inside the notification
        resolved(fingerprint="c"),  # its firing notification was lost: created and resolved
        alert(fingerprint="health", name="DICTRateLimitExporterDown", endpoint_id=None, psp_category=None),
        alert(fingerprint="vals", annotations={"available_tokens": "12", "capacity": "x", "summary": "s"}),
    ],
    [
        resolved(fingerprint="a"),
        alert(fingerprint="a"),  # a late firing after the resolution: ignored
        resolved(fingerprint="a"),
        alert(fingerprint="b", endpoint_id="CLAIMS_READ"),
        resolved(fingerprint="b", endpoint_id="CLAIMS_READ", annotations={"summary": "changed"}),
        alert(fingerprint="e"),  # new, fired and resolved in one notification
        resolved(fingerprint="e", annotations={"summary": "done"}),
        resolved(fingerprint="e"),
    ],
    [
        resolved(fingerprint="c"),
        resolved(fingerprint="g"),
        alert(fingerprint="g"),
        alert(fingerprint="a", starts_at="2026-11-23T10:00:00Z"),  # a new instance of a resolved alert
    ],
    [],
    [alert(fingerprint="h"), alert(fingerprint="h"), alert(fingerprint="i")],  # firing only: one statement
]
NOTIFICATIONS.append(NOTIFICATIONS[1])  # a retried notification: all duplicates

ALERTS = (
    "SELECT fingerprint, starts_at, alert_name, severity, endpoint_id, psp_category, status, ends_at,"
    " resolved_at IS NOT NULL, resolved_by, available_tokens, capacity, utilization_percent,"
    " recovery_eta_seconds, exhaustion_projection_seconds, summary, description, labels, annotations,"
    " payload, generator_url FROM dict_rate_limit_alerts ORDER BY fingerprint, starts_at"
)
EVENTS = (
    "SELECT a.fingerprint, a.starts_at, o.event_type, o.event_id FROM dict_rate_limit_alert_outbox o"
    " JOIN dict_rate_limit_alerts a ON a.id = o.alert_id ORDER BY o.id"
)
STATE = (
    "INSERT INTO dict_rate_limit_states (endpoint_id, psp_category, available_tokens, capacity,"
    " refill_tokens, refill_period_sec, utilization_percent, remaining_ratio, recovery_eta_seconds,"
    " response_time)"
    " VALUES ('CLAIMS_READ', 'A', -7, 1000, 20, 60, 100.7, -0.007, 3021, now())"
)


@pytest.fixture
def two_databases(database_url: str, pg_server: str) -> Iterator[tuple[str, str]]:
    name = f"{psycopg.conninfo.conninfo_to_dict(database_url)['dbname']}_ref"
    second = psycopg.conninfo.make_conninfo(database_url, dbname=name)
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    for url in (database_url, second):
        migrate(url)
        with psycopg.connect(url) as conn:
            conn.execute(STATE.encode())  # CLAIMS_READ's values come from its latest snapshot
    yield database_url, second
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def parsed(alerts: list[dict[str, Any]]) -> tuple[AlertNotification, ...]:
    return parse_payload(json.dumps(payload(*alerts)).encode()).alerts


def per_instance(events: list[tuple[Any, ...]]) -> dict[tuple[Any, Any], list[tuple[Any, Any]]]:
    grouped: dict[tuple[Any, Any], list[tuple[Any, Any]]] = {}
    for fingerprint, starts_at, event_type, event_id in events:
        grouped.setdefault((fingerprint, starts_at), []).append((event_type, event_id))
    return grouped


async def test_one_statement_per_notification_records_what_the_per_alert_path_did(
    two_databases: tuple[str, str],
) -> None:
    mine, theirs = two_databases
    async with (
        await AsyncConnection.connect(mine, autocommit=True) as batched,  # as the receiver's pool
        await AsyncConnection.connect(theirs) as one_by_one,
    ):
        for alerts in NOTIFICATIONS:
            notification = parsed(alerts)
            got = await record_alerts(batched, notification)
            expected = await reference(one_by_one, notification)
            assert (got.transitions, got.duplicates) == (expected.transitions, expected.duplicates)
    assert rows(mine, ALERTS) == rows(theirs, ALERTS)
    assert len(rows(mine, ALERTS)) == 10
    events = rows(mine, EVENTS)
    assert sorted(events) == sorted(rows(theirs, EVENTS))
    assert per_instance(events) == per_instance(rows(theirs, EVENTS))  # each alert's events in order
    assert len(events) == 15


def test_fold_keeps_the_first_firing_and_the_first_resolution_of_each_instance() -> None:
    folded = fold(parsed(NOTIFICATIONS[1]))
    assert [(i.first, i.resolving) for i in folded.values()] == [(0, 0), (3, 4), (5, 6)]


async def test_a_resolution_racing_the_firing_row_of_another_transaction_resolves_it(
    database_url: str,
) -> None:
    """RECORD's snapshot predates the firing row another replica commits meanwhile: the follow-up
    statement resolves it, as the per-alert path did."""
    migrate(database_url)
    firing, resolution = parsed([alert(fingerprint="x")]), parsed([resolved(fingerprint="x")])
    async with (
        await AsyncConnection.connect(database_url) as other,
        await AsyncConnection.connect(database_url) as conn,
    ):
        await other.execute(b"BEGIN")
        # Inside the open transaction record_alerts uses a savepoint: the row stays uncommitted.
        assert (await record_alerts(other, firing)).created == 1
        racing = asyncio.create_task(record_alerts(conn, resolution))
        await asyncio.sleep(1.0)  # the INSERT now waits for `other`'s uncommitted row
        assert not racing.done()
        await other.execute(b"COMMIT")
        result = await asyncio.wait_for(racing, 20)
    assert (result.created, result.resolved, result.duplicates) == (0, 1, 0)
    assert rows(database_url, "SELECT status FROM dict_rate_limit_alerts") == [("resolved",)]
