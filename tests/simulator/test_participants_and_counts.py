"""The simulator as a counting, multi-participant Bridge (issue 15): answer counts that follow the
traffic, a Bridge restart, participants selected by ISPB, the old-style mode, and the two scenarios."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc.aio
import pytest

from exporter.bridge.client import BridgeClient, BridgeConfigError, BridgeTransientError
from exporter.bridge.proto import rate_limit_pb2 as pb
from exporter.bridge.proto import rate_limit_pb2_grpc as pb_grpc
from exporter.simulator import policy_table as dp
from exporter.simulator import scenario as sc
from exporter.simulator.clock import ManualClock
from exporter.simulator.engine import BucketEngine
from exporter.simulator.scenario import ScenarioError, builtin_scenario, parse_scenario
from exporter.simulator.server import SimulatorServer

START = 1_780_000_000.0
SMALL = "CLAIMS_LIST_WITHOUT_ROLE"  # capacity 50, refill 10/min


def _engine(text: str, category: str = "A") -> tuple[BucketEngine, ManualClock]:
    clock = ManualClock(START)
    return BucketEngine(scenario=parse_scenario(text, "t.yaml"), clock=clock, category=category), clock


def _share(before: dict[int, int], after: dict[int, int]) -> float:
    answers = sum(after.values()) - sum(before.values())
    return (after[404] - before[404]) / answers


def test_counts_follow_the_traffic_served_missed_and_refused() -> None:
    engine, clock = _engine(
        f"traffic: {{{dp.ANTISCAN}: {{rate: 600, not_found: 0.25}}}}\n"
        f"events: [{{at: 1, burst: {{policy: {SMALL}, requests: 60}}}}]\n"
    )
    clock.advance(10)
    # 600/min for 10 s: 100 lookups, a quarter of them 404; the burst: 50 served, 10 refused (429).
    assert engine.response_counts(dp.ANTISCAN) == ((200, 75), (404, 25), (429, 0))
    assert engine.response_counts(SMALL) == ((200, 50), (404, 0), (429, 10))
    # Policies nobody asked list the three statuses at 0, so their series exist before the first event.
    assert engine.response_counts("ENTRIES_WRITE") == ((200, 0), (404, 0), (429, 0))


def test_a_bridge_restart_resets_the_counts_and_not_the_buckets() -> None:
    engine, clock = _engine(
        f"traffic: {{{dp.ANTISCAN}: {{rate: 600}}}}\nevents: [{{at: 20, bridge_restart: {{}}}}]\n"
    )
    clock.advance(10)
    assert dict(engine.response_counts(dp.ANTISCAN))[200] == 100
    tokens = engine.tokens(dp.ANTISCAN)
    engine.restart_counts()
    assert dict(engine.response_counts(dp.ANTISCAN))[200] == 0
    assert engine.tokens(dp.ANTISCAN) == tokens  # DICT's buckets do not care about the Bridge
    clock.advance(15)  # 10 more seconds of traffic, then the scenario's restart at 20 s, then 5 more
    assert dict(engine.response_counts(dp.ANTISCAN))[200] == 50


def test_the_participants_list_is_validated_with_file_line_and_key() -> None:
    good = parse_scenario(
        'participants:\n  - {ispb: "11111111", category: C}\n  - {ispb: "22222222", events: []}\n', "p.yaml"
    )
    assert [(p.ispb, p.category, p.events) for p in good.participants] == [
        ("11111111", "C", None),
        ("22222222", None, ()),
    ]
    for text, message in (
        ("participants:\n  - {ispb: 11111111}\n", "p.yaml:2: participants[0].ispb: must be a quoted string"),
        (
            'participants:\n  - {ispb: "1234567"}\n',
            "participants[0].ispb: must be a quoted string of 8 digits",
        ),
        ('participants:\n  - {ispb: "11111111"}\n  - {ispb: "11111111"}\n', "is listed twice"),
        ('participants:\n  - {ispb: "11111111", category: Z}\n', "participants[0].category: must be one"),
        (
            'participants:\n  - {ispb: "11111111", traffic: {NOPE: {rate: 1}}}\n',
            "participants[0].traffic.NOPE",
        ),
        ("participants: []\n", "participants: must be a non-empty list"),
    ):
        with pytest.raises(ScenarioError, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse_scenario(text, "p.yaml")


TWO = f"""
participants:
  - ispb: "11111111"
    category: A
    traffic: {{{dp.ANTISCAN}: {{rate: 600, not_found: 0.5}}}}
  - ispb: "22222222"
    category: H
"""


@pytest.fixture
async def two() -> AsyncIterator[tuple[SimulatorServer, ManualClock]]:
    clock = ManualClock(START)
    server = SimulatorServer(scenario=parse_scenario(TWO, "two.yaml"), clock=clock)
    await server.start()
    yield server, clock
    await server.stop()


async def _list(address: str, ispb: str | None) -> tuple[str, str, dict[str, dict[int, int]]]:
    bridge = BridgeClient(address, timeout=2.0, participant_ispb=ispb)
    try:
        snapshot = (await bridge.list_policies()).snapshot
    finally:
        await bridge.close()
    counts = {p.name: dict(p.response_counts or ()) for p in snapshot.policies}
    return snapshot.participant_ispb, snapshot.category, counts


async def test_participants_are_selected_by_ispb_each_with_its_category_and_buckets(
    two: tuple[SimulatorServer, ManualClock],
) -> None:
    server, clock = two
    clock.advance(10)
    first = await _list(server.address, "11111111")
    second = await _list(server.address, "22222222")
    default = await _list(server.address, None)
    assert (first[0], first[1]) == ("11111111", "A")
    assert (second[0], second[1]) == ("22222222", "H")  # the answer names the participant asked about
    assert (default[0], default[1]) == ("11111111", "A")  # an empty ISPB: the first participant
    # Only the first participant has lookup traffic: 100 in 10 s, half of them 404.
    assert first[2][dp.ANTISCAN] == {200: 50, 404: 50, 429: 0}
    assert second[2][dp.ANTISCAN] == {200: 0, 404: 0, 429: 0}
    # Each participant spends its own POLICIES_LIST: 2 calls on the first (one before its answer was
    # read, as DICT charges the call itself), 1 on the second.
    assert first[2][dp.POLICIES_LIST][200] == 1
    assert default[2][dp.POLICIES_LIST][200] == 2
    assert second[2][dp.POLICIES_LIST][200] == 1


async def test_an_unknown_participant_is_refused_with_permission_denied(
    two: tuple[SimulatorServer, ManualClock],
) -> None:
    server, _ = two
    with pytest.raises(BridgeConfigError) as caught:
        await _list(server.address, "33333333")
    assert caught.value.code == "PERMISSION_DENIED"


async def test_one_participants_empty_list_bucket_does_not_refuse_the_other(
    two: tuple[SimulatorServer, ManualClock],
) -> None:
    server, _ = two
    bridge = BridgeClient(server.address, timeout=2.0, participant_ispb="22222222")
    try:
        for _ in range(20):
            await bridge.list_policies()
        with pytest.raises(BridgeTransientError):
            await bridge.list_policies()
    finally:
        await bridge.close()
    ispb, _, counts = await _list(server.address, "11111111")
    assert ispb == "11111111"
    assert counts[dp.POLICIES_LIST][429] == 0
    assert server.engines["22222222"].response_counts(dp.POLICIES_LIST)[2][1] >= 1  # its 429s


async def test_a_single_participant_simulator_answers_for_the_ispb_it_is_asked_about() -> None:
    server = SimulatorServer(clock=ManualClock(START))
    await server.start()
    try:
        assert (await _list(server.address, "00038166"))[0] == "00038166"
        assert (await _list(server.address, None))[0] == ""
    finally:
        await server.stop()


async def test_the_old_style_mode_sends_neither_counts_nor_ispb() -> None:
    server = SimulatorServer(clock=ManualClock(START), legacy=True)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.RateLimitServiceStub(channel)  # type: ignore[no-untyped-call]
            request = pb.GetRateLimitPoliciesRequest(participant_ispb="12345678")
            response = await stub.GetRateLimitPolicies(request, timeout=2)
    finally:
        await server.stop()
    assert response.participant_ispb == ""
    assert len(response.policies) == 30
    assert all(len(policy.response_counts) == 0 for policy in response.policies)


def test_the_404_storm_lifts_the_lookup_share_well_above_seven_percent() -> None:
    clock = ManualClock(START)
    engine = BucketEngine(scenario=builtin_scenario("404_storm"), clock=clock)

    def counts() -> dict[int, int]:
        return dict(engine.response_counts(dp.ANTISCAN))

    clock.advance(30)
    calm = counts()
    clock.advance(300)
    storm = counts()
    clock.advance(300)
    after = counts()
    assert _share({200: 0, 404: 0, 429: 0}, calm) == pytest.approx(0.02, abs=0.002)
    assert _share(calm, storm) == pytest.approx(0.15, abs=0.005)
    assert _share(storm, after) == pytest.approx(0.02, abs=0.002)
    assert storm[429] == 0  # the bucket never empties: only the share shows the storm
    assert engine.tokens(dp.ANTISCAN) > 0.5 * 50_000


def test_429_on_one_policy_refuses_that_policy_only() -> None:
    clock = ManualClock(START)
    engine = BucketEngine(scenario=builtin_scenario("429_on_one_policy"), clock=clock)
    clock.advance(100)
    refused = {name: dict(engine.response_counts(name))[429] for name in engine.policy_names()}
    # 50 requests/s against 10 tokens/s from about 35 s to 80 s: about 45 s x 40 refused per second.
    assert 1_500 < refused.pop("ENTRIES_UPDATE") < 2_000
    assert set(refused.values()) == {0}
    assert dict(engine.response_counts("ENTRIES_WRITE"))[200] > 0


def test_the_new_event_and_fault_kinds_are_part_of_the_format() -> None:
    assert "bridge_restart" in sc.ACTIONS
    assert "bad_counts" in sc.FAULT_KINDS
    assert {"404_storm", "429_on_one_policy"} <= set(sc.BUILTIN)
