"""Two real Alertmanagers in cluster mode (gossip on loopback) in front of two receivers on one PostgreSQL:
alerts posted to both (as a Prometheus HA pair does) end as one audit row and one Pulsar event per change,
whichever Alertmanager notified and however many times (the cluster deduplicates most notifications, the
receiver's idempotency key absorbs the rest)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from devstack.embedded import EmbeddedPulsar, free_port
from exporter.receiver.metrics import ReceiverMetrics
from tests.plugins.fix_db import ONE_SERVER
from tests.receiver.test_receiver_alertmanager import (
    LABELS,
    alertmanager_config,
    eventually_true,
    receiver_settings,
    running_receiver,
    sample,
    statuses,
)
from tests.support.env import require_binary
from tests.support.receiver import Alertmanager, EventConsumer, am_alert, migrate, rows, unique_topic

#: Gossip fast enough for a test; peer_timeout is how long the second Alertmanager waits for the first's
#: notification log entry before it notifies itself.
CLUSTER_TIMING = (
    "--cluster.gossip-interval=100ms",
    "--cluster.pushpull-interval=1s",
    "--cluster.peer-timeout=1s",
)
#: group_interval well above peer_timeout, as in production (5 m vs 15 s): with the one-second fast config
#: the second peer's pipeline is always inside its wait, and a resolution landing there makes it send the
#: firing state it captured before (a stale notification; the receiver absorbs it, but it hides the dedupe).
GROUP_INTERVAL = "4s"


#: group_interval + peer_timeout + a margin for a loaded machine.
CLUSTER_SETTLE = 7.0


def slow_groups(config: Path) -> Path:
    rendered = yaml.safe_load(config.read_text())

    def visit(route: dict[str, Any]) -> None:
        if "group_interval" in route:
            route["group_interval"] = GROUP_INTERVAL
        for child in route.get("routes", []):
            visit(child)

    visit(rendered["route"])
    config.write_text(yaml.safe_dump(rendered, sort_keys=False))
    return config


def cluster_flags(own: int, peer: int) -> list[str]:
    return [
        f"--cluster.listen-address=127.0.0.1:{own}",
        f"--cluster.advertise-address=127.0.0.1:{own}",
        f"--cluster.peer=127.0.0.1:{peer}",
        "--cluster.settle-timeout=5s",
        *CLUSTER_TIMING,
    ]


def peers(manager: Alertmanager) -> int:
    with urllib.request.urlopen(f"{manager.url}/api/v2/status", timeout=5) as response:  # noqa: S310
        status: dict[str, Any] = json.loads(response.read())
    return len(status.get("cluster", {}).get("peers") or [])


def deliveries(metrics: list[ReceiverMetrics]) -> float:
    return sum(sample(m, status="200") for m in metrics)


@ONE_SERVER
async def test_two_clustered_alertmanagers_record_each_change_once_and_publish_it_once(
    tmp_path: Path, database_url: str, pulsar_broker: EmbeddedPulsar
) -> None:
    binary = require_binary("prometheus-alertmanager")
    migrate(database_url)
    topic = unique_topic()
    metrics = [ReceiverMetrics(), ReceiverMetrics()]
    gossip = [free_port(), free_port()]
    consumer = EventConsumer(pulsar_broker.url, topic)
    starts = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=20)
    try:
        async with contextlib.AsyncExitStack() as stack:
            managers = []
            for index in (0, 1):
                directory = tmp_path / f"node-{index}"
                directory.mkdir()
                settings = receiver_settings(database_url, pulsar_broker, topic, directory / "token")
                await stack.enter_async_context(running_receiver(settings, metrics[index]))
                config = slow_groups(alertmanager_config(settings, directory))  # notifies its own receiver
                flags = cluster_flags(gossip[index], gossip[1 - index])
                manager = await asyncio.to_thread(Alertmanager, binary, config, directory, flags)
                stack.callback(manager.stop)
                managers.append(manager)
            formed = await eventually_true(lambda: all(peers(m) == 2 for m in managers), 30)
            assert formed, "the two Alertmanagers did not form a cluster"

            for manager in managers:  # a Prometheus HA pair: both replicas send the same alert to both
                manager.post(am_alert(LABELS, starts_at=starts))
            assert await statuses(database_url, "firing", 20) == [("firing",)]
            # Past peer_timeout + group_interval: the second peer's pipeline has checked the notification
            # log by now. (Resolving sooner makes it send the firing state it captured before the
            # resolution, after it: a stale notification the receiver must absorb, as it does.)
            await asyncio.sleep(CLUSTER_SETTLE)
            firing_deliveries = deliveries(metrics)
            for manager in managers:
                manager.post(am_alert(LABELS, starts_at=starts, resolved=True))
            assert await statuses(database_url, "resolved", 20) == [("resolved",)]
            await asyncio.sleep(CLUSTER_SETTLE)
            events = await asyncio.to_thread(consumer.receive, 3, 10)  # a third would be a duplicate change
            published = sum(
                m.registry.get_sample_value("dict_rate_limit_pulsar_publishes_total") or 0 for m in metrics
            )
            total_deliveries = deliveries(metrics)
    finally:
        consumer.close()
    assert firing_deliveries >= 1
    # The cluster deduplicates (2 measured here); a slow gossip may let one duplicate per change through.
    assert 2 <= total_deliveries <= 4
    assert rows(database_url, "SELECT count(*) FROM dict_rate_limit_alerts") == [(1,)]
    assert rows(database_url, "SELECT event_type FROM dict_rate_limit_alert_outbox ORDER BY id") == [
        ("rate_limit.alert.created",),
        ("rate_limit.alert.resolved",),
    ]
    assert [e.event["event_type"] for e in events] == [
        "rate_limit.alert.created",
        "rate_limit.alert.resolved",
    ]
    assert published == 2, "one publication per change across both receivers' relays"
    assert all(len(ids) == 1 for ids in consumer.message_ids.values())
