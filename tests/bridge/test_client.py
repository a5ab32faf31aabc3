"""The Bridge client over real gRPC on loopback: against the simulator, and against tiny servicers that
answer exactly the malformed responses a broken Bridge could send."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

import grpc
import grpc.aio
import pytest

from exporter.bridge.client import (
    MAX_ATTEMPTS,
    BridgeClient,
    BridgeConfigError,
    BridgeError,
    BridgeMalformedError,
    BridgeResult,
    BridgeTransientError,
    Rejection,
)
from exporter.bridge.proto import rate_limit_pb2 as pb
from exporter.bridge.proto import rate_limit_pb2_grpc as pb_grpc
from exporter.config import Settings
from exporter.simulator import policy_table as dp
from exporter.simulator.clock import ManualClock
from exporter.simulator.server import SimulatorServer
from tests.support.certs import SERVER_NAME, Pki, make_pki

START = datetime(2026, 3, 2, 12, 0, 0, 123456, tzinfo=UTC).timestamp()


@pytest.fixture
async def simulator() -> AsyncIterator[SimulatorServer]:
    server = SimulatorServer(clock=ManualClock(START), seed=7)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def attempts() -> list[str]:
    return []


@pytest.fixture
async def client(simulator: SimulatorServer, attempts: list[str]) -> AsyncIterator[BridgeClient]:
    bridge = BridgeClient(simulator.address, timeout=2.0, on_attempt=attempts.append)
    yield bridge
    await bridge.close()


async def test_list_returns_all_30_policies_with_dict_limits(client: BridgeClient) -> None:
    result = await client.list_policies()
    snapshot = result.snapshot
    assert result.rejected == ()
    assert snapshot.category == "A"
    assert [p.name for p in snapshot.policies] == list(dp.POLICY_NAMES)
    write = snapshot.policy("ENTRIES_WRITE")
    assert write is not None
    assert (write.available_tokens, write.capacity, write.refill_tokens, write.refill_period_sec) == (
        36000,
        36000,
        1200,
        60,
    )
    antiscan = snapshot.policy("ENTRIES_READ_PARTICIPANT_ANTISCAN")
    assert antiscan is not None
    assert (antiscan.capacity, antiscan.refill_tokens) == (50000, 25000)
    assert write.error_404_rate is None  # the simulator counts no 404s here: absent, not 0


async def test_response_time_is_the_simulator_clock_in_utc_with_milliseconds(client: BridgeClient) -> None:
    snapshot = (await client.list_policies()).snapshot
    assert snapshot.response_time == datetime(2026, 3, 2, 12, 0, 0, 123000, tzinfo=UTC)
    assert snapshot.response_time.utcoffset() is not None
    assert len(snapshot.correlation_id) == 32
    assert int(snapshot.correlation_id, 16) >= 0
    assert snapshot.correlation_id == snapshot.correlation_id.lower()


async def test_get_policy_returns_one_policy_and_spends_policies_read(
    client: BridgeClient, simulator: SimulatorServer
) -> None:
    result = await client.get_policy("KEYS_CHECK")
    assert [(p.name, p.capacity, p.refill_tokens) for p in result.snapshot.policies] == [
        ("KEYS_CHECK", 70, 70)
    ]
    assert simulator.engine.tokens(dp.POLICIES_READ) == 199
    assert simulator.engine.tokens(dp.POLICIES_LIST) == 20


async def test_get_of_an_unknown_policy_is_a_plain_error_tried_once(
    client: BridgeClient, attempts: list[str]
) -> None:
    with pytest.raises(BridgeError) as caught:
        await client.get_policy("NO_SUCH_POLICY")
    assert caught.type is BridgeError
    assert (caught.value.code, caught.value.transient) == ("NOT_FOUND", False)
    assert attempts == ["NOT_FOUND"]


async def test_unavailable_is_retried_until_it_succeeds(
    client: BridgeClient, simulator: SimulatorServer, attempts: list[str]
) -> None:
    simulator.engine.inject_errors("UNAVAILABLE", 2)
    result = await client.list_policies(deadline=time.monotonic() + 10)
    assert len(result.snapshot.policies) == 30
    assert attempts == ["UNAVAILABLE", "UNAVAILABLE", "OK"]
    assert simulator.list_calls == 3


@pytest.mark.parametrize("code", ["UNAUTHENTICATED", "PERMISSION_DENIED", "INVALID_ARGUMENT"])
async def test_configuration_errors_are_never_retried(
    client: BridgeClient, simulator: SimulatorServer, attempts: list[str], code: str
) -> None:
    simulator.engine.inject_errors(code, 5)
    with pytest.raises(BridgeConfigError) as caught:
        await client.list_policies(deadline=time.monotonic() + 10)
    assert (caught.value.code, caught.value.transient) == (code, False)
    assert "not retried" in str(caught.value)
    assert attempts == [code]


async def test_without_a_deadline_transient_errors_get_a_bounded_number_of_attempts(
    client: BridgeClient, simulator: SimulatorServer, attempts: list[str]
) -> None:
    simulator.engine.inject_errors("RESOURCE_EXHAUSTED", 100)
    with pytest.raises(BridgeTransientError) as caught:
        await client.list_policies()
    assert (caught.value.code, caught.value.transient) == ("RESOURCE_EXHAUSTED", True)
    assert attempts == ["RESOURCE_EXHAUSTED"] * MAX_ATTEMPTS


async def test_retries_never_pass_the_deadline(
    client: BridgeClient, simulator: SimulatorServer, attempts: list[str]
) -> None:
    simulator.engine.inject_errors("UNAVAILABLE", 1000)
    started = time.monotonic()
    with pytest.raises(BridgeTransientError) as caught:
        await client.list_policies(deadline=started + 1.5)
    elapsed = time.monotonic() - started
    assert caught.value.code == "UNAVAILABLE"
    assert elapsed < 1.5 + 0.25  # generous for a loaded machine, but far below an unbounded retry loop
    assert len(attempts) >= 3
    assert set(attempts) == {"UNAVAILABLE"}


async def test_a_deadline_shorter_than_the_latency_is_deadline_exceeded_and_transient(
    simulator: SimulatorServer, attempts: list[str]
) -> None:
    simulator.engine.inject_latency(3.0)
    bridge = BridgeClient(simulator.address, timeout=0.4, on_attempt=attempts.append)
    started = time.monotonic()
    try:
        with pytest.raises(BridgeTransientError) as caught:
            await bridge.list_policies(deadline=started + 1.0)
    finally:
        await bridge.close()
    assert caught.value.code == "DEADLINE_EXCEEDED"
    assert caught.value.transient is True
    assert time.monotonic() - started < 1.0 + 0.3
    assert attempts[0] == "DEADLINE_EXCEEDED"
    assert set(attempts) == {"DEADLINE_EXCEEDED"}


async def test_a_deadline_already_past_makes_no_call(
    client: BridgeClient, simulator: SimulatorServer, attempts: list[str]
) -> None:
    with pytest.raises(BridgeTransientError) as caught:
        await client.list_policies(deadline=time.monotonic() - 1)
    assert caught.value.code == "DEADLINE_EXCEEDED"
    assert attempts == []
    assert simulator.list_calls == 0


async def test_nothing_listening_is_unavailable() -> None:
    from devstack.embedded import free_port

    bridge = BridgeClient(f"127.0.0.1:{free_port()}", timeout=0.5)
    try:
        with pytest.raises(BridgeTransientError) as caught:
            await bridge.list_policies()
    finally:
        await bridge.close()
    assert caught.value.code == "UNAVAILABLE"


def test_from_settings_takes_address_timeout_and_tls_files(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    settings = Settings(
        bridge_address="bridge:443",
        bridge_tls_ca_file=pki.ca,
        bridge_tls_server_name=SERVER_NAME,
        bridge_timeout_seconds=1.5,
    )
    bridge = BridgeClient.from_settings(settings)
    assert (bridge.address, bridge.timeout, bridge.tls) == ("bridge:443", 1.5, True)
    assert BridgeClient.from_settings(Settings()).tls is False


# --- malformed responses, from a servicer that answers whatever the test gives it


class _Canned(pb_grpc.RateLimitServiceServicer):
    def __init__(self, build: Callable[[], pb.GetRateLimitPoliciesResponse]) -> None:
        self.build = build

    async def GetRateLimitPolicies(self, request: object, context: object) -> pb.GetRateLimitPoliciesResponse:
        return self.build()

    async def GetRateLimitPolicy(self, request: object, context: object) -> pb.GetRateLimitPolicyResponse:
        listed = self.build()
        return pb.GetRateLimitPolicyResponse(
            response_time=listed.response_time, correlation_id="c" * 32, category=listed.category
        )


def _response(category: str = "A", *policies: pb.RateLimitPolicy) -> pb.GetRateLimitPoliciesResponse:
    response = pb.GetRateLimitPoliciesResponse(correlation_id="0" * 32, category=category, policies=policies)
    response.response_time.FromDatetime(datetime(2026, 1, 1, tzinfo=UTC))
    return response


def _policy(name: str, **fields: float) -> pb.RateLimitPolicy:
    values = {"available_tokens": 5, "capacity": 10, "refill_tokens": 1, "refill_period_sec": 60}
    return pb.RateLimitPolicy(name=name, **{**values, **fields})


async def _call_canned(response: pb.GetRateLimitPoliciesResponse, *, single: bool = False) -> BridgeResult:
    server = grpc.aio.server()
    pb_grpc.add_RateLimitServiceServicer_to_server(_Canned(lambda: response), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    bridge = BridgeClient(f"127.0.0.1:{port}", timeout=2.0)
    try:
        return await (bridge.get_policy("X") if single else bridge.list_policies())
    finally:
        await bridge.close()
        await server.stop(None)


async def test_bad_policies_are_rejected_one_by_one_with_a_reason() -> None:
    response = _response(
        "A",
        _policy("GOOD", available_tokens=-15),
        _policy("ZERO_CAPACITY", capacity=0),
        _policy("ZERO_PERIOD", refill_period_sec=0),
        _policy("NEGATIVE_REFILL", refill_tokens=-1),
        _policy(""),
        _policy("GOOD", available_tokens=9),
        _policy("EVENT_LIST", error_404_rate=0.0),
    )
    result = await _call_canned(response)
    assert [p.name for p in result.snapshot.policies] == ["GOOD", "EVENT_LIST"]
    good, event_list = result.snapshot.policies
    assert good.available_tokens == -15  # negative balances are DICT's truth, never clamped
    assert good.error_404_rate is None
    assert event_list.error_404_rate == 0.0  # present and zero is not absent
    assert result.rejected == (
        Rejection("ZERO_CAPACITY", "capacity_not_positive"),
        Rejection("ZERO_PERIOD", "refill_period_not_positive"),
        Rejection("NEGATIVE_REFILL", "refill_tokens_negative"),
        Rejection("", "missing_field"),
        Rejection("GOOD", "duplicate_name"),
    )


@pytest.mark.parametrize(("category", "reason"), [("Z", "unknown_category"), ("", "unknown_category")])
async def test_a_response_without_a_valid_category_is_malformed(category: str, reason: str) -> None:
    with pytest.raises(BridgeMalformedError) as caught:
        await _call_canned(_response(category, _policy("ENTRIES_WRITE")))
    assert caught.value.reason == reason


async def test_categories_g_and_h_are_accepted() -> None:
    result = await _call_canned(_response("H", _policy("ENTRIES_WRITE")))
    assert result.snapshot.category == "H"


async def test_a_response_without_response_time_is_malformed() -> None:
    response = _response("A", _policy("ENTRIES_WRITE"))
    response.ClearField("response_time")
    with pytest.raises(BridgeMalformedError) as caught:
        await _call_canned(response)
    assert caught.value.reason == "missing_field"


async def test_a_read_answer_without_its_policy_is_malformed() -> None:
    with pytest.raises(BridgeMalformedError) as caught:
        await _call_canned(_response("A"), single=True)
    assert caught.value.reason == "missing_field"


# --- TLS and mTLS with certificates made in the test


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def _tls_server(pki: Pki, *, mutual: bool) -> SimulatorServer:
    server = SimulatorServer(
        tls_cert_file=pki.server_cert,
        tls_key_file=pki.server_key,
        tls_client_ca_file=pki.ca if mutual else None,
    )
    await server.start()
    return server


async def test_tls_with_a_ca_and_a_server_name_override(pki: Pki) -> None:
    server = await _tls_server(pki, mutual=False)
    bridge = BridgeClient(server.address, ca_file=pki.ca, server_name=SERVER_NAME, timeout=5.0)
    try:
        result = await bridge.list_policies()
    finally:
        await bridge.close()
        await server.stop()
    assert len(result.snapshot.policies) == 30


async def test_mtls_with_a_client_certificate_works(pki: Pki) -> None:
    server = await _tls_server(pki, mutual=True)
    bridge = BridgeClient(
        server.address,
        ca_file=pki.ca,
        cert_file=pki.client_cert,
        key_file=pki.client_key,
        server_name=SERVER_NAME,
        timeout=5.0,
    )
    try:
        result = await bridge.list_policies()
    finally:
        await bridge.close()
        await server.stop()
    assert len(result.snapshot.policies) == 30
    assert server.list_calls == 1


async def test_mtls_refuses_a_client_without_a_certificate(pki: Pki) -> None:
    server = await _tls_server(pki, mutual=True)
    attempts: list[str] = []
    bridge = BridgeClient(
        server.address, ca_file=pki.ca, server_name=SERVER_NAME, timeout=2.0, on_attempt=attempts.append
    )
    try:
        with pytest.raises(BridgeError) as caught:
            await bridge.list_policies(deadline=time.monotonic() + 3.0)
    finally:
        await bridge.close()
        await server.stop()
    assert caught.value.code == "UNAVAILABLE"
    assert "TLS handshake failed" in str(caught.value)
    assert server.list_calls == 0  # refused before any call reached the service


async def test_plaintext_client_to_a_tls_server_fails(pki: Pki) -> None:
    server = await _tls_server(pki, mutual=False)
    bridge = BridgeClient(server.address, timeout=1.0)
    try:
        with pytest.raises(BridgeTransientError) as caught:
            await bridge.list_policies()
    finally:
        await bridge.close()
        await server.stop()
    assert caught.value.code == "UNAVAILABLE"
    assert server.list_calls == 0
