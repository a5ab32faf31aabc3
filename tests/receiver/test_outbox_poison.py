"""Poison events against a real PostgreSQL and a real Pulsar broker (pulsar-lite): an event the broker
refuses for good is set aside (kept, counted, visible to the alert rule) and the relay goes on with the
rest in order; `dict-rate-limit outbox replay` returns it; no accepted body makes such an event."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator

import psycopg
import pytest

from devstack.embedded import EmbeddedPulsar
from exporter.receiver.metrics import ReceiverMetrics
from exporter.receiver.outbox import MAX_DESCRIPTION_CHARS
from tests.receiver.test_outbox import expected_order, received_order, record, running_relay, wait_until
from tests.support.receiver import EventConsumer, alert, migrate, rows, unique_topic

#: Above Pulsar's default 5 MB message limit.
HUGE = 6 * 1024 * 1024


@pytest.fixture
def topic() -> str:
    return unique_topic()


@pytest.fixture
def consumer(pulsar_broker: EmbeddedPulsar, topic: str) -> Iterator[EventConsumer]:
    events = EventConsumer(pulsar_broker.url, topic)
    yield events
    events.close()


def poison_row(database_url: str) -> int:
    """An alert stored with a 6 MB name, as a receiver without today's bounds could have stored it."""
    with psycopg.connect(database_url) as conn:
        cursor = conn.execute(
            "INSERT INTO dict_rate_limit_alerts (fingerprint, alert_name, severity, endpoint_id, status,"
            " starts_at, labels, annotations, payload) VALUES ('poison', %s, 'warning', 'ENTRIES_WRITE',"
            " 'firing', '2026-11-23T09:00:30Z', '{}', '{}', '{}') RETURNING id",
            ["X" * HUGE],
        )
        row = cursor.fetchone()
        assert row is not None
        return int(row[0])


def sample(metrics: ReceiverMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_an_event_the_broker_refuses_is_set_aside_and_the_rest_goes_on_in_order(
    database_url: str,
    pulsar_broker: EmbeddedPulsar,
    consumer: EventConsumer,
    topic: str,
) -> None:
    migrate(database_url)
    await record(database_url, alert(starts_at="2026-11-23T09:00:00Z", fingerprint="before"))
    poison_row(database_url)
    for index in range(3):
        await record(
            database_url, alert(starts_at=f"2026-11-23T09:0{index + 1}:00Z", fingerprint=f"after-{index}")
        )
    metrics = ReceiverMetrics()
    async with running_relay(database_url, pulsar_broker.url, topic, metrics):
        received = await asyncio.to_thread(consumer.receive, 4, 30)
        assert await wait_until(lambda: metrics.backlog.set_aside == 1, 10)
        assert await wait_until(lambda: metrics.backlog.count == 0, 10)
    assert [item.event["fingerprint"] for item in received] == ["before", "after-0", "after-1", "after-2"]
    assert sample(metrics, "dict_rate_limit_outbox_set_aside_events_total", reason="MessageTooBig") == 1
    assert sample(metrics, "dict_rate_limit_outbox_set_aside") == 1
    assert rows(
        database_url,
        "SELECT set_aside_reason, sent_at IS NULL FROM dict_rate_limit_alert_outbox"
        " WHERE set_aside_at IS NOT NULL",
    ) == [("MessageTooBig", True)]

    # The operator sees it and replays it (here after shrinking the stored name, as the runbook says when
    # the broker's limit cannot be raised): the relay publishes it with its original event id.
    listed = _cli("outbox", "list", database_url=database_url)
    assert listed.returncode == 0, listed.stderr
    assert "MessageTooBig" in listed.stdout
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "UPDATE dict_rate_limit_alerts SET alert_name = 'DICTRateLimitWarning'"
            " WHERE fingerprint = 'poison'"
        )
    replayed = _cli("outbox", "replay", database_url=database_url)
    assert replayed.returncode == 0, replayed.stderr
    assert "returned to the relay: 1 event(s)" in replayed.stdout
    async with running_relay(database_url, pulsar_broker.url, topic, metrics):
        received = await asyncio.to_thread(consumer.receive, 5, 30)
        assert await wait_until(lambda: metrics.backlog.set_aside == 0 and metrics.backlog.count == 0, 10)
    assert received[-1].event["fingerprint"] == "poison"
    assert rows(database_url, "SELECT count(*) FROM dict_rate_limit_alert_outbox WHERE sent_at IS NULL") == [
        (0,)
    ]
    assert received_order(consumer).keys() == expected_order(database_url).keys()


async def test_a_6_mb_description_accepted_by_the_webhook_is_published_bounded(
    database_url: str,
    pulsar_broker: EmbeddedPulsar,
    consumer: EventConsumer,
    topic: str,
) -> None:
    migrate(database_url)
    description = "tokens low " * (HUGE // 11)
    await record(database_url, alert(annotations={"summary": "s", "description": description}))
    metrics = ReceiverMetrics()
    async with running_relay(database_url, pulsar_broker.url, topic, metrics):
        [item] = await asyncio.to_thread(consumer.receive, 1, 30)
    assert len(item.event["rule_description"]) <= MAX_DESCRIPTION_CHARS
    assert item.event["rule_description"].startswith("tokens low tokens low")
    assert item.event["message"] == "s ENTRIES_WRITE: bucket values unknown."
    assert sample(metrics, "dict_rate_limit_outbox_set_aside_events_total", reason="MessageTooBig") == 0
    # The full text stays in the audit table.
    assert rows(database_url, "SELECT length(description) FROM dict_rate_limit_alerts") == [
        (len(description),)
    ]


def _cli(*args: str, database_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporter.cli", *args],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "DATABASE_URL": database_url},
        timeout=60,
        check=False,
    )


def test_outbox_replay_of_nothing_says_so(database_url: str) -> None:
    migrate(database_url)
    done = _cli("outbox", "replay", database_url=database_url)
    assert done.returncode == 0, done.stderr
    assert json.dumps([]) in done.stdout


def test_outbox_replay_of_an_id_that_is_not_set_aside_says_so_and_exits_1(database_url: str) -> None:
    migrate(database_url)
    done = _cli("outbox", "replay", "--id", "424242", database_url=database_url)
    assert done.returncode == 1
    said = done.stderr.strip().splitlines()
    assert said == ["dict-rate-limit outbox: not set aside, nothing done: [424242]"]


@pytest.mark.parametrize("action", ["list", "replay"])
def test_outbox_on_an_unmigrated_database_says_to_migrate_in_one_line(database_url: str, action: str) -> None:
    done = _cli("outbox", action, database_url=database_url)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "dict-rate-limit outbox: the database has no alert outbox yet: run `dict-rate-limit migrate` first"
    ]
