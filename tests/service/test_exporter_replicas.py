"""Three `dict-rate-limit exporter` processes on one PostgreSQL share one poller: a Bridge written here counts
every list call while the leader is killed (SIGKILL), frozen (SIGSTOP, then thawed) or cut from the database.

Asserted over the whole run: one call per interval in total (never two replicas in one interval), the next
call within the documented failover bound (``LeaseTiming.failover_bound``, plus a margin for this loaded
machine), every replica serving the same bucket series (values, ResponseTime, counters), and the history
holding every snapshot the Bridge returned exactly once (one row per policy), except at most the one a
SIGKILLed leader had not shared yet.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import psycopg
import pytest

from exporter.history import migrations
from exporter.service.leader import LeaseTiming
from tests.plugins.fix_db import ONE_SERVER
from tests.support.replicas import (
    POLICIES,
    Call,
    CountingBridge,
    Replica,
    same_buckets_everywhere,
    the_leader,
    wait_for,
)
from tests.support.tcp_proxy import TcpProxy

INTERVAL, LEAD, LEASE = 1.5, 0.2, 2.0
TIMING = LeaseTiming(INTERVAL, LEASE, LEAD)
#: Scheduling delays of three Python processes on a shared 2-core machine, on top of the design bound.
SLACK = 1.5


@pytest.fixture
def bridge() -> Iterator[CountingBridge]:
    server = CountingBridge().start()
    yield server
    server.stop()


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[list[Replica]]:
    started: list[Replica] = []
    yield started
    for replica in started:
        replica.stop()


def launch(started: list[Replica], name: str, directory: Path, bridge: CountingBridge, url: str) -> Replica:
    env = {
        "BRIDGE_ADDRESS": bridge.address,
        "BRIDGE_TIMEOUT_SECONDS": "0.5",
        "POLL_INTERVAL_SECONDS": str(INTERVAL),
        "POLL_LEAD_SECONDS": str(LEAD),
        "POLL_BUDGET_OVERRIDE": "true",
        "POLLER_LEASE_SECONDS": str(LEASE),
        "STALE_AFTER_INTERVALS": "4",
        "DATABASE_URL": url,
    }
    replica = Replica(name, directory, env).start()
    started.append(replica)
    return replica


def assert_one_call_per_interval(calls: list[Call]) -> None:
    slots = [round((call.at + LEAD) / INTERVAL) for call in calls]
    doubled = sorted({slot for slot in slots if slots.count(slot) > 1})
    assert not doubled, f"two list calls in the interval(s) {doubled}"
    gaps = [b.at - a.at for a, b in itertools.pairwise(calls)]
    assert min(gaps) > 0.4 * INTERVAL, f"calls {min(gaps):.3f} s apart"
    # Over any window of ten intervals, at most the eleven boundaries it can contain (budget).
    for call in calls:
        assert sum(1 for other in calls if call.at <= other.at < call.at + 10 * INTERVAL) <= 11


def failover_gap(calls: list[Call], failed_at: float) -> float:
    before = max(call.at for call in calls if call.at <= failed_at)
    after = min(call.at for call in calls if call.at > failed_at)
    return after - before


def call_after(bridge: CountingBridge, moment: float) -> bool:
    return any(call.at > moment for call in bridge.snapshot_calls())


def assert_history_exactly_once(database_url: str, calls: list[Call], may_lose: set[datetime]) -> None:
    """One row per policy for every snapshot the Bridge returned, except those in ``may_lose``."""
    with psycopg.connect(database_url) as conn:
        stored = conn.execute(
            "SELECT response_time, count(*), count(DISTINCT endpoint_id)"
            " FROM dict_rate_limit_states GROUP BY 1"
        ).fetchall()
    returned = {call.response_time for call in calls}
    assert all(count == distinct == len(POLICIES) for _, count, distinct in stored), stored
    assert {row[0] for row in stored} <= returned, "history holds a snapshot the Bridge never returned"
    missing = returned - {row[0] for row in stored}
    assert missing <= may_lose, f"snapshots lost: {sorted(missing - may_lose)}"


def last_call_before(calls: list[Call], moment: float) -> datetime:
    """The call a leader killed at ``moment`` may have made without sharing its answer."""
    return max((call for call in calls if call.at <= moment), key=lambda call: call.at).response_time


def consumed_total(replica: Replica) -> float:
    body = replica.policies()
    return sum(policy["consumed_tokens_total"] for policy in body["policies"]) if body else -1.0


@ONE_SERVER
def test_three_replicas_poll_once_per_interval_through_a_sigkill_and_a_sigstop_of_the_leader(
    database_url: str, tmp_path: Path, bridge: CountingBridge, replicas: list[Replica]
) -> None:
    migrations.apply(database_url)
    for index in range(3):
        launch(replicas, f"replica-{index}", tmp_path, bridge, database_url)
    first = wait_for(lambda: the_leader(replicas), 30, "a first leader")
    wait_for(lambda: len(bridge.snapshot_calls()) >= 3, 15, "three polls")
    wait_for(lambda: same_buckets_everywhere(replicas), 10, "the same bucket series on the three replicas")
    assert wait_for(lambda: consumed_total(first) > 0, 10, "consumption counted")

    killed_at = time.time()
    first.kill()
    others = [r for r in replicas if r is not first]
    second = wait_for(lambda: the_leader(others), TIMING.failover_bound + SLACK + 3, "a leader after SIGKILL")
    wait_for(lambda: call_after(bridge, killed_at), TIMING.failover_bound + SLACK, "a poll after SIGKILL")
    time.sleep(4 * INTERVAL)
    counted = consumed_total(second)
    assert counted > 0

    frozen_at = time.time()
    second.freeze()
    third = wait_for(lambda: the_leader(others), TIMING.failover_bound + SLACK + 3, "a leader after SIGSTOP")
    assert third is not second
    wait_for(lambda: call_after(bridge, frozen_at), TIMING.failover_bound + SLACK, "a poll after SIGSTOP")
    time.sleep(LEASE + 2 * INTERVAL)
    second.thaw()  # wakes up believing it leads: the lease's term must stop it from polling
    time.sleep(4 * INTERVAL)

    assert the_leader(others) is third
    assert second.leader() == 0.0
    same = wait_for(lambda: same_buckets_everywhere(others), 10, "the same bucket series after the thaw")
    assert consumed_total(third) >= counted, "the counters carry on across leaders"
    assert same
    for replica in others:
        replica.stop()  # SIGTERM: history flushed
    calls = bridge.snapshot_calls()
    assert_one_call_per_interval(calls)
    gaps = [failover_gap(calls, killed_at), failover_gap(calls, frozen_at)]
    assert max(gaps) <= TIMING.failover_bound + SLACK, (gaps, TIMING.failover_bound)
    # Steady state: the calls of the steady periods are one interval apart.
    assert statistics.median(b.at - a.at for a, b in itertools.pairwise(calls)) == pytest.approx(
        INTERVAL, abs=0.2
    )
    # Only SIGKILL can lose the snapshot of the call it interrupted; a thawed leader stores what it held.
    assert_history_exactly_once(database_url, calls, may_lose={last_call_before(calls, killed_at)})


def test_a_leader_cut_from_the_database_stops_polling_and_another_replica_takes_over(
    database_url: str, tmp_path: Path, bridge: CountingBridge, replicas: list[Replica]
) -> None:
    migrations.apply(database_url)
    with TcpProxy.for_postgres(database_url) as proxy:
        cut = launch(replicas, "cut", tmp_path, bridge, proxy.url_for(database_url))
        wait_for(lambda: cut.leader() == 1.0, 30, "the proxied replica leads")
        others = [launch(replicas, f"direct-{i}", tmp_path, bridge, database_url) for i in range(2)]
        wait_for(lambda: same_buckets_everywhere([cut, *others]), 30, "the same bucket series everywhere")
        replicas_seen = ("dict_rate_limit_poller_replicas", frozenset())
        wait_for(lambda: cut.samples().get(replicas_seen) == 3.0, 10, "the leader has seen the other two")
        assert the_leader([cut, *others]) is cut

        cut_at = time.time()
        proxy.stop()
        wait_for(lambda: the_leader(others), TIMING.failover_bound + SLACK + 3, "a leader after the cut")
        wait_for(lambda: call_after(bridge, cut_at), TIMING.failover_bound + SLACK, "a poll after the cut")
        wait_for(lambda: cut.leader() == 0.0, LEASE + SLACK, "the cut replica knows it no longer leads")
        assert cut.get("/metrics")[0] == 200, "losing the database never stops /metrics"
        time.sleep(3 * INTERVAL)

        proxy.start()
        wait_for(lambda: same_buckets_everywhere([cut, *others]), 20, "the reconnected replica follows")
        assert cut.leader() == 0.0
        for replica in replicas:
            replica.stop()
    calls = bridge.snapshot_calls()
    assert_one_call_per_interval(calls)
    assert failover_gap(calls, cut_at) <= TIMING.failover_bound + SLACK
    assert_history_exactly_once(database_url, calls, may_lose=set())  # the cut leader's queue was flushed
