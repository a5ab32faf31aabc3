"""Alert identity and resolution causes through a real Alertmanager, receiver, PostgreSQL and pulsar-lite.

Two Prometheus replicas' copies of one alert give one audit row and one event per change; a resolution
held on missing data is recorded as data lost; a resolution Alertmanager does not deliver (inhibited)
is reconciled from its API within seconds.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from devstack.embedded import EmbeddedPulsar
from exporter.receiver.identity import label_fingerprint
from exporter.receiver.metrics import ReceiverMetrics
from tests.plugins.fix_db import ONE_SERVER
from tests.receiver.test_event_values import store_snapshot
from tests.receiver.test_receiver_alertmanager import (
    alertmanager_config,
    eventually,
    receiver_settings,
    running_receiver,
    statuses,
)
from tests.support.env import require_binary
from tests.support.receiver import EventConsumer, alertmanager, am_alert, migrate, rows, unique_topic

LABELS = {
    "alertname": "DICTRateLimitCritical",
    "severity": "critical",
    "endpoint_id": "ENTRIES_WRITE",
    "job": "dict-rate-limit-exporter",
    "namespace": "pix",
}
ROW = "SELECT fingerprint, status, resolved_by, psp_category, labels FROM dict_rate_limit_alerts"


def replica_copy(
    replica: str, starts: datetime, *, resolved: bool = False, **annotations: str
) -> dict[str, Any]:
    body = am_alert({**LABELS, "prometheus_replica": replica}, starts_at=starts, resolved=resolved)
    body["annotations"] = {"summary": "low", "description": "ENTRIES_WRITE is low", "psp_category": "A"}
    body["annotations"].update(annotations)
    return body


@ONE_SERVER
async def test_two_prometheus_replicas_give_one_row_and_one_event_per_change(
    tmp_path: Path, database_url: str, pulsar_broker: EmbeddedPulsar
) -> None:
    binary = require_binary("prometheus-alertmanager")
    migrate(database_url)
    topic = unique_topic()
    settings = receiver_settings(database_url, pulsar_broker, topic, tmp_path / "token")
    config = alertmanager_config(settings, tmp_path)
    consumer = EventConsumer(pulsar_broker.url, topic)
    starts = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=40)
    try:
        async with running_receiver(settings, ReceiverMetrics()):
            with alertmanager(binary, config, tmp_path) as manager:
                # Replica b evaluates 15 s later than a: another startsAt, another Alertmanager fingerprint.
                manager.post(replica_copy("b", starts + timedelta(seconds=15)))
                assert await statuses(database_url, "firing", 20) == [("firing",)]
                manager.post(replica_copy("a", starts))
                fingerprints = await asyncio.to_thread(lambda: {a["fingerprint"] for a in manager.alerts()})
                await asyncio.sleep(3)  # a's copy is notified within a second (fast grouping)
                manager.post(replica_copy("a", starts, resolved=True))
                assert await statuses(database_url, "resolved", 20) == [("resolved",)]
                manager.post(replica_copy("b", starts + timedelta(seconds=15), resolved=True))
                await asyncio.sleep(3)
                events = await asyncio.to_thread(consumer.receive, 3, 10)
    finally:
        consumer.close()
    assert len(fingerprints) == 2, "Alertmanager held the two replicas' copies as two alerts"
    [(fingerprint, status, resolved_by, category, labels)] = rows(database_url, ROW)
    assert fingerprint == label_fingerprint(LABELS)
    assert "prometheus_replica" not in labels
    assert (status, resolved_by, category) == ("resolved", "alertmanager", "A")
    assert [e.event["event_type"] for e in events] == [
        "rate_limit.alert.created",
        "rate_limit.alert.resolved",
    ]
    assert len({e.event["event_id"] for e in events}) == 2
    assert events[1].event["resolved_by"] == "alertmanager"


async def test_the_identity_fingerprint_is_alertmanagers_own(tmp_path: Path) -> None:
    binary = require_binary("prometheus-alertmanager")
    config = tmp_path / "am.yml"
    config.write_text("route:\n  receiver: none\nreceivers:\n  - name: none\n", encoding="utf-8")
    labelsets = [LABELS, {**LABELS, "cluster": "c1", "participant": "12345678"}, {"alertname": "x"}]
    with alertmanager(binary, config, tmp_path) as manager:
        manager.post(*(am_alert(labels) for labels in labelsets))
        held = await eventually_alerts(manager, len(labelsets))
    assert {a["fingerprint"] for a in held} == {label_fingerprint(labels) for labels in labelsets}


async def eventually_alerts(manager: Any, count: int) -> list[dict[str, Any]]:
    for _ in range(50):
        alerts: list[dict[str, Any]] = await asyncio.to_thread(manager.alerts)
        if len(alerts) == count:
            return alerts
        await asyncio.sleep(0.1)
    return alerts


async def test_a_resolution_held_on_missing_data_is_recorded_and_published_as_data_lost(
    tmp_path: Path, database_url: str, pulsar_broker: EmbeddedPulsar
) -> None:
    binary = require_binary("prometheus-alertmanager")
    migrate(database_url)
    topic = unique_topic()
    settings = receiver_settings(database_url, pulsar_broker, topic, tmp_path / "token")
    config = alertmanager_config(settings, tmp_path)
    consumer = EventConsumer(pulsar_broker.url, topic)
    starts = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=40)
    try:
        async with running_receiver(settings, ReceiverMetrics()):
            with alertmanager(binary, config, tmp_path) as manager:
                manager.post(replica_copy("a", starts, data_state="fresh"))
                assert await statuses(database_url, "firing", 20) == [("firing",)]
                manager.post(replica_copy("a", starts, resolved=True, data_state="missing"))
                assert await statuses(database_url, "resolved", 20) == [("resolved",)]
                events = await asyncio.to_thread(consumer.receive, 2, 20)
    finally:
        consumer.close()
    [(_, _, resolved_by, _, _)] = rows(database_url, ROW)
    assert resolved_by == "data_lost"
    resolved = events[1].event
    assert (resolved["event_type"], resolved["resolved_by"]) == ("rate_limit.alert.resolved", "data_lost")
    assert resolved["message"].startswith("Resolved (data lost, recovery not seen): ")


async def test_an_inhibited_resolution_is_reconciled_from_alertmanager_within_seconds(
    tmp_path: Path, database_url: str, pulsar_broker: EmbeddedPulsar
) -> None:
    binary = require_binary("prometheus-alertmanager")
    migrate(database_url)
    topic = unique_topic()
    consumer = EventConsumer(pulsar_broker.url, topic)
    settings = receiver_settings(database_url, pulsar_broker, topic, tmp_path / "token")
    config = alertmanager_config(settings, tmp_path)
    starts = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=40)
    critical = {**LABELS}
    exhausted = {**LABELS, "alertname": "DICTRateLimitExhausted"}
    try:
        with alertmanager(binary, config, tmp_path) as manager:
            settings = settings.replace(
                alertmanager_url=manager.url, reconcile_interval_seconds=0.5, reconcile_grace_seconds=5.0
            )
            async with running_receiver(settings, ReceiverMetrics()):
                manager.post(am_alert(critical, starts_at=starts))
                assert await statuses(database_url, "firing", 20) == [("firing",)]
                manager.post(am_alert(exhausted, starts_at=starts + timedelta(seconds=20)))
                query = "SELECT alert_name, status FROM dict_rate_limit_alerts ORDER BY alert_name"
                both = [("DICTRateLimitCritical", "firing"), ("DICTRateLimitExhausted", "firing")]
                assert await eventually(query, database_url, both, 20) == both
                manager.post(am_alert(critical, starts_at=starts, resolved=True))  # while inhibited
                still = await asyncio.to_thread(manager.alerts)
                await asyncio.sleep(2)  # well within the 5 s grace: an Alertmanager may resend it yet
                within_grace = rows(database_url, query)
                expected = [("DICTRateLimitCritical", "resolved"), ("DICTRateLimitExhausted", "firing")]
                found = await eventually(query, database_url, expected, 20)
                events = await asyncio.to_thread(consumer.receive, 3, 20)
    finally:
        consumer.close()
    assert all(a["labels"]["alertname"] == "DICTRateLimitExhausted" for a in still)
    assert within_grace == both
    assert found == expected
    by = rows(database_url, "SELECT resolved_by FROM dict_rate_limit_alerts WHERE status = 'resolved'")
    assert by == [("reconciled",)]
    resolved = [e.event for e in events if e.event["event_type"] == "rate_limit.alert.resolved"]
    assert [(e["alert_name"], e["resolved_by"]) for e in resolved] == [
        ("DICTRateLimitCritical", "reconciled")
    ]


async def test_without_alertmanager_url_the_notifying_alertmanager_is_asked(
    tmp_path: Path, database_url: str, pulsar_broker: EmbeddedPulsar
) -> None:
    """Default: the receiver learns the Alertmanager from its notifications' externalURL."""
    binary = require_binary("prometheus-alertmanager")
    migrate(database_url)
    topic = unique_topic()
    settings = receiver_settings(database_url, pulsar_broker, topic, tmp_path / "token")
    settings = settings.replace(reconcile_interval_seconds=1.0, reconcile_grace_seconds=2.0)
    assert settings.alertmanager_url is None
    config = alertmanager_config(settings, tmp_path)
    starts = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=40)
    query = "SELECT alert_name, status, resolved_by, alertmanager_url FROM dict_rate_limit_alerts ORDER BY 1"
    with alertmanager(binary, config, tmp_path) as manager:
        async with running_receiver(settings, ReceiverMetrics()):
            manager.post(am_alert(LABELS, starts_at=starts))
            assert await statuses(database_url, "firing", 20) == [("firing",)]
            manager.post(am_alert({**LABELS, "alertname": "DICTRateLimitExhausted"}, starts_at=starts))
            expected = [
                ("DICTRateLimitCritical", "firing", None, manager.url),
                ("DICTRateLimitExhausted", "firing", None, manager.url),
            ]
            assert await eventually(query, database_url, expected, 20) == expected
            store_snapshot(database_url, 3628, 34.4)  # the bucket now: what the resolution records
            manager.post(am_alert(LABELS, starts_at=starts, resolved=True))  # inhibited: not delivered
            expected[0] = ("DICTRateLimitCritical", "resolved", "reconciled", manager.url)
            assert await eventually(query, database_url, expected, 20) == expected
    resolution = (
        "SELECT o.available_tokens, o.exhaustion_projection_seconds FROM dict_rate_limit_alert_outbox o"
        " WHERE o.event_type = 'rate_limit.alert.resolved'"
    )
    assert rows(database_url, resolution) == [(3628, 34.4)]


async def test_no_reconciliation_while_alertmanager_cannot_be_asked(
    tmp_path: Path, database_url: str, pulsar_broker: EmbeddedPulsar
) -> None:
    binary = require_binary("prometheus-alertmanager")
    migrate(database_url)
    topic = unique_topic()
    settings = receiver_settings(database_url, pulsar_broker, topic, tmp_path / "token")
    config = alertmanager_config(settings, tmp_path)
    starts = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=40)
    with alertmanager(binary, config, tmp_path) as manager:
        async with running_receiver(settings, ReceiverMetrics()):
            manager.post(am_alert(LABELS, starts_at=starts))
            assert await statuses(database_url, "firing", 20) == [("firing",)]
    # Alertmanager is gone; a receiver pointed at it must keep the row firing.
    settings = settings.replace(
        alertmanager_url=manager.url, reconcile_interval_seconds=0.5, reconcile_grace_seconds=1.0
    )
    async with running_receiver(settings, ReceiverMetrics()):
        await asyncio.sleep(3)
    assert rows(database_url, "SELECT status FROM dict_rate_limit_alerts") == [("firing",)]
