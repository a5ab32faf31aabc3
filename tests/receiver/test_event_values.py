"""Each alert event carries the bucket values of its own change (issue 12, item 7), with a message whose
numbers are the event's: the real receiver process, PostgreSQL and a pulsar-lite broker.

Snapshot A is the latest when the alert fires, snapshot B when it resolves. Both events are published
only after the resolution (the first receiver has no broker), so a relay that read the alert row at
publication time would give the created event B's values: the outbox row must keep A's.
"""

from __future__ import annotations

import json
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jsonschema
import psycopg
import pytest

from devstack.embedded import EmbeddedPulsar, free_port
from tests.receiver.test_receiver_process import post, receiver_env, receiver_process
from tests.support.env import ROOT
from tests.support.receiver import TOKEN, EventConsumer, alert, migrate, payload, rows, unique_topic

SCHEMA = json.loads((ROOT / "schemas" / "rate-limit-alert-event.schema.json").read_text())
CAPACITY = 36000
REFILL_PER_SECOND = 20
#: What Prometheus rendered at its evaluation: its own (different) projection, and the firing's numbers
#: repeated by the resolved notification.
RULE_DESCRIPTION = "ENTRIES_WRITE has 2888 of 36000 tokens left. Empty in 55m at the current rate."
UNSENT = "SELECT count(*) FROM dict_rate_limit_alert_outbox WHERE sent_at IS NULL"
NUMBERS = ("available_tokens", "capacity", "utilization_percent", "recovery_eta_seconds")


def store_snapshot(
    database_url: str, available: int, exhaustion: float | None, moment: datetime | None = None
) -> None:
    """One ENTRIES_WRITE snapshot (now unless ``moment``), with the derived values the exporter stores."""
    moment = moment or datetime.now(UTC)
    with psycopg.connect(database_url) as conn:
        conn.execute("SELECT create_dict_rate_limit_state_partition(%s)", [moment.date()])
        conn.execute(
            "INSERT INTO dict_rate_limit_states (endpoint_id, psp_category, available_tokens, capacity,"
            " refill_tokens, refill_period_sec, utilization_percent, remaining_ratio,"
            " recovery_eta_seconds, exhaustion_projection_seconds, response_time)"
            " VALUES ('ENTRIES_WRITE', 'A', %s, %s, 1200, 60, %s, %s, %s, %s, %s)",
            [
                available,
                CAPACITY,
                100 * (1 - available / CAPACITY),
                available / CAPACITY,
                (CAPACITY - available) / REFILL_PER_SECOND,
                exhaustion,
                moment,
            ],
        )


def notification(status: str) -> object:
    annotations = {"summary": "A DICT rate-limit bucket is low.", "description": RULE_DESCRIPTION}
    ends = "2026-11-23T09:05:00Z" if status == "resolved" else "0001-01-01T00:00:00Z"
    return payload(alert(status, annotations=annotations, ends_at=ends))


def test_resolved_event_carries_the_resolutions_snapshot_and_the_created_one_the_firings(
    tmp_path: Path, database_url: str, pulsar_broker: EmbeddedPulsar
) -> None:
    migrate(database_url)
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    topic, port = unique_topic(), free_port()
    dead_broker = f"pulsar://127.0.0.1:{free_port()}"  # nothing listens: both events wait in the outbox
    now = datetime.now(UTC)
    with receiver_process(
        receiver_env(database_url, token, dead_broker, topic, port), tmp_path / "r.log"
    ) as first:
        store_snapshot(database_url, 2888, 29.0, now - timedelta(minutes=2))  # A
        assert post(port, notification("firing")) == 200
        store_snapshot(database_url, 3628, 34.4, now - timedelta(minutes=1))  # B
        store_snapshot(database_url, 999, 1.0, datetime(9999, 12, 31, tzinfo=UTC))  # forged: never latest
        assert post(port, notification("resolved")) == 200
        assert rows(database_url, UNSENT) == [(2,)]
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    consumer = EventConsumer(pulsar_broker.url, topic)
    try:
        with receiver_process(
            receiver_env(database_url, token, pulsar_broker.url, topic, port), tmp_path / "r.log"
        ):
            received = consumer.receive(2, 30)
    finally:
        consumer.close()
    created, resolved = (item.event for item in received)
    for event in (created, resolved):
        jsonschema.Draft202012Validator(SCHEMA).validate(event)
        assert event["rule_description"] == RULE_DESCRIPTION
        assert event["schema_version"] == "1.2"
    assert created["event_type"] == "rate_limit.alert.created"
    assert [created[name] for name in NUMBERS] == [2888, 36000, pytest.approx(91.9778, abs=1e-4), 1655.6]
    assert created["exhaustion_projection_seconds"] == 29.0
    assert created["message"] == (
        "A DICT rate-limit bucket is low. ENTRIES_WRITE: 2888 of 36000 tokens left, 91.98 % used;"
        " empty in 29s at the current rate; full again in 27m 36s if traffic stops."
    )
    assert resolved["event_type"] == "rate_limit.alert.resolved"
    assert [resolved[name] for name in NUMBERS] == [3628, 36000, pytest.approx(89.9222, abs=1e-4), 1618.6]
    assert resolved["exhaustion_projection_seconds"] == 34.4
    assert resolved["message"] == (
        "Resolved: A DICT rate-limit bucket is low. ENTRIES_WRITE: 3628 of 36000 tokens left, 89.92 % used;"
        " empty in 34s at the current rate; full again in 26m 59s if traffic stops."
    )
    # The audit row holds the latest values: those of the resolution.
    assert rows(
        database_url, "SELECT available_tokens, exhaustion_projection_seconds FROM dict_rate_limit_alerts"
    ) == [(3628, 34.4)]


def test_the_safety_nets_resolution_records_the_snapshot_it_resolved_on(database_url: str) -> None:
    migrate(database_url)
    now = datetime.now(UTC)
    store_snapshot(database_url, 2888, 29.0, now - timedelta(minutes=9))  # A: below 10 %, fires
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO dict_rate_limit_alerts (fingerprint, alert_name, severity, endpoint_id,"
            " psp_category, status, starts_at, available_tokens, capacity, utilization_percent,"
            " recovery_eta_seconds, exhaustion_projection_seconds, labels, annotations, payload)"
            " SELECT 'fp', 'DICTRateLimitCritical', 'critical', 'ENTRIES_WRITE', 'A', 'firing', %s, v.*,"
            " '{}', '{}', '{}' FROM dict_rate_limit_latest_values('ENTRIES_WRITE') v",
            [now - timedelta(minutes=8)],
        )
    store_snapshot(database_url, 30000, None, now - timedelta(minutes=1))  # recovered, not draining
    assert rows(database_url, "SELECT auto_resolve_alerts()") == [(1,)]
    assert rows(
        database_url,
        "SELECT event_type, available_tokens, exhaustion_projection_seconds FROM dict_rate_limit_alert_outbox"
        " ORDER BY id",
    ) == [("rate_limit.alert.created", 2888, 29.0), ("rate_limit.alert.resolved", 30000, None)]
