"""The Pulsar alert event: body valid against schemas/rate-limit-alert-event.schema.json, stable ids equal to
the ones PostgreSQL assigns, key and properties as documented."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import jsonschema
import psycopg
import pytest

from exporter.receiver.events import CREATED, RESOLVED, SCHEMA_VERSION, AlertEvent, OutboxRow, event_id_for
from tests.support.env import ROOT
from tests.support.receiver import migrate

SCHEMA = json.loads((ROOT / "schemas" / "rate-limit-alert-event.schema.json").read_text())
STARTS = datetime(2026, 11, 23, 9, 0, 0, 123456, tzinfo=UTC)
ENDS = datetime(2026, 11, 23, 9, 5, 0, tzinfo=UTC)


def validate(event: dict[str, object]) -> None:
    jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.FormatChecker()).validate(event)


def row(event_type: str = CREATED, **changes: object) -> OutboxRow:
    values: dict[str, object] = {
        "id": 1,
        "event_id": event_id_for("fp1", STARTS, event_type),
        "event_type": event_type,
        "alert_name": "DICTRateLimitCritical",
        "fingerprint": "fp1",
        "severity": "critical",
        "endpoint_id": "ENTRIES_WRITE",
        "psp_category": "A",
        "status": "resolved" if event_type == RESOLVED else "firing",
        "starts_at": STARTS,
        "ends_at": ENDS if event_type == RESOLVED else None,
        "resolved_at": ENDS if event_type == RESOLVED else None,
        "resolved_by": "alertmanager" if event_type == RESOLVED else None,
        "available_tokens": -15,
        "capacity": 36000,
        "utilization_percent": 100.04,
        "recovery_eta_seconds": 1800.75,
        "exhaustion_projection_seconds": 0.0,
        "summary": "A DICT rate-limit bucket is at or below its CRITICAL threshold.",
        "description": "ENTRIES_WRITE (category A) has\n  -15 of 36000 tokens.",
    }
    values.update(changes)
    return OutboxRow(**values)  # type: ignore[arg-type]


def test_schema_is_a_valid_draft_2020_12_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert SCHEMA["properties"]["schema_version"]["const"] == SCHEMA_VERSION


def test_created_event_carries_the_seed_fields_and_validates() -> None:
    event = AlertEvent.from_row(row())
    body = json.loads(event.body())
    validate(body)
    assert list(body)[:13] == [
        "event_id",
        "event_type",
        "timestamp",
        "endpoint_id",
        "severity",
        "available_tokens",
        "capacity",
        "utilization_percent",
        "recovery_eta_seconds",
        "exhaustion_projection_seconds",
        "psp_category",
        "message",
        "schema_version",
    ]
    assert body["event_type"] == "rate_limit.alert.created"
    assert body["timestamp"] == "2026-11-23T09:00:00.123456Z"
    assert body["available_tokens"] == -15
    # Built from the event's own numbers (the seed row: -15 of 36000, 100.04 %, 0 s, 1800.75 s), the
    # rule's description apart.
    assert body["message"] == (
        "A DICT rate-limit bucket is at or below its CRITICAL threshold. ENTRIES_WRITE: -15 of 36000 tokens"
        " left, 100.04 % used; empty in 0s at the current rate; full again in 30m 1s if traffic stops."
    )
    assert body["rule_description"] == "ENTRIES_WRITE (category A) has -15 of 36000 tokens."
    assert body["ends_at"] is None


def test_message_numbers_follow_the_fields_not_the_rules_description() -> None:
    # The description says 55 minutes (Prometheus's projection); the event's field says 34 s.
    event = AlertEvent.from_row(
        row(
            available_tokens=3628,
            utilization_percent=89.92222,
            exhaustion_projection_seconds=34.4,
            recovery_eta_seconds=3718.6,
            description="ENTRIES_WRITE has 2888 of 36000 tokens left. Empty in 55m at the current rate.",
        )
    )
    assert event.message.endswith(
        "ENTRIES_WRITE: 3628 of 36000 tokens left, 89.92 % used; empty in 34s at the current rate;"
        " full again in 1h 1m 59s if traffic stops."
    )
    assert "55m" not in event.message
    assert "2888" not in event.message
    assert event.rule_description is not None
    assert "55m" in event.rule_description
    not_draining = AlertEvent.from_row(row(exhaustion_projection_seconds=None, utilization_percent=None))
    assert "-15 of 36000 tokens left; not draining; full again in 30m 1s" in not_draining.message
    unknown = AlertEvent.from_row(row(available_tokens=None))
    assert unknown.message.endswith("ENTRIES_WRITE: bucket values unknown.")


def test_resolved_event_is_timed_at_the_end_and_validates() -> None:
    body = json.loads(AlertEvent.from_row(row(RESOLVED)).body())
    validate(body)
    assert body["event_type"] == "rate_limit.alert.resolved"
    assert body["timestamp"] == "2026-11-23T09:05:00.000000Z"
    assert body["ends_at"] == body["timestamp"]
    assert body["resolved_by"] == "alertmanager"
    assert body["message"].startswith("Resolved: A DICT rate-limit bucket")
    assert "ENTRIES_WRITE: -15 of 36000 tokens left" in body["message"]


def test_health_alert_event_without_policy_validates_and_is_keyed_by_alert_name() -> None:
    event = AlertEvent.from_row(
        row(
            alert_name="DICTRateLimitBridgeDown",
            endpoint_id=None,
            psp_category=None,
            available_tokens=None,
            capacity=None,
            utilization_percent=None,
            recovery_eta_seconds=None,
            exhaustion_projection_seconds=None,
            description=None,
        )
    )
    validate(event.to_dict())
    assert event.key == "DICTRateLimitBridgeDown"
    assert event.message == "A DICT rate-limit bucket is at or below its CRITICAL threshold."
    assert event.properties()["psp_category"] == ""


def test_key_and_properties_name_policy_type_severity_category_and_version() -> None:
    event = AlertEvent.from_row(row())
    assert event.key == "ENTRIES_WRITE"
    assert event.properties() == {
        "event_type": "rate_limit.alert.created",
        "severity": "critical",
        "psp_category": "A",
        "schema_version": SCHEMA_VERSION,
        "event_id": event.event_id,
    }


@pytest.mark.parametrize(
    ("field", "value"),
    [("event_type", "rate_limit.alert.updated"), ("severity", "page"), ("event_id", "not-a-uuid")],
)
def test_schema_rejects_what_consumers_must_not_receive(field: str, value: str) -> None:
    body = AlertEvent.from_row(row()).to_dict()
    body[field] = value
    with pytest.raises(jsonschema.ValidationError):
        validate(body)


def test_event_id_is_stable_and_distinct_per_transition() -> None:
    created = event_id_for("fp1", STARTS, CREATED)
    assert created == event_id_for("fp1", STARTS, CREATED)
    assert created != event_id_for("fp1", STARTS, RESOLVED)
    assert created != event_id_for("fp2", STARTS, CREATED)
    assert isinstance(created, uuid.UUID)


def test_python_event_id_equals_the_one_postgresql_assigns(database_url: str) -> None:
    migrate(database_url)
    with psycopg.connect(database_url) as conn:
        got = conn.execute(
            "SELECT dict_rate_limit_alert_event_id(%s, %s, %s)", ["fp1", STARTS, RESOLVED]
        ).fetchone()
    assert got == (event_id_for("fp1", STARTS, RESOLVED),)


#: 0003's body of dict_rate_limit_alert_event_id(), the ids every event published so far carries.
ORIGINAL_EVENT_ID = (
    "md5(fp || '|' || (extract(epoch FROM ts) * 1000000)::bigint::text || '|rate_limit.alert.created')::uuid"
)
#: 50,000 instants 20,011.123457 s apart from 2000-01-01 (to 2031), microseconds included.
INSTANTS = (
    "SELECT md5(g::text) AS fp,"
    " timestamptz '2000-01-01 00:00:00+00' + g * interval '20011.123457 seconds' AS ts"
    " FROM generate_series(1, 50000) g"
)


def test_the_event_id_function_is_inlined_and_gives_the_ids_of_0003_in_any_time_zone(
    database_url: str,
) -> None:
    migrate(database_url)
    with psycopg.connect(database_url) as conn:
        plan = conn.execute(
            "EXPLAIN VERBOSE SELECT dict_rate_limit_alert_event_id(md5(g::text), now(), 'x')"
            " FROM generate_series(1, 2) g"
        ).fetchall()
        # Inlined (sql/0010): the plan holds the body's md5, not a call of the SQL function.
        assert "dict_rate_limit_alert_event_id" not in str(plan)
        assert "md5" in str(plan)
        for zone in ("UTC", "America/Sao_Paulo", "Pacific/Chatham"):
            conn.execute(psycopg.sql.SQL("SET TimeZone = {}").format(psycopg.sql.Literal(zone)))
            differ = conn.execute(
                f"SELECT count(*) FROM ({INSTANTS}) t"  # noqa: S608 - constants of this module
                f" WHERE dict_rate_limit_alert_event_id(fp, ts, 'rate_limit.alert.created')"
                f" <> {ORIGINAL_EVENT_ID}"
            ).fetchone()
            assert differ == (0,), zone
        sample = conn.execute(
            f"SELECT fp, ts, dict_rate_limit_alert_event_id(fp, ts, %s) FROM ({INSTANTS}) t"  # noqa: S608
            " WHERE extract(microseconds FROM ts)::bigint %% 1000000 <> 0 LIMIT 5",
            [CREATED],
        ).fetchall()
    assert len(sample) == 5
    for fingerprint, starts_at, got in sample:
        assert got == event_id_for(fingerprint, starts_at, CREATED)


def test_participant_is_the_last_field_and_a_property_only_when_set() -> None:
    single = AlertEvent.from_row(row())
    assert single.to_dict()["participant"] is None
    assert "participant" not in single.properties()
    named = AlertEvent.from_row(row(participant="bank-b"))
    validate(named.to_dict())
    assert list(named.to_dict())[-1] == "participant"
    assert named.to_dict()["participant"] == "bank-b"
    assert named.properties()["participant"] == "bank-b"
    assert named.key == single.key  # ordering per policy, as before
