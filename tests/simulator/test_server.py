"""The Bridge simulator over real gRPC: DICT's own charging of list/read calls, knobs, categories, seeds."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from exporter.bridge.client import BridgeClient, BridgeConfigError, BridgeResult, BridgeTransientError
from exporter.simulator import policy_table as dp
from exporter.simulator.clock import ManualClock
from exporter.simulator.server import SimulatorServer

START = datetime(2026, 5, 4, 10, 0, tzinfo=UTC).timestamp()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
async def simulator(clock: ManualClock) -> AsyncIterator[SimulatorServer]:
    server = SimulatorServer(clock=clock, seed=3)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def client(simulator: SimulatorServer) -> AsyncIterator[BridgeClient]:
    bridge = BridgeClient(simulator.address, timeout=2.0)
    yield bridge
    await bridge.close()


async def _list_status(client: BridgeClient) -> str:
    """One list call and its outcome; the client retries 3 times without a deadline, so ask the raw code."""
    try:
        await client.list_policies()
    except BridgeTransientError as exc:
        return exc.code
    return "OK"


async def _successes_in_a_row(client: BridgeClient, limit: int) -> int:
    for done in range(limit):
        if await _list_status(client) != "OK":
            return done
    return limit


async def test_twenty_back_to_back_list_calls_empty_policies_list(
    client: BridgeClient, simulator: SimulatorServer
) -> None:
    for _ in range(20):
        assert await _list_status(client) == "OK"
    assert await _list_status(client) == "RESOURCE_EXHAUSTED"  # the 21st
    assert simulator.list_calls == 21  # a 429 (RESOURCE_EXHAUSTED) is never retried
    assert simulator.engine.tokens(dp.POLICIES_LIST) == 0


async def test_policies_list_recovers_at_six_per_minute(
    client: BridgeClient, simulator: SimulatorServer, clock: ManualClock
) -> None:
    simulator.engine.set_tokens(dp.POLICIES_LIST, 0)
    clock.advance(9.9)
    assert await _list_status(client) == "RESOURCE_EXHAUSTED"  # 0.99 token: DICT needs a whole one
    clock.advance(0.1)
    assert await _successes_in_a_row(client, 5) == 1  # 10 s = 1 token
    clock.advance(60)
    assert await _successes_in_a_row(client, 10) == 6  # one minute = 6 tokens


async def test_the_list_answer_shows_its_own_cost(client: BridgeClient) -> None:
    first = (await client.list_policies()).snapshot.policy(dp.POLICIES_LIST)
    second = (await client.list_policies()).snapshot.policy(dp.POLICIES_LIST)
    assert first is not None
    assert second is not None
    assert (first.available_tokens, second.available_tokens) == (19, 18)


async def test_policies_read_is_charged_per_read_and_refused_when_empty(
    client: BridgeClient, simulator: SimulatorServer
) -> None:
    simulator.engine.set_tokens(dp.POLICIES_READ, 1)
    await client.get_policy("ENTRIES_WRITE")
    with pytest.raises(BridgeTransientError) as caught:
        await client.get_policy("ENTRIES_WRITE")
    assert caught.value.code == "RESOURCE_EXHAUSTED"
    assert simulator.read_calls == 2  # the refused read is not retried


async def test_negative_balances_are_served_as_they_are(
    client: BridgeClient, simulator: SimulatorServer, clock: ManualClock
) -> None:
    simulator.engine.set_tokens("KEYS_CHECK", 5)
    simulator.engine.consume("KEYS_CHECK", 20)
    reading = (await client.get_policy("KEYS_CHECK")).snapshot.policies[0]
    assert reading.available_tokens == -15
    clock.advance(30)  # 70/min refill: +35
    reading = (await client.get_policy("KEYS_CHECK")).snapshot.policies[0]
    assert reading.available_tokens == 20


async def test_a_category_change_switches_the_antiscan_limits_and_clamps_the_balance(
    client: BridgeClient, simulator: SimulatorServer
) -> None:
    simulator.engine.set_category("F")
    snapshot = (await client.list_policies()).snapshot
    assert snapshot.category == "F"
    for name in dp.CATEGORY_POLICIES:
        reading = snapshot.policy(name)
        assert reading is not None
        assert (reading.capacity, reading.refill_tokens, reading.available_tokens) == (500, 250, 500)
    write = snapshot.policy("ENTRIES_WRITE")
    assert write is not None
    assert write.capacity == 36000  # only the category policies change


async def test_policies_can_be_added_and_removed(client: BridgeClient, simulator: SimulatorServer) -> None:
    simulator.engine.add_policy("EVENT_LIST", 100, 10, 60)
    simulator.engine.remove_policy("CIDS_FILES_WRITE")
    snapshot = (await client.list_policies()).snapshot
    names = [p.name for p in snapshot.policies]
    assert "EVENT_LIST" in names
    assert "CIDS_FILES_WRITE" not in names
    assert len(names) == 30


async def test_the_deprecated_404_ratio_is_still_on_the_wire_for_old_exporters(
    simulator: SimulatorServer,
) -> None:
    import grpc.aio

    from exporter.bridge.proto import rate_limit_pb2 as pb
    from exporter.bridge.proto import rate_limit_pb2_grpc as pb_grpc

    simulator.engine.set_error_404_rate(dp.ANTISCAN, 0.08)
    async with grpc.aio.insecure_channel(simulator.address) as channel:
        stub = pb_grpc.RateLimitServiceStub(channel)  # type: ignore[no-untyped-call]
        response = await stub.GetRateLimitPolicies(pb.GetRateLimitPoliciesRequest(), timeout=2)
    policies = {p.name: p for p in response.policies}
    assert policies[dp.ANTISCAN].error_404_rate == pytest.approx(0.08)
    assert not policies["CLAIMS_READ"].HasField("error_404_rate")


async def test_response_time_follows_the_simulator_clock(client: BridgeClient, clock: ManualClock) -> None:
    clock.advance(61.2345)
    snapshot = (await client.list_policies()).snapshot
    assert snapshot.response_time == datetime(2026, 5, 4, 10, 1, 1, 234000, tzinfo=UTC)


async def _correlation_ids(seed: int) -> list[str]:
    server = SimulatorServer(clock=ManualClock(START), seed=seed)
    await server.start()
    bridge = BridgeClient(server.address)
    try:
        results: list[BridgeResult] = [await bridge.list_policies() for _ in range(3)]
    finally:
        await bridge.close()
        await server.stop()
    return [result.snapshot.correlation_id for result in results]


async def test_correlation_ids_are_32_lowercase_hex_and_follow_the_seed() -> None:
    first, again, other = await _correlation_ids(11), await _correlation_ids(11), await _correlation_ids(12)
    assert first == again
    assert first != other
    assert len(set(first)) == 3
    assert all(len(cid) == 32 and cid == cid.lower() and int(cid, 16) >= 0 for cid in first)


async def test_period_refill_adds_whole_refills_at_period_boundaries(clock: ManualClock) -> None:
    server = SimulatorServer(clock=clock, refill="period")
    server.engine.set_tokens("CLAIMS_LIST_WITHOUT_ROLE", 0)  # 10 per 60 s, capacity 50
    clock.advance(59)
    assert server.engine.tokens("CLAIMS_LIST_WITHOUT_ROLE") == 0
    clock.advance(1)
    assert server.engine.tokens("CLAIMS_LIST_WITHOUT_ROLE") == 10
    clock.advance(600)
    assert server.engine.tokens("CLAIMS_LIST_WITHOUT_ROLE") == 50  # the rest was discarded at capacity


async def test_the_server_binds_the_requested_host_and_reports_its_port() -> None:
    server = SimulatorServer(listen="127.0.0.1:0")
    with pytest.raises(RuntimeError):
        _ = server.address
    await server.start()
    try:
        host, _, port = server.address.rpartition(":")
        assert host == "127.0.0.1"
        assert int(port) > 0
    finally:
        await server.stop()


async def test_a_read_without_a_policy_name_is_invalid_argument_and_free(
    client: BridgeClient, simulator: SimulatorServer
) -> None:
    with pytest.raises(BridgeConfigError) as caught:
        await client.get_policy("")
    assert caught.value.code == "INVALID_ARGUMENT"
    assert simulator.engine.tokens(dp.POLICIES_READ) == 200


async def test_fault_injection_breaks_list_answers_as_told(
    client: BridgeClient, simulator: SimulatorServer
) -> None:
    from exporter.bridge.client import Rejection

    engine = simulator.engine
    for kind in ("empty", "zero_capacity", "bad_category", "bad_counts", "nul_name", "future_time"):
        engine.inject_fault(kind)
    empty = await client.list_policies()
    assert (empty.snapshot.policies, empty.rejected) == ((), ())
    zero = await client.list_policies()
    assert zero.snapshot.policies == ()
    assert {r.reason for r in zero.rejected} == {"capacity_not_positive"}
    bad = await client.list_policies()
    assert bad.snapshot.category == ""
    assert Rejection("", "unknown_category") in bad.rejected
    counts = await client.list_policies()
    write = counts.snapshot.policy("ENTRIES_WRITE")
    assert write is not None
    assert write.response_counts is None  # the policy stays, its counts go
    assert Rejection("ENTRIES_WRITE", "duplicate_response_code") in counts.rejected
    nul = await client.list_policies()
    assert len(nul.snapshot.policies) == len(engine.policy_names()) - 1
    assert [r.reason for r in nul.rejected] == ["invalid_name"]
    future = await client.list_policies()
    assert future.snapshot.response_time.year == 9999  # the poller, not the client, judges plausibility
    healthy = await client.list_policies()
    assert (len(healthy.snapshot.policies), healthy.rejected) == (30, ())
    with pytest.raises(ValueError, match="not one of"):
        engine.inject_fault("loud")


def test_the_engine_counts_true_consumption_per_policy(clock: ManualClock) -> None:
    from exporter.simulator.engine import BucketEngine

    engine = BucketEngine(clock=clock)
    engine.consume("ENTRIES_WRITE", 500)
    clock.advance(10)
    engine.consume("ENTRIES_WRITE", 250.5)
    assert engine.consumed("ENTRIES_WRITE") == 750.5
    assert engine.consumed("KEYS_CHECK") == 0.0
