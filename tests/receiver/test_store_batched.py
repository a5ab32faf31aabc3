"""The batched store (one call of sql/0009's function per notification) against real PostgreSQL.

- Hand-computed expectations: an HA pair's copies (replica labels, startsAt 30 s apart) on one row with
  one created and one resolved event, a lost firing, one alert firing and resolved in one notification,
  bucket values from annotations and from the policy's snapshot.
- Equivalence with the previous release's store (tests/support/legacy_store.py, alert by alert from
  Python): seeded random sequences of notifications replayed through both give the same rows, outbox rows
  and results.
- The receiver's pool checks no connection at checkout: connections the server terminated are found out
  by the request that meets them, which is retried on another, without loss.
"""

from __future__ import annotations

import json
import random
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from aiohttp.test_utils import TestClient

from exporter.config import ReceiverSettings
from exporter.history import migrations
from exporter.receiver.payload import parse_payload
from exporter.receiver.store import RecordResult, record_alerts
from exporter.receiver.webhook import STATE, create_app
from tests.support import legacy_store
from tests.support.receiver import AUTH, TOKEN, alert, migrate, payload, rfc3339, rows

Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]
NOW = datetime.now(UTC).replace(microsecond=0)
ALERTS = (
    "SELECT fingerprint, alert_name, severity, endpoint_id, psp_category, status, starts_at, ends_at,"
    " resolved_at IS NOT NULL, resolved_by, available_tokens, capacity, utilization_percent,"
    " recovery_eta_seconds, exhaustion_projection_seconds, summary, description, labels, annotations,"
    " payload, generator_url, alertmanager_url FROM dict_rate_limit_alerts ORDER BY id"
)
OUTBOX = (
    "SELECT o.event_id::text, a.fingerprint, a.starts_at, o.event_type, o.available_tokens, o.capacity,"
    " o.utilization_percent, o.recovery_eta_seconds, o.exhaustion_projection_seconds"
    " FROM dict_rate_limit_alert_outbox o JOIN dict_rate_limit_alerts a ON a.id = o.alert_id ORDER BY o.id"
)
EVENT_ID = "SELECT dict_rate_limit_alert_event_id(%s, %s, %s)::text"
SOURCE = "http://alertmanager:9093"
#: sql/0009: the function and the statement-level outbox trigger of inserts.
RECORD_MIGRATION = 9


def _add_snapshot(
    database_url: str, endpoint_id: str, available: int, capacity: int, participant: str = ""
) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute("SELECT create_dict_rate_limit_state_partition(%s)", [NOW.date()])
        conn.execute(
            "INSERT INTO dict_rate_limit_states (endpoint_id, psp_category, available_tokens, capacity,"
            " refill_tokens, refill_period_sec, utilization_percent, remaining_ratio,"
            " recovery_eta_seconds, exhaustion_projection_seconds, response_time, participant)"
            " VALUES (%s, 'A', %s, %s, 1200, 60, %s, %s, 30.5, NULL, %s, %s)",
            [
                endpoint_id,
                available,
                capacity,
                100 * (capacity - available) / capacity,
                available / capacity,
                NOW - timedelta(minutes=1),
                participant,
            ],
        )


def _summary(result: RecordResult) -> tuple[Any, ...]:
    return (
        [(t.kind, t.endpoint_id, t.severity, t.psp_category) for t in result.transitions],
        result.duplicates,
    )


async def _record(
    database_url: str, notification: dict[str, Any], store: Any = None, *, autocommit: bool = True
) -> RecordResult:
    parsed = parse_payload(json.dumps(notification).encode())
    record = record_alerts if store is None else store.record_alerts
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=autocommit) as conn:
        result: RecordResult = await record(conn, parsed.alerts, timedelta(seconds=300), parsed.external_url)
        return result


def _copy(status: str, replica: str | None, starts: datetime, **changes: Any) -> dict[str, Any]:
    """One alert as a Prometheus replica (``replica`` label) sends it through Alertmanager."""
    item = alert(status, starts_at=rfc3339(starts), **changes)
    if replica is not None:
        item["labels"]["prometheus_replica"] = replica
        item["fingerprint"] = f"replica-{replica}-fp"
    return item


async def test_notifications_give_the_rows_and_events_computed_by_hand(database_url: str) -> None:
    migrate(database_url)
    _add_snapshot(database_url, "CLAIMS_READ", available=700, capacity=1000)
    t0 = NOW - timedelta(hours=2)
    annotated = {"summary": "s", "description": "d", "available_tokens": "100", "capacity": "36000"}
    steps = [
        # The HA pair: replica a fires, replica b's copy 30 s later is the same alert.
        payload(_copy("firing", "a", t0, annotations=annotated)),
        payload(_copy("firing", "b", t0 + timedelta(seconds=30))),
        # Replica b resolves first (its endsAt is kept), a's resolution is a duplicate.
        payload(
            _copy("resolved", "b", t0 + timedelta(seconds=30), ends_at=rfc3339(t0 + timedelta(minutes=9)))
        ),
        payload(_copy("resolved", "a", t0, ends_at=rfc3339(t0 + timedelta(minutes=10)))),
        # A lost firing (resolved only), then in one notification an alert firing and then resolved:
        # values from CLAIMS_READ's snapshot, the data_lost cause from the annotation.
        payload(
            alert(
                "resolved",
                endpoint_id="KEYS_CHECK",
                fingerprint="lost",
                starts_at=rfc3339(t0),
                ends_at=rfc3339(t0 + timedelta(minutes=5)),
            ),
            alert("firing", endpoint_id="CLAIMS_READ", fingerprint="twice", starts_at=rfc3339(t0)),
            alert(
                "resolved",
                endpoint_id="CLAIMS_READ",
                fingerprint="twice",
                starts_at=rfc3339(t0),
                ends_at=rfc3339(t0 + timedelta(minutes=3)),
                annotations={"summary": "s2", "data_state": "missing"},
            ),
        ),
    ]
    results = [_summary(await _record(database_url, step)) for step in steps]

    w = ("warning", "A")
    assert results == [
        ([("created", "ENTRIES_WRITE", *w)], 0),
        ([], 1),
        ([("resolved", "ENTRIES_WRITE", *w)], 0),
        ([], 1),
        (
            [
                ("created", "KEYS_CHECK", *w),
                ("resolved", "KEYS_CHECK", *w),
                ("created", "CLAIMS_READ", *w),
                ("resolved", "CLAIMS_READ", *w),
            ],
            0,
        ),
    ]
    stored = rows(database_url, ALERTS)
    identity = {
        "alertname": "DICTRateLimitWarning",
        "severity": "warning",
        "job": "dict-rate-limit-exporter",
        "endpoint_id": "ENTRIES_WRITE",
        "psp_category": "A",
    }
    b_resolved = steps[2]["alerts"][0]
    assert [r[:11] + r[11:12] for r in stored] == [
        # fingerprint without the replica label: Alertmanager's own of the identity labels
        (
            stored[0][0],
            "DICTRateLimitWarning",
            "warning",
            "ENTRIES_WRITE",
            "A",
            "resolved",
            t0,
            t0 + timedelta(minutes=9),
            True,
            "alertmanager",
            None,
            None,
        ),
        (
            "lost",
            "DICTRateLimitWarning",
            "warning",
            "KEYS_CHECK",
            "A",
            "resolved",
            t0,
            t0 + timedelta(minutes=5),
            True,
            "alertmanager",
            None,
            None,
        ),
        (
            "twice",
            "DICTRateLimitWarning",
            "warning",
            "CLAIMS_READ",
            "A",
            "resolved",
            t0,
            t0 + timedelta(minutes=3),
            True,
            "data_lost",
            700,
            1000,
        ),
    ]
    first = stored[0]
    assert first[0] not in {"replica-a-fp", "replica-b-fp"}
    assert len(first[0]) == 16
    assert first[12:17] == (None, None, None, "s", "d")  # the firing's texts, resolution's values
    assert (first[17], first[18], first[19]) == (identity, steps[0]["alerts"][0]["annotations"], b_resolved)
    assert (first[20], first[21]) == ("http://prometheus:9090/graph?g0.expr=x", SOURCE)
    assert stored[2][12:17] == (
        30.0,
        30.5,
        None,
        "A DICT rate-limit bucket is low.",
        "CLAIMS_READ has 100 of 36000 tokens.",
    )

    events = rows(database_url, OUTBOX)
    assert [e[1:] for e in events] == [
        (first[0], t0, "rate_limit.alert.created", 100, 36000, None, None, None),
        (first[0], t0, "rate_limit.alert.resolved", None, None, None, None, None),
        ("lost", t0, "rate_limit.alert.created", None, None, None, None, None),
        ("lost", t0, "rate_limit.alert.resolved", None, None, None, None, None),
        ("twice", t0, "rate_limit.alert.created", 700, 1000, 30.0, 30.5, None),
        ("twice", t0, "rate_limit.alert.resolved", 700, 1000, 30.0, 30.5, None),
    ]
    for event in events:
        assert rows(database_url, EVENT_ID, [event[1], event[2], event[3]]) == [(event[0],)]


def _random_notification(rng: random.Random, base: datetime) -> dict[str, Any]:
    """1-4 alerts over few identities, replicas, episodes and outcomes, so sequences revisit rows."""
    # Offsets without ties: no copy is equally far from two episodes (the look-up's order is by distance).
    offsets = (0, 31, 170, 420, 3600)
    alerts = []
    for _ in range(rng.randint(1, 4)):
        endpoint = rng.choice(("ENTRIES_WRITE", "CLAIMS_READ"))
        starts = base + timedelta(seconds=rng.choice(offsets))
        status = rng.choice(("firing", "firing", "resolved"))
        annotations = {"summary": rng.choice(("low", "very low")), "description": "d"}
        if rng.random() < 0.4:
            annotations["available_tokens"] = str(rng.randint(0, 500))
        if rng.random() < 0.2:
            annotations["utilization_percent"] = rng.choice(("97.5", "+Inf", "n/a"))
        if rng.random() < 0.2:
            annotations["data_state"] = "missing"
        item = alert(
            status,
            endpoint_id=endpoint,
            starts_at=rfc3339(starts),
            ends_at=rfc3339(starts + timedelta(minutes=rng.choice((1, 10))))
            if status == "resolved"
            else "0001-01-01T00:00:00Z",
            fingerprint=f"{endpoint}-fp",
            annotations=annotations,
        )
        replica = rng.choice((None, "a", "b"))
        if replica is not None:
            item["labels"]["prometheus_replica"] = replica
        alerts.append(item)
    return payload(*alerts)


async def _replay(database_url: str, notifications: list[dict[str, Any]], store: Any) -> tuple[Any, ...]:
    with psycopg.connect(database_url) as conn:
        conn.execute("TRUNCATE dict_rate_limit_alert_outbox, dict_rate_limit_alerts RESTART IDENTITY")
    # The previous store ran in the pool's old mode (a transaction), the batched one autocommitted.
    results = [
        _summary(await _record(database_url, n, store, autocommit=store is None)) for n in notifications
    ]
    return results, rows(database_url, ALERTS), rows(database_url, OUTBOX)


async def test_random_sequences_give_the_rows_events_and_results_of_the_previous_release(
    database_url: str,
) -> None:
    """The previous store on the previous schema (its outbox row trigger), then the batched one on this."""
    sequences = []
    for seed in range(4):
        rng = random.Random(seed)
        sequences.append([_random_notification(rng, NOW - timedelta(hours=3)) for _ in range(40)])
    migrations.apply(database_url, to=RECORD_MIGRATION - 1)
    _add_snapshot(database_url, "CLAIMS_READ", available=700, capacity=1000)
    previous = [await _replay(database_url, notifications, legacy_store) for notifications in sequences]
    assert rows(database_url, "SELECT to_regproc('dict_rate_limit_record_alerts') IS NULL") == [(True,)]
    migrate(database_url)
    for seed, notifications in enumerate(sequences):
        batched = await _replay(database_url, notifications, None)
        assert batched[0] == previous[seed][0], f"seed {seed}: results"
        assert batched[1] == previous[seed][1], f"seed {seed}: alert rows"
        assert batched[2] == previous[seed][2], f"seed {seed}: outbox rows"
        # Sequences that exercise the lifecycle: rows resolved, duplicates, created-and-resolved at once.
        assert any(r[5] == "resolved" for r in batched[1])
        assert sum(d for _, d in batched[0]) > 0
        assert any(len(t) > 1 and t[0][0] == "created" and t[1][0] == "resolved" for t, _ in batched[0])


async def test_the_batched_store_also_runs_in_a_callers_transaction(database_url: str) -> None:
    migrate(database_url)
    result = await _record(database_url, payload(alert()), None, autocommit=False)
    assert result.created == 1
    assert rows(database_url, "SELECT count(*) FROM dict_rate_limit_alert_outbox") == [(1,)]


def _settings(database_url: str, connections: int) -> ReceiverSettings:
    return ReceiverSettings(
        database_url=database_url, webhook_bearer_token=TOKEN, database_max_connections=connections
    )


async def _terminate_pooled(client: Client, connections: int) -> int:
    """Opens ``connections`` pooled connections, returns them idle, and has the server terminate them."""
    pool = client.server.app[STATE].pool
    assert pool is not None
    pids = []
    held = [pool.connection() for _ in range(connections)]
    for context in held:
        conn = await context.__aenter__()
        pids.append(conn.info.backend_pid)
    for context in held:
        await context.__aexit__(None, None, None)
    with psycopg.connect(pool.conninfo, autocommit=True) as admin:
        killed = admin.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM unnest(%s::int[]) pid", [pids]
        ).fetchone()
    assert killed is not None
    return int(killed[0])


async def test_a_connection_the_server_closed_is_retried_on_another_without_loss(
    aiohttp_client: MakeClient, database_url: str
) -> None:
    migrate(database_url)
    client = await aiohttp_client(create_app(_settings(database_url, 1), relay=None))
    first = await client.post("/alerts", json=payload(alert(fingerprint="before")), headers=AUTH)
    assert first.status == 200
    assert await _terminate_pooled(client, 1) == 1
    # The only pooled connection is dead and nothing checked it: this request meets it, and is retried.
    response = await client.post("/alerts", json=payload(alert(fingerprint="after")), headers=AUTH)
    assert (response.status, (await response.json())["created"]) == (200, 1)
    assert rows(database_url, "SELECT fingerprint FROM dict_rate_limit_alerts ORDER BY id") == [
        ("before",),
        ("after",),
    ]
    assert rows(database_url, "SELECT count(*) FROM dict_rate_limit_alert_outbox") == [(2,)]


async def test_after_every_pooled_connection_was_terminated_the_next_request_still_succeeds(
    aiohttp_client: MakeClient, database_url: str
) -> None:
    """A database restart or failover: every idle connection is stale at once."""
    migrate(database_url)
    client = await aiohttp_client(create_app(_settings(database_url, 3), relay=None))
    assert await _terminate_pooled(client, 3) == 3
    response = await client.post("/alerts", json=payload(alert()), headers=AUTH)
    assert (response.status, (await response.json())["created"]) == (200, 1)
    assert rows(database_url, "SELECT count(*) FROM dict_rate_limit_alert_outbox") == [(1,)]


async def test_an_alert_takes_the_values_of_its_own_participants_bucket(database_url: str) -> None:
    # Two participants of one exporter (sql/0008), the same policy at the same moment: each alert's row
    # and event carry its participant's balance, the unlabelled alert the single participant's.
    migrate(database_url)
    _add_snapshot(database_url, "ENTRIES_WRITE", available=100, capacity=36000, participant="bank-a")
    _add_snapshot(database_url, "ENTRIES_WRITE", available=9000, capacity=36000, participant="bank-b")
    _add_snapshot(database_url, "ENTRIES_WRITE", available=5000, capacity=36000)
    plain = {"summary": "s", "description": "d"}
    items = []
    for participant in ("bank-a", "bank-b", None):
        item = alert("firing", fingerprint=f"fp-{participant}", annotations=plain)
        if participant is not None:
            item["labels"]["participant"] = participant
        items.append(item)
    # Firing alone (the one-statement path), then resolved one by one (the per-alert path).
    await _record(database_url, payload(*items))
    for item in items:
        resolved = {**item, "status": "resolved", "endsAt": rfc3339(NOW)}
        await _record(database_url, payload(resolved))
    balances = rows(
        database_url,
        "SELECT coalesce(a.labels ->> 'participant', ''), o.event_type, o.available_tokens"
        " FROM dict_rate_limit_alert_outbox o JOIN dict_rate_limit_alerts a ON a.id = o.alert_id"
        " ORDER BY 1, 2",
    )
    assert balances == [
        ("", "rate_limit.alert.created", 5000),
        ("", "rate_limit.alert.resolved", 5000),
        ("bank-a", "rate_limit.alert.created", 100),
        ("bank-a", "rate_limit.alert.resolved", 100),
        ("bank-b", "rate_limit.alert.created", 9000),
        ("bank-b", "rate_limit.alert.resolved", 9000),
    ]
