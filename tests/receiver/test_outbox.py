"""The outbox relay against a real PostgreSQL and a real Pulsar broker (pulsar-lite): order per policy, key
and properties, marked sent only after the ack, a broker outage survived, one publishing replica at a time."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import jsonschema
import psycopg
import pytest

from devstack.embedded import EmbeddedPulsar, free_port
from exporter.receiver.metrics import ReceiverMetrics
from exporter.receiver.outbox import OutboxRelay, RelayTuning
from exporter.receiver.payload import parse_payload
from exporter.receiver.publisher import PulsarPublisher
from exporter.receiver.store import record_alerts
from tests.plugins.fix_db import ONE_SERVER
from tests.receiver.test_receiver_process import post, receiver_env, receiver_process
from tests.support.env import ROOT
from tests.support.receiver import TOKEN, EventConsumer, alert, migrate, payload, rows, unique_topic

SCHEMA = json.loads((ROOT / "schemas" / "rate-limit-alert-event.schema.json").read_text())
#: The issue asks for a minute; 20 s exercises the same path (several failed send/reconnect cycles) within
#: the suite's budget. RECEIVER_OUTAGE_SECONDS=60 runs the long version.
OUTAGE_SECONDS = float(os.environ.get("RECEIVER_OUTAGE_SECONDS", "20"))
FAST = RelayTuning(
    batch_size=200, poll_interval=0.2, backoff_initial=0.2, backoff_max=1.0, send_timeout_ms=2000
)
POLICIES = ("ENTRIES_WRITE", "CLAIMS_READ", "KEYS_CHECK", "REFUNDS_WRITE")
SENT = "SELECT count(*) FROM dict_rate_limit_alert_outbox WHERE sent_at IS NOT NULL"
UNSENT_COUNT = "SELECT count(*) FROM dict_rate_limit_alert_outbox WHERE sent_at IS NULL"
UNSENT_IDS = "SELECT event_id::text FROM dict_rate_limit_alert_outbox WHERE sent_at IS NULL"


async def record(database_url: str, *alerts: dict[str, Any]) -> None:
    parsed = parse_payload(json.dumps(payload(*alerts)).encode())
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        await record_alerts(conn, parsed.alerts)


async def record_cycle(database_url: str, policy: str, starts: str, fingerprint: str) -> None:
    """An alert recorded firing, then resolved (two notifications, two events)."""
    await record(database_url, alert(endpoint_id=policy, starts_at=starts, fingerprint=fingerprint))
    resolved = alert(
        "resolved",
        endpoint_id=policy,
        starts_at=starts,
        ends_at="2026-11-23T11:00:00Z",
        fingerprint=fingerprint,
    )
    await record(database_url, resolved)


def expected_order(database_url: str) -> dict[str, list[str]]:
    """Event ids per policy in outbox order: the order consumers must see them in."""
    order: dict[str, list[str]] = {}
    query = (
        "SELECT coalesce(a.endpoint_id, a.alert_name), o.event_id::text FROM dict_rate_limit_alert_outbox o"
        " JOIN dict_rate_limit_alerts a ON a.id = o.alert_id ORDER BY o.id"
    )
    for key, event_id in rows(database_url, query):
        order.setdefault(key, []).append(event_id)
    return order


def received_order(consumer: EventConsumer) -> dict[str, list[str]]:
    order: dict[str, list[str]] = {}
    for item in consumer.events:
        order.setdefault(item.key, []).append(item.event["event_id"])
    return order


@asynccontextmanager
async def running_relay(
    database_url: str, broker_url: str, topic: str, metrics: ReceiverMetrics
) -> AsyncIterator[OutboxRelay]:
    publisher = PulsarPublisher(
        broker_url, topic, metrics, send_timeout_ms=FAST.send_timeout_ms, operation_timeout_s=2
    )
    relay = OutboxRelay(database_url, publisher, metrics, FAST)
    task = asyncio.create_task(relay.run())
    try:
        yield relay
    finally:
        await relay.stop()
        await asyncio.wait_for(task, 30)
        await publisher.close()


@pytest.fixture
def topic() -> str:
    return unique_topic()


@pytest.fixture
def consumer(pulsar_broker: EmbeddedPulsar, topic: str) -> Iterator[EventConsumer]:
    events = EventConsumer(pulsar_broker.url, topic)
    yield events
    events.close()


async def wait_until(predicate: Any, seconds: float) -> bool:
    deadline = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.1)
    return bool(predicate())


async def test_relay_publishes_in_order_per_policy_with_key_properties_and_marks_sent(
    database_url: str, pulsar_broker: EmbeddedPulsar, topic: str, consumer: EventConsumer
) -> None:
    migrate(database_url)
    for index, policy in enumerate(POLICIES * 3):
        starts = f"2026-11-23T09:{index:02d}:00Z"
        await record_cycle(database_url, policy, starts, f"{policy}-{index}")
    metrics = ReceiverMetrics()
    async with running_relay(database_url, pulsar_broker.url, topic, metrics) as relay:
        received = await asyncio.to_thread(consumer.receive, 24, 30)
        assert await wait_until(lambda: metrics.backlog.count == 0, 10)
        assert relay.is_leader
    assert len(received) == 24
    assert received_order(consumer) == expected_order(database_url)
    for item in received:
        jsonschema.Draft202012Validator(SCHEMA).validate(item.event)
        assert item.key == item.event["endpoint_id"]
        assert item.properties["event_type"] == item.event["event_type"]
        assert item.properties["severity"] == "warning"
        assert item.properties["psp_category"] == "A"
        assert item.properties["schema_version"] == "1.2"
    assert rows(database_url, "SELECT count(*) FROM dict_rate_limit_alert_outbox WHERE sent_at IS NULL") == [
        (0,)
    ]
    assert metrics.registry.get_sample_value("dict_rate_limit_pulsar_publishes_total") == 24
    assert metrics.registry.get_sample_value("dict_rate_limit_pulsar_publish_duration_seconds_count") == 24


@ONE_SERVER
async def test_events_committed_while_the_broker_is_down_are_all_delivered_in_order_after_it_returns(
    database_url: str, pulsar_broker: EmbeddedPulsar, topic: str, consumer: EventConsumer
) -> None:
    migrate(database_url)
    metrics = ReceiverMetrics()
    async with running_relay(database_url, pulsar_broker.url, topic, metrics):
        await record(database_url, alert(endpoint_id="ENTRIES_WRITE", fingerprint="before"))
        assert len(await asyncio.to_thread(consumer.receive, 1, 20)) == 1

        pulsar_broker.stop()
        try:
            loop = asyncio.get_running_loop()
            deadline, index = loop.time() + OUTAGE_SECONDS, 0
            while loop.time() < deadline:  # alerts keep arriving during the outage
                policy = POLICIES[index % len(POLICIES)]
                starts = f"2026-11-23T09:{index % 60:02d}:{index // 60:02d}Z"
                await record_cycle(database_url, policy, starts, f"out-{index}")
                index += 1
                await asyncio.sleep(0.5)
            unsent = rows(
                database_url, "SELECT count(*) FROM dict_rate_limit_alert_outbox WHERE sent_at IS NULL"
            )
            assert unsent == [(2 * index,)], "nothing may be marked sent while the broker is down"
            assert (
                metrics.registry.get_sample_value("dict_rate_limit_pulsar_publish_failures_total") or 0
            ) > 0
            assert metrics.backlog.count > 0
        finally:
            pulsar_broker.start()
        # A fresh connection instead of the client's long reconnection backoff; the same subscription, so an
        # event whose ack was lost with the broker comes again, and is deduplicated by event_id.
        consumer.close()
        after = EventConsumer(pulsar_broker.url, topic, seen=consumer.seen)
        try:
            got = await asyncio.to_thread(after.receive, 2 * index, 60)
            assert len(got) == 2 * index
            assert await wait_until(lambda: metrics.backlog.count == 0, 10)
        finally:
            after.close()
    expected = expected_order(database_url)
    expected["ENTRIES_WRITE"] = expected["ENTRIES_WRITE"][
        1:
    ]  # the event before the outage went to `consumer`
    assert received_order(after) == expected
    assert rows(database_url, "SELECT count(*) FROM dict_rate_limit_alert_outbox WHERE sent_at IS NULL") == [
        (0,)
    ]


def _pulsar_check(ops_port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{ops_port}/health/ready", timeout=2) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        body = json.loads(exc.read())
    except OSError:
        return None
    check: str | None = body.get("checks", {}).get("pulsar")
    return check


def _leader_and_standby(ops_ports: list[int]) -> list[str | None] | None:
    # The leader's publisher connects at its first publish: "down" until then, but never "standby".
    checks = [_pulsar_check(port) for port in ops_ports]
    leading = [check not in (None, "standby") for check in checks]
    return checks if sorted(leading) == [False, True] else None


def _wait(predicate: Any, seconds: float, what: str) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {seconds} s")


def test_two_receivers_the_leader_killed_mid_stream_the_standby_publishes_the_rest_in_order(
    tmp_path: Path, database_url: str, pulsar_broker: EmbeddedPulsar, topic: str, consumer: EventConsumer
) -> None:
    """Two `dict-rate-limit receiver` processes; the one whose relay publishes is found from its readiness
    (pulsar "ok" vs "standby") and SIGKILLed while alerts stream in. The standby takes the relay lock and
    publishes the rest: every event arrives, in outbox order per policy, and the only events published twice
    are ones the dead leader had not yet marked sent (acknowledged by the broker, mark lost with it)."""
    migrate(database_url)
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    ports = [free_port(), free_port()]
    envs = [receiver_env(database_url, token, pulsar_broker.url, topic, port) for port in ports]
    total, kill_after = 120, 40
    with contextlib.ExitStack() as stack:
        processes = [
            stack.enter_context(receiver_process(env, tmp_path / f"receiver-{index}.log"))
            for index, env in enumerate(envs)
        ]
        ops = [int(env["METRICS_PORT"]) for env in envs]
        checks = _wait(lambda: _leader_and_standby(ops), 30, "one leader and one standby")
        leader = 0 if checks[1] == "standby" else 1
        standby = 1 - leader
        unsent_at_kill: set[str] = set()
        for index in range(total):
            if index == kill_after:
                _wait(lambda: rows(database_url, SENT)[0][0] > 0, 20, "the leader publishing")
                assert _pulsar_check(ops[standby]) == "standby", "the survivor must be the standby"
                processes[leader].send_signal(signal.SIGKILL)
                processes[leader].wait(timeout=10)
                unsent_at_kill = {row[0] for row in rows(database_url, UNSENT_IDS)}
            # Alertmanager sends to every receiver; after the kill only the standby answers.
            target = ports[standby] if index >= kill_after or index % 2 else ports[leader]
            body = payload(alert(endpoint_id=POLICIES[index % 4], fingerprint=f"stream-{index}"))
            assert post(target, body) == 200
        assert _wait(lambda: _pulsar_check(ops[standby]) == "ok", 20, "the standby leading")
        received = consumer.receive(total, 60)
        _wait(lambda: rows(database_url, UNSENT_COUNT) == [(0,)], 20, "the outbox drained")
    assert len(received) == total, "nothing lost"
    assert received_order(consumer) == expected_order(database_url), "in outbox order per policy"
    published_twice = {event_id for event_id, ids in consumer.message_ids.items() if len(ids) > 1}
    assert published_twice <= unsent_at_kill, "an event the dead leader had marked sent was published again"


async def test_an_alert_of_a_named_participant_publishes_its_participant(
    database_url: str, pulsar_broker: EmbeddedPulsar, topic: str, consumer: EventConsumer
) -> None:
    migrate(database_url)
    named = alert(endpoint_id="ENTRIES_WRITE", fingerprint="fp-bank-b")
    named["labels"]["participant"] = "bank-b"
    await record(database_url, named, alert(endpoint_id="ENTRIES_READ", fingerprint="fp-single"))
    metrics = ReceiverMetrics()
    async with running_relay(database_url, pulsar_broker.url, topic, metrics):
        received = await asyncio.to_thread(consumer.receive, 2, 30)
    by_policy = {item.event["endpoint_id"]: item for item in received}
    assert by_policy["ENTRIES_WRITE"].event["participant"] == "bank-b"
    assert by_policy["ENTRIES_WRITE"].properties["participant"] == "bank-b"
    assert by_policy["ENTRIES_READ"].event["participant"] is None
    assert "participant" not in by_policy["ENTRIES_READ"].properties
    for item in received:
        jsonschema.Draft202012Validator(SCHEMA).validate(item.event)
