"""Hostile webhook input against the real webhook and PostgreSQL: each case is a 4xx with its reason,
counted, and the next good notification is recorded at once; any 5xx would be counted too."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from aiohttp.test_utils import TestClient

from exporter.config import Settings
from exporter.receiver.metrics import ReceiverMetrics
from exporter.receiver.webhook import create_app
from tests.support.receiver import AUTH, TOKEN, alert, migrate, payload, rows

Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]


@pytest.fixture
def metrics() -> ReceiverMetrics:
    return ReceiverMetrics()


@pytest.fixture
async def client(aiohttp_client: MakeClient, database_url: str, metrics: ReceiverMetrics) -> Client:
    migrate(database_url)
    settings = Settings(database_url=database_url, webhook_bearer_token=TOKEN)
    return await aiohttp_client(create_app(settings, metrics=metrics, relay=None))


def sample(metrics: ReceiverMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def nested(depth: int) -> bytes:
    body = payload(alert("firing"))
    body["alerts"][0]["annotations"] = {}
    text = json.dumps(body)
    deep = "[" * depth + "]" * depth
    return text.replace('"annotations": {}', f'"annotations": {{}}, "x": {deep}').encode()


def with_truncated(text: str) -> bytes:
    return (
        json.dumps(payload(alert("firing")))
        .replace('"truncatedAlerts": 0', f'"truncatedAlerts": {text}')
        .encode()
    )


HOSTILE: list[tuple[str, bytes, int, str, str]] = [
    ("truncated 1e309", with_truncated("1" + "0" * 309), 400, "invalid_field", "truncatedAlerts"),
    ("truncated 2^64", with_truncated(str(2**64)), 400, "invalid_field", "truncatedAlerts"),
    ("huge int 5000 digits", with_truncated("9" * 5000), 400, "not_json", ""),
    ("nested 970", nested(970), 400, "invalid_field", ""),
    ("nested 40", nested(40), 400, "invalid_field", ""),
    ("nested 100000", nested(100_000), 400, "invalid_field", ""),
]


@pytest.mark.parametrize(("case", "body", "status", "reason", "field"), HOSTILE, ids=[h[0] for h in HOSTILE])
async def test_hostile_bodies_are_4xx_with_a_reason_and_the_next_alert_goes_through(
    client: Client,
    metrics: ReceiverMetrics,
    database_url: str,
    *,
    case: str,
    body: bytes,
    status: int,
    reason: str,
    field: str,
) -> None:
    response = await client.post("/alerts", data=body, headers={**AUTH, "Content-Type": "application/json"})
    assert response.status == status, case
    answer = await response.json()
    assert answer["error"]
    assert answer.get("field", "") == field
    assert sample(metrics, "dict_rate_limit_webhook_invalid_payloads_total", reason=reason) == 1
    assert sample(metrics, "dict_rate_limit_webhook_truncated_alerts_total") == 0  # never +Inf
    good = await client.post("/alerts", json=payload(alert("firing")), headers=AUTH)
    assert good.status == 200
    assert rows(database_url, "SELECT count(*) FROM dict_rate_limit_alerts") == [(1,)]
    assert sample(metrics, "dict_rate_limit_webhook_requests_total", status="500") == 0


async def test_a_moderately_nested_unknown_field_is_still_accepted(client: Client) -> None:
    response = await client.post(
        "/alerts", data=nested(10), headers={**AUTH, "Content-Type": "application/json"}
    )
    assert response.status == 200


@pytest.mark.parametrize("raw", [b"Bearer \xff\xfe", b"Bearer s3cret-webhook-token\xe9", b"\x80\x81 x"])
async def test_a_non_utf8_authorization_header_is_a_401_not_a_500(
    client: Client, metrics: ReceiverMetrics, raw: bytes
) -> None:
    reader, writer = await _raw_connection(client)
    body = json.dumps(payload(alert("firing"))).encode()
    writer.write(
        b"POST /alerts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: "
        + raw
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\nConnection: close\r\n\r\n"
        + body
    )
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    assert status_line.split()[1] == b"401", status_line
    assert sample(metrics, "dict_rate_limit_webhook_requests_total", status="401") == 1
    assert sample(metrics, "dict_rate_limit_webhook_requests_total", status="500") == 0


async def _raw_connection(client: Client) -> Any:
    return await asyncio.open_connection(client.server.host, client.server.port)


@pytest.mark.parametrize(
    ("starts", "ends", "status", "field"),
    [
        ("2026-11-23T09:10:00Z", "2026-11-23T09:05:00Z", "resolved", "alerts[0].endsAt"),
        ("9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z", "firing", "alerts[0].startsAt"),
        ("0001-01-01T00:00:00Z", "0001-01-01T00:00:00Z", "firing", "alerts[0].startsAt"),
        ("2026-11-23T09:00:00Z", "9999-12-31T00:00:00Z", "resolved", "alerts[0].endsAt"),
    ],
)
async def test_implausible_alert_times_are_refused_with_their_reason(
    client: Client,
    metrics: ReceiverMetrics,
    database_url: str,
    *,
    starts: str,
    ends: str,
    status: str,
    field: str,
) -> None:
    response = await client.post(
        "/alerts", json=payload(alert(status, starts_at=starts, ends_at=ends)), headers=AUTH
    )
    assert response.status == 400
    answer = await response.json()
    assert answer["field"] == field
    assert sample(metrics, "dict_rate_limit_webhook_invalid_payloads_total", reason="implausible_time") == 1
    assert rows(database_url, "SELECT count(*) FROM dict_rate_limit_alerts") == [(0,)]
    # The zero endsAt of a firing alert stays the normal "no end yet".
    good = await client.post("/alerts", json=payload(alert("firing")), headers=AUTH)
    assert good.status == 200


async def test_an_alert_takes_the_latest_plausible_snapshot_not_one_dated_9999(
    client: Client, database_url: str
) -> None:
    await asyncio.to_thread(_store_states, database_url)  # off the loop the webhook runs on
    response = await client.post("/alerts", json=payload(alert("firing", annotations={})), headers=AUTH)
    assert response.status == 200
    assert rows(database_url, "SELECT available_tokens FROM dict_rate_limit_alerts") == [(100,)]


def _store_states(url: str) -> None:
    """A plausible state of ENTRIES_WRITE one minute ago (100 tokens) and a forged one dated 9999 (999)."""
    now = datetime.now(UTC).replace(microsecond=0)
    with psycopg.connect(url) as conn:
        for moment, tokens in ((now - timedelta(minutes=1), 100), (datetime(9999, 12, 31, tzinfo=UTC), 999)):
            conn.execute("SELECT create_dict_rate_limit_state_partition(%s)", [moment.date()])
            conn.execute(
                "INSERT INTO dict_rate_limit_states (endpoint_id, psp_category, available_tokens, capacity,"
                " refill_tokens, refill_period_sec, utilization_percent, remaining_ratio,"
                " recovery_eta_seconds, response_time)"
                " VALUES ('ENTRIES_WRITE', 'A', %s, 1000, 20, 60, 90, 0.1, 60, %s)",
                [tokens, moment],
            )
