"""Replicas sharing one poller through PostgreSQL, in-process: the shared snapshot codec, one leader and a
follower serving its snapshot, a clean handover that carries the counters on, and fencing of a replaced
leader (it can neither poll nor publish). With real processes: tests/service/test_exporter_replicas.py."""

from __future__ import annotations

import asyncio
import json
import math
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from exporter.history import migrations, shared_snapshot
from exporter.service.derivation import derive
from exporter.service.leader import LeaseTiming, PollerLease
from exporter.simulator.server import SimulatorServer
from exporter.snapshot import PolicyReading, Snapshot
from tests.service.test_exporter_service import Running, http, settings_for, sim, start  # noqa: F401 - fixtures
from tests.support.tcp_proxy import TcpProxy


def _snapshot(seconds: float, tokens: int) -> Snapshot:
    policies = (
        PolicyReading("ENTRIES_WRITE", tokens, 36000, 1200, 60, ((200, tokens), (404, 7), (429, 0))),
        PolicyReading("NEVER_REFILLS", -3, 10, 0, 60),  # infinite recovery ETA, negative balance
    )
    at = datetime(2026, 12, 1, 12, 0, tzinfo=UTC) + timedelta(seconds=seconds)
    return Snapshot(at, "c0ffee" * 5 + "00", "B", policies, participant_ispb="00038166")


def test_the_shared_snapshot_round_trips_every_derived_value_through_json() -> None:
    first = derive(_snapshot(0, 30000), None)
    second = derive(_snapshot(30, 20000), first)
    document = json.loads(json.dumps(shared_snapshot.encode(second), allow_nan=False))
    restored = shared_snapshot.decode(document)
    assert restored == second
    assert math.isinf(restored.states[1].recovery_eta_seconds)
    assert restored.states[0].consumed_tokens_total == second.states[0].consumed_tokens_total > 0
    # The answer counts, the count window and the participant travel too (a follower exports the same).
    assert restored.states[0].reading.response_counts == ((200, 20000), (404, 7), (429, 0))
    assert restored.states[0].count_window == second.states[0].count_window
    assert restored.snapshot.participant_ispb == "00038166"


def _timing() -> LeaseTiming:
    return LeaseTiming(interval=1.0, lease=1.5, lead=0.25)


async def _wait(check: Any, within: float) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_a_replaced_leader_can_neither_poll_nor_publish(database_url: str) -> None:
    await asyncio.to_thread(migrations.apply, database_url)
    lease = PollerLease(database_url, group="g", timing=_timing())
    await lease.start()
    try:
        assert lease.is_leader
        assert lease.term == 1
        assert await lease.permit()
        assert not await lease.permit(), "a second call within half an interval is refused"
        # Another replica took over (what happens while this one is frozen past its lease).
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            await conn.execute(
                "UPDATE dict_rate_limit_poller_lease SET holder = 'other', term = term + 1,"
                " last_poll_at = now() - interval '1 hour'"
            )
            assert not await lease.permit()
            assert not lease.is_leader
            await lease.publish(derive(_snapshot(0, 1), None))
            cursor = await conn.execute("SELECT count(*) FROM dict_rate_limit_shared_snapshot")
            assert await cursor.fetchone() == (0,)
    finally:
        await lease.stop()


async def test_one_replica_polls_the_other_serves_its_snapshot_and_takes_over_when_it_stops(
    sim: SimulatorServer,  # noqa: F811 - the fixture imported above
    start: Any,  # noqa: F811
    database_url: str,
) -> None:
    await asyncio.to_thread(migrations.apply, database_url)
    common = {"database_url": database_url, "poller_lease_seconds": 1.5}
    first: Running = await start(settings_for(sim.address, **common))
    second: Running = await start(settings_for(sim.address, **common))
    assert await first.value("dict_rate_limit_poller_leader") == 1.0
    assert await second.value("dict_rate_limit_poller_leader") == 0.0
    await first.until(lambda: asyncio.sleep(0, first.service.poller.attempted >= 3), within=10)

    async def same_snapshot() -> bool:
        a, b = await first.status("/api/v1/policies"), await second.status("/api/v1/policies")
        return bool(a[0] == b[0] == 200 and a[1]["response_time"] == b[1]["response_time"]) and (
            a[1]["policies"] == b[1]["policies"]
        )

    await first.until(same_snapshot, within=5)
    assert second.service.poller.attempted == 0
    await first.until(lambda: _replicas_seen(first, 2.0), within=5)
    status, body = await second.status("/health/ready")
    assert (status, body["checks"]["bridge"]) == (200, "ok")
    totals = {
        p["name"]: p["consumed_tokens_total"]
        for p in (await second.status("/api/v1/policies"))[1]["policies"]
    }

    await first.service.stop()
    await second.until(
        lambda: asyncio.sleep(0, second.service.poller.attempted >= 2), within=_timing().failover_bound + 3
    )
    assert await second.value("dict_rate_limit_poller_leader") == 1.0
    assert sim.list_calls == first.service.poller.attempted + second.service.poller.attempted
    after = {
        p["name"]: p["consumed_tokens_total"]
        for p in (await second.status("/api/v1/policies"))[1]["policies"]
    }
    assert all(after[name] >= total for name, total in totals.items()), (
        "the new leader carries the counters on"
    )


async def test_a_follower_is_ready_only_while_the_shared_snapshot_is_fresh(
    sim: SimulatorServer,  # noqa: F811 - the fixture imported above
    start: Any,  # noqa: F811
    database_url: str,
) -> None:
    await asyncio.to_thread(migrations.apply, database_url)
    common = {"database_url": database_url, "poller_lease_seconds": 1.5, "stale_after_intervals": 2}
    leader: Running = await start(settings_for(sim.address, **common))
    follower: Running = await start(settings_for(sim.address, **common))
    await follower.until(lambda: _ready(follower), within=10)
    await sim.stop()  # the leader keeps its lease but gets no snapshot: the shared one ages
    await follower.until(lambda: _not_ready(follower), within=2 * 1.0 * 2 + 3)
    status, body = await follower.status("/health/ready")
    assert status == 503
    assert "no successful poll for 2 intervals" in body["checks"]["bridge"]
    assert follower.service.poller.attempted == 0
    assert await leader.value("dict_rate_limit_poller_leader") == 1.0
    assert await follower.value("dict_rate_limit_stale") == 1.0


async def _ready(running: Running) -> bool:
    return (await running.status("/health/ready"))[0] == 200


async def _not_ready(running: Running) -> bool:
    return (await running.status("/health/ready"))[0] == 503


async def test_without_a_database_the_replica_polls_alone_and_warns_that_replicas_would_each_poll(
    sim: SimulatorServer,  # noqa: F811 - the fixture imported above
    start: Any,  # noqa: F811
    caplog: Any,
) -> None:
    running: Running = await start(settings_for(sim.address))
    assert await running.value("dict_rate_limit_poller_leader") == 1.0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("replicas would each poll" in message for message in warnings), warnings
    await running.until(lambda: asyncio.sleep(0, running.service.poller.attempted >= 1))


async def test_followers_adopt_the_shared_snapshot_unless_it_is_older_than_stale(database_url: str) -> None:
    await asyncio.to_thread(migrations.apply, database_url)
    leader = PollerLease(database_url, group="g", timing=_timing())
    adopted: list[tuple[Any, float]] = []

    async def adopt(derived: Any, age: float) -> None:
        adopted.append((derived, age))

    await leader.start()
    shared = derive(_snapshot(0, 30000), None)
    await leader.publish(shared)
    follower = PollerLease(database_url, group="g", timing=_timing(), adopt=adopt, max_age=60)
    await follower.start()
    try:
        assert not follower.is_leader
        assert [derived for derived, _ in adopted] == [shared]
        assert 0 <= adopted[0][1] < 5
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            await conn.execute(
                "UPDATE dict_rate_limit_shared_snapshot SET published_at = now() - interval '1 hour'"
            )
        late = PollerLease(database_url, group="g", timing=_timing(), adopt=adopt, max_age=60)
        await late.start()
        await late.stop()
        assert len(adopted) == 1, "a snapshot an hour old is not served (nor derived against)"
    finally:
        await follower.stop()
        await leader.stop()


async def test_a_lone_leader_keeps_polling_through_a_database_outage_and_stores_the_backlog(
    sim: SimulatorServer,  # noqa: F811 - the fixture imported above
    start: Any,  # noqa: F811
    database_url: str,
) -> None:
    """No other replica was seen, so nobody could take over: stopping would only blind the deployment."""
    await asyncio.to_thread(migrations.apply, database_url)
    with TcpProxy.for_postgres(database_url) as proxy:
        settings = settings_for(
            sim.address,
            database_url=proxy.url_for(database_url),
            poller_lease_seconds=1.0,
            stale_after_intervals=2,
        )
        running: Running = await start(settings)
        poller, lease = running.service.poller, running.service.lease
        assert lease is not None
        await running.until(lambda: asyncio.sleep(0, poller.attempted >= 2))
        assert lease.others == 0
        await asyncio.to_thread(proxy.stop)
        before = poller.attempted
        await asyncio.sleep(4.5)  # longer than the lease and than STALE_AFTER_INTERVALS intervals
        assert poller.attempted >= before + 3, "the lone leader stopped polling without its database"
        assert lease.solo
        assert not poller.is_stale()
        assert await running.value("dict_rate_limit_poller_leader") == 1.0
        await asyncio.to_thread(proxy.start)
        await running.until(lambda: asyncio.sleep(0, lease.term is not None and not lease.solo), within=10)
        await running.service.stop()  # flushes the history queue
    with psycopg.connect(database_url) as conn:
        stored = conn.execute("SELECT count(DISTINCT response_time) FROM dict_rate_limit_states").fetchone()
    assert stored == (sim.list_calls,), "every snapshot polled during the outage is stored once"


async def _replicas_seen(running: Running, count: float) -> bool:
    return await running.value("dict_rate_limit_poller_replicas") == count
