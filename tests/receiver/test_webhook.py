"""The webhook against a real PostgreSQL: lifecycle and idempotency, authentication, status codes and
reasons, metrics after commit, 503 while the database is unreachable, health."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from devstack.embedded import free_port
from exporter.config import ConfigError, ReceiverSettings
from exporter.receiver.metrics import ReceiverMetrics
from exporter.receiver.webhook import StartupError, create_app, run, serve
from tests.support.certs import make_pki
from tests.support.env import require_binary
from tests.support.receiver import AUTH, TOKEN, alert, migrate, payload, rows
from tests.support.tcp_proxy import TcpProxy

Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]
ALERT_ROW = (
    "SELECT status, starts_at, ends_at, resolved_at IS NOT NULL, resolved_by, available_tokens, capacity,"
    " utilization_percent, recovery_eta_seconds, exhaustion_projection_seconds, endpoint_id"
    " FROM dict_rate_limit_alerts"
)
OUTBOX = "SELECT event_type, sent_at FROM dict_rate_limit_alert_outbox ORDER BY id"


def settings_for(database_url: str, **changes: Any) -> ReceiverSettings:
    return ReceiverSettings(database_url=database_url, webhook_bearer_token=TOKEN, **changes)


@pytest.fixture
def metrics() -> ReceiverMetrics:
    return ReceiverMetrics()


@pytest.fixture
async def client(aiohttp_client: MakeClient, database_url: str, metrics: ReceiverMetrics) -> Client:
    migrate(database_url)
    return await aiohttp_client(create_app(settings_for(database_url), metrics=metrics, relay=None))


async def post(
    client: Client, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    response = await client.post("/alerts", json=body, headers=AUTH if headers is None else headers)
    return response.status, await response.json()


def sample(metrics: ReceiverMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_firing_then_resolved_is_one_row_with_both_times_and_two_queued_events(
    client: Client, database_url: str, metrics: ReceiverMetrics
) -> None:
    status, body = await post(client, payload(alert("firing")))
    assert (status, body["created"], body["resolved"]) == (200, 1, 0)
    status, body = await post(client, payload(alert("resolved", ends_at="2026-11-23T09:05:00Z")))
    assert (status, body["created"], body["resolved"]) == (200, 0, 1)

    [record] = rows(database_url, ALERT_ROW)
    assert record[0] == "resolved"
    assert record[1].isoformat() == "2026-11-23T09:00:00.123456+00:00"
    assert record[2].isoformat() == "2026-11-23T09:05:00+00:00"
    assert record[3:5] == (True, "alertmanager")
    assert rows(database_url, OUTBOX) == [
        ("rate_limit.alert.created", None),
        ("rate_limit.alert.resolved", None),
    ]
    labels = {"endpoint_id": "ENTRIES_WRITE", "severity": "warning", "psp_category": "A"}
    assert sample(metrics, "dict_rate_limit_alerts_created_total", **labels) == 1
    assert sample(metrics, "dict_rate_limit_alerts_resolved_total", **labels) == 1


async def test_the_same_payload_posted_100_times_is_one_row_and_one_event(
    client: Client, database_url: str, metrics: ReceiverMetrics
) -> None:
    body = payload(alert("firing"))
    statuses = [(await post(client, body))[0] for _ in range(100)]
    assert statuses == [200] * 100
    assert rows(database_url, "SELECT count(*) FROM dict_rate_limit_alerts") == [(1,)]
    assert rows(database_url, OUTBOX) == [("rate_limit.alert.created", None)]
    assert sample(metrics, "dict_rate_limit_webhook_duplicates_total") == 99
    labels = {"endpoint_id": "ENTRIES_WRITE", "severity": "warning", "psp_category": "A"}
    assert sample(metrics, "dict_rate_limit_alerts_created_total", **labels) == 1


async def test_concurrent_deliveries_of_an_alertmanager_cluster_record_each_transition_once(
    client: Client, database_url: str
) -> None:
    firing, resolved = payload(alert("firing")), payload(alert("resolved", ends_at="2026-11-23T09:05:00Z"))
    results = await asyncio.gather(*(post(client, firing) for _ in range(10)))
    assert {status for status, _ in results} == {200}
    assert sum(body["created"] for _, body in results) == 1
    results = await asyncio.gather(*(post(client, resolved) for _ in range(10)))
    assert sum(body["resolved"] for _, body in results) == 1
    assert [r[0] for r in rows(database_url, OUTBOX)] == [
        "rate_limit.alert.created",
        "rate_limit.alert.resolved",
    ]


async def test_notifications_sharing_alerts_in_opposite_orders_never_deadlock(
    client: Client, database_url: str
) -> None:
    # Two Alertmanager peers group the same alerts differently: each transaction locks every fingerprint
    # it touches; taken in arrival order, [A, B] against [B, A] deadlocked and one of them got a 503.
    a, b = alert(endpoint_id="ENTRIES_WRITE"), alert(endpoint_id="CLAIMS_READ")
    forward, backward = payload(a, b), payload(b, a)
    for _ in range(5):
        results = await asyncio.gather(*(post(client, forward if i % 2 else backward) for i in range(20)))
        assert {status for status, _ in results} == {200}
    assert sum(1 for _ in rows(database_url, "SELECT id FROM dict_rate_limit_alerts")) == 2


async def test_a_resolved_row_is_final_a_late_firing_of_the_same_instance_is_ignored(
    client: Client, database_url: str
) -> None:
    await post(client, payload(alert("firing")))
    await post(client, payload(alert("resolved", ends_at="2026-11-23T09:05:00Z")))
    status, body = await post(client, payload(alert("firing")))
    assert (status, body["duplicates"]) == (200, 1)
    assert rows(database_url, "SELECT status FROM dict_rate_limit_alerts") == [("resolved",)]
    assert len(rows(database_url, OUTBOX)) == 2


async def test_a_new_firing_instance_after_resolution_is_a_new_row(client: Client, database_url: str) -> None:
    await post(client, payload(alert("firing")))
    await post(client, payload(alert("resolved", ends_at="2026-11-23T09:05:00Z")))
    await post(client, payload(alert("firing", starts_at="2026-11-23T10:00:00Z")))
    assert rows(database_url, "SELECT status FROM dict_rate_limit_alerts ORDER BY starts_at") == [
        ("resolved",),
        ("firing",),
    ]


async def test_a_resolution_whose_firing_was_never_received_yields_both_events(
    client: Client, database_url: str, metrics: ReceiverMetrics
) -> None:
    status, body = await post(client, payload(alert("resolved", ends_at="2026-11-23T09:05:00Z")))
    assert (status, body["created"], body["resolved"]) == (200, 1, 1)
    assert [r[0] for r in rows(database_url, OUTBOX)] == [
        "rate_limit.alert.created",
        "rate_limit.alert.resolved",
    ]


async def test_bucket_values_come_from_numeric_annotations_and_odd_ones_are_stored_as_null(
    client: Client, database_url: str
) -> None:
    annotations = {
        "summary": "low",
        "available_tokens": "-15",
        "capacity": "36000",
        "utilization_percent": "100.04",
        "recovery_eta_seconds": "not a number",
        "exhaustion_projection_seconds": "+Inf",
    }
    status, _ = await post(client, payload(alert(annotations=annotations)))
    assert status == 200
    [record] = rows(database_url, ALERT_ROW)
    assert record[5:10] == (-15, 36000, 100.04, None, None)


async def test_without_numeric_annotations_values_come_from_the_policys_latest_snapshot(
    client: Client, database_url: str
) -> None:
    with psycopg.connect(database_url) as conn:
        for available, age in ((30000, "2 minutes"), (3000, "1 minute")):  # the newest one counts
            conn.execute(
                "INSERT INTO dict_rate_limit_states (endpoint_id, psp_category, available_tokens, capacity,"
                " refill_tokens, refill_period_sec, utilization_percent, remaining_ratio,"
                " recovery_eta_seconds, exhaustion_projection_seconds, response_time)"
                " VALUES ('ENTRIES_WRITE', 'A', %s, 36000, 1200, 60, %s, %s, %s, 600, now() - %s::interval)",
                [available, 100 * (1 - available / 36000), available / 36000, (36000 - available) / 20, age],
            )
    assert (await post(client, payload(alert(annotations={"summary": "low", "capacity": "40000"}))))[0] == 200
    [record] = rows(database_url, ALERT_ROW)
    assert record[5:10] == (3000, 40000, pytest.approx(91.6667, abs=1e-3), 1650.0, 600.0)


async def test_health_alert_without_policy_is_counted_with_empty_labels(
    client: Client, database_url: str, metrics: ReceiverMetrics
) -> None:
    health = alert(name="DICTRateLimitBridgeDown", severity="critical", endpoint_id=None, psp_category=None)
    assert (await post(client, payload(health)))[0] == 200
    assert rows(database_url, "SELECT endpoint_id, psp_category FROM dict_rate_limit_alerts") == [
        (None, None)
    ]
    labels = {"endpoint_id": "", "severity": "critical", "psp_category": ""}
    assert sample(metrics, "dict_rate_limit_alerts_created_total", **labels) == 1


async def test_unknown_fields_are_tolerated(client: Client, database_url: str) -> None:
    body = payload(alert())
    body["futureField"] = {"nested": [1, 2]}
    body["alerts"][0]["silencedBy"] = ["x"]
    assert (await post(client, body))[0] == 200


async def test_truncated_alerts_are_counted(client: Client, metrics: ReceiverMetrics) -> None:
    assert (await post(client, payload(alert(), truncated=7)))[0] == 200
    assert sample(metrics, "dict_rate_limit_webhook_truncated_alerts_total") == 7


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}, {"Authorization": "Bearer"}],
    ids=["none", "wrong", "not-bearer", "empty"],
)
async def test_a_missing_or_wrong_token_is_401_and_nothing_is_stored(
    client: Client, database_url: str, metrics: ReceiverMetrics, headers: dict[str, str]
) -> None:
    response = await client.post("/alerts", json=payload(alert()), headers=headers)
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert rows(database_url, "SELECT count(*) FROM dict_rate_limit_alerts") == [(0,)]
    assert sample(metrics, "dict_rate_limit_webhook_requests_total", status="401") == 1


@pytest.mark.parametrize(
    ("mutate", "reason", "metric_reason"),
    [
        (
            lambda b: b["alerts"][0].update(startsAt="yesterday"),
            "alerts[0].startsAt: not an RFC 3339 time",
            "invalid_field",
        ),
        (
            lambda b: b["alerts"][0]["labels"].pop("severity"),
            "alerts[0].labels.severity: must be",
            "invalid_field",
        ),
        (
            lambda b: b["alerts"][0].update(status="pending"),
            "alerts[0].status: must be firing or resolved",
            "invalid_field",
        ),
        (
            lambda b: b["alerts"][0].update(endsAt=ZERO),
            "alerts[0].endsAt: a resolved alert needs",
            "invalid_field",
        ),
        (
            lambda b: b["alerts"][0]["annotations"].update(summary=7),
            "alerts[0].annotations.summary: must be a string",
            "invalid_field",
        ),
        (lambda b: b.update(version="3"), "version: unsupported webhook version", "unsupported_version"),
        (lambda b: b.update(alerts={}), "alerts: must be an array", "invalid_field"),
    ],
)
async def test_invalid_payload_is_400_with_a_reason_naming_the_field(
    client: Client,
    database_url: str,
    metrics: ReceiverMetrics,
    *,
    mutate: Callable[[dict[str, Any]], object],
    reason: str,
    metric_reason: str,
) -> None:
    body = payload(alert("firing"), alert("resolved", ends_at="2026-11-23T09:05:00Z", fingerprint="other"))
    body["alerts"][0]["status"] = "resolved" if "endsAt" in reason else body["alerts"][0]["status"]
    mutate(body)
    status, answer = await post(client, body)
    assert status == 400
    assert answer["error"].startswith(reason), answer
    assert rows(database_url, "SELECT count(*) FROM dict_rate_limit_alerts") == [(0,)]
    assert sample(metrics, "dict_rate_limit_webhook_invalid_payloads_total", reason=metric_reason) == 1


ZERO = "0001-01-01T00:00:00Z"


async def test_a_body_that_is_not_json_is_400(client: Client, metrics: ReceiverMetrics) -> None:
    response = await client.post("/alerts", data=b"{not json", headers=AUTH)
    assert response.status == 400
    assert (await response.json())["error"] == "body is not JSON"
    assert sample(metrics, "dict_rate_limit_webhook_invalid_payloads_total", reason="not_json") == 1


async def test_a_body_over_the_limit_is_413(aiohttp_client: MakeClient, database_url: str) -> None:
    migrate(database_url)
    metrics = ReceiverMetrics()
    app = create_app(settings_for(database_url, webhook_max_body_bytes=2048), metrics=metrics, relay=None)
    client = await aiohttp_client(app)
    big = payload(*(alert(fingerprint=f"fp{i}") for i in range(20)))
    response = await client.post("/alerts", json=big, headers=AUTH)
    assert response.status == 413
    assert sample(metrics, "dict_rate_limit_webhook_invalid_payloads_total", reason="too_large") == 1
    assert rows(database_url, "SELECT count(*) FROM dict_rate_limit_alerts") == [(0,)]


async def test_database_unreachable_is_503_and_the_retry_after_it_returns_is_recorded(
    aiohttp_client: MakeClient, database_url: str
) -> None:
    migrate(database_url)
    with TcpProxy.for_postgres(database_url) as proxy:
        app = create_app(settings_for(proxy.url_for(database_url)), relay=None)
        client = await aiohttp_client(app)
        assert (await client.get("/health/ready")).status == 200
        await asyncio.to_thread(proxy.stop)
        status, body = await post(client, payload(alert()))
        assert status == 503
        assert "database unavailable" in body["error"]
        ready = await client.get("/health/ready")
        assert (ready.status, (await ready.json())["checks"]["database"]) == (503, "down")
        assert rows(database_url, "SELECT count(*) FROM dict_rate_limit_alerts") == [(0,)]
        await asyncio.to_thread(proxy.start)
        # Like Alertmanager: retry until accepted (the pool reconnects with its own backoff).
        answers = [await post(client, payload(alert()))]
        deadline = asyncio.get_running_loop().time() + 30
        while answers[-1][0] != 200 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.5)
            answers.append(await post(client, payload(alert())))
        assert {status for status, _ in answers[:-1]} <= {503}
        assert (answers[-1][0], answers[-1][1]["created"]) == (200, 1)
    assert rows(database_url, "SELECT count(*) FROM dict_rate_limit_alert_outbox") == [(1,)]


async def test_upper_case_severity_of_older_rules_is_recorded_in_lower_case(
    client: Client, database_url: str
) -> None:
    assert (await post(client, payload(alert(severity="CRITICAL"))))[0] == 200
    assert rows(database_url, "SELECT severity FROM dict_rate_limit_alerts") == [("critical",)]


async def test_webhook_over_tls_accepts_a_client_trusting_the_ca(tmp_path: Path, database_url: str) -> None:
    migrate(database_url)
    pki = make_pki(tmp_path)
    ops = free_port()
    settings = settings_for(
        database_url,
        listen_host="127.0.0.1",
        receiver_port=free_port(),
        metrics_port=ops,
        health_check_port=ops,
        receiver_tls_cert_file=pki.server_cert,
        receiver_tls_key_file=pki.server_key,
        pulsar_url=f"pulsar://127.0.0.1:{free_port()}",
    )
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop))
    try:
        trusted = ssl.create_default_context(cafile=pki.ca)
        url = f"https://127.0.0.1:{settings.receiver_port}/alerts"
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                try:
                    async with session.post(
                        url, json=payload(alert()), headers=AUTH, ssl=trusted
                    ) as response:
                        status = response.status
                        break
                except aiohttp.ClientConnectorError:
                    await asyncio.sleep(0.1)
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await session.post(url, json=payload(alert()), headers=AUTH)  # the system CAs do not know it
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert status == 200
    assert rows(database_url, "SELECT count(*) FROM dict_rate_limit_alerts") == [(1,)]


async def test_health_and_metrics_are_served(client: Client) -> None:
    assert await (await client.get("/health/live")).json() == {"status": "ok"}
    ready = await client.get("/health/ready")
    assert await ready.json() == {"status": "ok", "checks": {"database": "ok", "pulsar": "disabled"}}
    text = await (await client.get("/metrics")).text()
    assert 'dict_rate_limit_webhook_requests_total{status="503"} 0.0' in text
    assert "dict_rate_limit_outbox_backlog 0.0" in text
    assert "dict_rate_limit_receiver_build_info{" in text
    promtool = require_binary("promtool")
    lint = await asyncio.to_thread(
        subprocess.run,
        [promtool, "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        check=False,
    )
    assert lint.returncode == 0, lint.stderr


def test_start_up_refuses_without_a_token_unless_told_to(database_url: str) -> None:
    with pytest.raises(ConfigError) as error:
        run(ReceiverSettings(database_url=database_url))
    assert error.value.key == "WEBHOOK_BEARER_TOKEN_FILE"
    with pytest.raises(ConfigError):
        create_app(ReceiverSettings(database_url=database_url))
    create_app(ReceiverSettings(database_url=database_url, webhook_allow_unauthenticated=True), relay=None)


async def test_start_up_fails_clearly_on_an_unmigrated_database(database_url: str) -> None:
    runner = web.AppRunner(create_app(settings_for(database_url), relay=None))
    with pytest.raises(StartupError, match="dict-rate-limit migrate"):
        await runner.setup()


async def test_the_landing_page_names_the_metrics_path_it_serves(
    aiohttp_client: MakeClient, database_url: str
) -> None:
    migrate(database_url)
    app = create_app(settings_for(database_url, web_telemetry_path="/probe"), relay=None)
    client = await aiohttp_client(app)
    assert (await client.get("/probe")).status == 200
    landing = await (await client.get("/")).text()
    assert "/probe" in landing
    assert "/metrics" not in landing
