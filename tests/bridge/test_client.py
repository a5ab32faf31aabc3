"""The Bridge client over real gRPC on loopback: against the simulator, and against tiny servicers that
answer exactly the malformed responses a broken Bridge could send."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from exporter.bridge.budget import CallBudget
from exporter.bridge.client import (
    MAX_ATTEMPTS,
    RETRY_AFTER_KEY,
    BridgeBudgetError,
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
from exporter.config import ExporterSettings
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
    # The simulator lists 200, 404 and 429 from the start; the one list call so far is a 200 of POLICIES_LIST.
    assert write.response_counts == ((200, 0), (404, 0), (429, 0))
    listing = snapshot.policy(dp.POLICIES_LIST)
    assert listing is not None
    assert listing.count_of(200) == 1


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
    simulator.engine.inject_errors("UNAVAILABLE", 100)
    with pytest.raises(BridgeTransientError) as caught:
        await client.list_policies()
    assert (caught.value.code, caught.value.transient) == ("UNAVAILABLE", True)
    assert attempts == ["UNAVAILABLE"] * MAX_ATTEMPTS


async def test_resource_exhausted_is_never_retried(
    client: BridgeClient, simulator: SimulatorServer, attempts: list[str]
) -> None:
    # DICT's 429: POLICIES_LIST is empty. A retry would be one more call keeping it empty.
    simulator.engine.inject_errors("RESOURCE_EXHAUSTED", 100)
    with pytest.raises(BridgeTransientError) as caught:
        await client.list_policies(deadline=time.monotonic() + 10)
    assert (caught.value.code, caught.value.transient) == ("RESOURCE_EXHAUSTED", True)
    assert attempts == ["RESOURCE_EXHAUSTED"]
    assert simulator.list_calls == 1


async def test_the_call_budget_counts_retries_and_refuses_calls_beyond_it(
    simulator: SimulatorServer, attempts: list[str]
) -> None:
    budget = CallBudget(2)
    bridge = BridgeClient(simulator.address, timeout=2.0, on_attempt=attempts.append, budget=budget)
    simulator.engine.inject_errors("UNAVAILABLE", 100)
    try:
        with pytest.raises(BridgeTransientError):
            await bridge.list_policies(deadline=time.monotonic() + 10)
        assert attempts == ["UNAVAILABLE", "UNAVAILABLE"]  # the retry spent the second call, no third
        with pytest.raises(BridgeBudgetError) as caught:
            await bridge.list_policies(deadline=time.monotonic() + 10)
    finally:
        await bridge.close()
    assert caught.value.code == "BUDGET_EXHAUSTED"
    assert simulator.list_calls == 2
    assert 55 < budget.wait_seconds() <= 60


def test_call_budget_is_a_sliding_window_of_sixty_seconds() -> None:
    now = [1000.0]
    budget = CallBudget(2, clock=lambda: now[0])
    assert budget.acquire()
    now[0] = 1030.0
    assert budget.acquire()
    assert not budget.acquire()
    assert budget.wait_seconds() == 30.0
    now[0] = 1059.9
    assert not budget.acquire()
    now[0] = 1060.0
    assert budget.acquire()  # the first call left the window, the second did not
    assert not budget.acquire()
    assert budget.calls_in_window() == 2
    assert budget.wait_seconds() == 30.0


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
    settings = ExporterSettings(
        bridge_address="bridge:443",
        bridge_tls_ca_file=pki.ca,
        bridge_tls_server_name=SERVER_NAME,
        bridge_timeout_seconds=1.5,
    )
    bridge = BridgeClient.from_settings(settings)
    assert (bridge.address, bridge.timeout, bridge.tls) == ("bridge:443", 1.5, True)
    assert BridgeClient.from_settings(ExporterSettings()).tls is False


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


def _count(code: int, count: int) -> pb.ResponseCount:
    return pb.ResponseCount(code=code, count=count)


def _policy(name: str, **fields: Any) -> pb.RateLimitPolicy:
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
        _policy("EVENT_LIST", response_counts=[pb.ResponseCount(code=200, count=0)]),
    )
    result = await _call_canned(response)
    assert [p.name for p in result.snapshot.policies] == ["GOOD", "EVENT_LIST"]
    good, event_list = result.snapshot.policies
    assert good.available_tokens == -15  # negative balances are DICT's truth, never clamped
    assert good.response_counts is None
    assert event_list.response_counts == ((200, 0),)  # present and zero is not absent
    assert result.rejected == (
        Rejection("ZERO_CAPACITY", "capacity_not_positive"),
        Rejection("ZERO_PERIOD", "refill_period_not_positive"),
        Rejection("NEGATIVE_REFILL", "refill_tokens_negative"),
        Rejection("", "missing_field"),
        Rejection("GOOD", "duplicate_name"),
    )


@pytest.mark.parametrize("category", ["Z", "", "AB", "é", " "])
async def test_an_unusable_category_keeps_every_policy_and_is_counted(category: str) -> None:
    # The poller keeps the previous snapshot's letter (or fails the poll when there is none).
    result = await _call_canned(_response(category, _policy("ENTRIES_WRITE"), _policy("KEYS_CHECK")))
    assert result.snapshot.category == ""
    assert [p.name for p in result.snapshot.policies] == ["ENTRIES_WRITE", "KEYS_CHECK"]
    assert result.rejected == (Rejection("", "unknown_category"),)


async def test_a_lower_case_category_is_normalized_and_counted() -> None:
    result = await _call_canned(_response(" g", _policy("ENTRIES_WRITE")))
    assert result.snapshot.category == "G"
    assert result.rejected == (Rejection("", "category_normalized"),)


async def test_values_postgresql_or_prometheus_cannot_hold_are_rejected_field_by_field() -> None:
    response = _response(
        "A",
        _policy("NUL\x00NAME"),
        _policy("NEWLINE\nNAME"),
        _policy("N" * 129),
        _policy("HUGE_PERIOD", refill_period_sec=2**31),
        _policy("HUGE_CAPACITY", capacity=2**53, available_tokens=2**53),
        _policy("HUGE_DEBT", available_tokens=-(2**62)),
        _policy("CODE_99", response_counts=[_count(200, 5), _count(99, 1)]),
        _policy("CODE_600", response_counts=[_count(600, 1)]),
        _policy("TWO_404", response_counts=[_count(404, 1), _count(200, 3), _count(404, 2)]),
        _policy("HUGE_COUNT", response_counts=[_count(200, 2**53)]),
        _policy("GOOD_COUNTS", response_counts=[_count(429, 2), _count(200, 2**53 - 1), _count(100, 0)]),
        _policy("NAN_404", error_404_rate=float("nan")),  # the deprecated ratio is not read at all
        _policy("N" * 128, refill_period_sec=366 * 86400),
    )
    response.correlation_id = "abc\x00def\n" + "0" * 80
    result = await _call_canned(response)
    kept = {p.name: p for p in result.snapshot.policies}
    bad_counts = ["CODE_99", "CODE_600", "TWO_404", "HUGE_COUNT"]
    assert list(kept) == [*bad_counts, "GOOD_COUNTS", "NAN_404", "N" * 128]
    assert [kept[n].response_counts for n in bad_counts] == [None] * 4  # the policies stay, their counts go
    assert kept["GOOD_COUNTS"].response_counts == ((100, 0), (200, 2**53 - 1), (429, 2))  # sorted by code
    assert kept["NAN_404"].response_counts is None
    assert result.snapshot.correlation_id == ("abcdef" + "0" * 80)[:64]
    assert result.rejected == (
        Rejection("", "invalid_correlation_id"),
        Rejection("NUL\x00NAME", "invalid_name"),
        Rejection("NEWLINE\nNAME", "invalid_name"),
        Rejection("N" * 129, "invalid_name"),
        Rejection("HUGE_PERIOD", "value_out_of_range"),
        Rejection("HUGE_CAPACITY", "value_out_of_range"),
        Rejection("HUGE_DEBT", "value_out_of_range"),
        Rejection("CODE_99", "invalid_response_code"),
        Rejection("CODE_600", "invalid_response_code"),
        Rejection("TWO_404", "duplicate_response_code"),
        Rejection("HUGE_COUNT", "response_count_out_of_range"),
    )


async def test_a_response_time_beyond_the_datetime_range_is_unusable() -> None:
    response = _response("A", _policy("ENTRIES_WRITE"))
    response.response_time.seconds = 253402300800 + 86400  # after 9999-12-31
    with pytest.raises(BridgeMalformedError) as caught:
        await _call_canned(response)
    assert caught.value.reason == "implausible_response_time"


class _Refusing(pb_grpc.RateLimitServiceServicer):
    """Fails every list call with ``code``, passing ``retry_after`` as trailing metadata when given."""

    def __init__(self, code: grpc.StatusCode, retry_after: str | None) -> None:
        self.code, self.retry_after = code, retry_after
        self.calls: list[float] = []

    async def GetRateLimitPolicies(self, request: object, context: grpc.aio.ServicerContext) -> None:  # type: ignore[type-arg]
        self.calls.append(time.monotonic())
        metadata = ((RETRY_AFTER_KEY, self.retry_after),) if self.retry_after is not None else ()
        await context.abort(self.code, "DICT answered 503 (maintenance)", trailing_metadata=metadata)


async def _refused(servicer: pb_grpc.RateLimitServiceServicer, deadline: float) -> BridgeError:
    server = grpc.aio.server()
    pb_grpc.add_RateLimitServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    bridge = BridgeClient(f"127.0.0.1:{port}", timeout=2.0)
    try:
        with pytest.raises(BridgeError) as caught:
            await bridge.list_policies(deadline=time.monotonic() + deadline)
        return caught.value
    finally:
        await bridge.close()
        await server.stop(None)


async def test_retry_after_is_honoured_between_attempts() -> None:
    servicer = _Refusing(grpc.StatusCode.UNAVAILABLE, "0.6")
    error = await _refused(servicer, deadline=1.0)
    assert error.retry_after == 0.6
    # 0.6 s between attempts (the backoff alone would be 0.1-0.2 s), so only two fit in 1 s.
    assert len(servicer.calls) == 2
    assert servicer.calls[1] - servicer.calls[0] >= 0.6


async def test_a_retry_after_beyond_the_deadline_means_no_retry_and_is_passed_on() -> None:
    servicer = _Refusing(grpc.StatusCode.UNAVAILABLE, "120")
    error = await _refused(servicer, deadline=5.0)
    assert (error.code, error.retry_after) == ("UNAVAILABLE", 120.0)
    assert len(servicer.calls) == 1


async def test_a_malformed_retry_after_is_ignored() -> None:
    error = await _refused(_Refusing(grpc.StatusCode.RESOURCE_EXHAUSTED, "Wed, 21 Oct"), deadline=2.0)
    assert (error.code, error.retry_after) == ("RESOURCE_EXHAUSTED", None)


async def test_an_answer_above_the_grpc_message_limit_is_not_retried() -> None:
    # 4 MB is gRPC's default receive limit; this answer is about 5 MB and would be again next time.
    big = [_policy(f"POLICY_{i:06d}_" + "X" * 60) for i in range(60_000)]
    calls: list[int] = []

    class _Big(_Canned):
        async def GetRateLimitPolicies(
            self, request: object, context: object
        ) -> pb.GetRateLimitPoliciesResponse:
            calls.append(1)
            return self.build()

    response = _response("A", *big)
    server = grpc.aio.server()
    pb_grpc.add_RateLimitServiceServicer_to_server(_Big(lambda: response), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    bridge = BridgeClient(f"127.0.0.1:{port}", timeout=5.0)
    try:
        with pytest.raises(BridgeError) as caught:
            await bridge.list_policies(deadline=time.monotonic() + 10)
    finally:
        await bridge.close()
        await server.stop(None)
    assert caught.value.code == "MESSAGE_TOO_LARGE"
    assert caught.value.transient is False
    assert calls == [1]


def test_plaintext_to_a_non_loopback_address_warns(caplog: pytest.LogCaptureFixture) -> None:
    BridgeClient("127.0.0.1:50051")
    BridgeClient("localhost:50051")
    BridgeClient("[::1]:50051")
    assert "plaintext" not in caplog.text
    BridgeClient("10.20.30.40:50051", tls=True)
    assert "plaintext" not in caplog.text
    BridgeClient("bridge.internal:50051")
    assert "plaintext gRPC" in caplog.text
    assert "bridge.internal:50051" in caplog.text


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


# --- the participant (ISPB): sent in every request, checked in every answer


class _Echo(pb_grpc.RateLimitServiceServicer):
    """Records the ISPB of each request and answers about ``answer_ispb`` (None: the one asked about)."""

    def __init__(self, answer_ispb: str | None) -> None:
        self.answer_ispb = answer_ispb
        self.asked: list[str] = []

    def _answer(self, asked: str) -> str:
        self.asked.append(asked)
        return asked if self.answer_ispb is None else self.answer_ispb

    async def GetRateLimitPolicies(
        self, request: pb.GetRateLimitPoliciesRequest, context: object
    ) -> pb.GetRateLimitPoliciesResponse:
        response = _response("A", _policy("ENTRIES_WRITE"))
        response.participant_ispb = self._answer(request.participant_ispb)
        return response

    async def GetRateLimitPolicy(
        self, request: pb.GetRateLimitPolicyRequest, context: object
    ) -> pb.GetRateLimitPolicyResponse:
        listed = _response("A")
        return pb.GetRateLimitPolicyResponse(
            response_time=listed.response_time,
            correlation_id="c" * 32,
            category="A",
            policy=_policy(request.policy_name),
            participant_ispb=self._answer(request.participant_ispb),
        )


async def _ask(servicer: _Echo, asked: str | None, *, single: bool = False) -> BridgeResult:
    server = grpc.aio.server()
    pb_grpc.add_RateLimitServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    bridge = BridgeClient(f"127.0.0.1:{port}", timeout=2.0, participant_ispb=asked)
    try:
        return await (bridge.get_policy("ENTRIES_WRITE") if single else bridge.list_policies())
    finally:
        await bridge.close()
        await server.stop(None)


@pytest.mark.parametrize("single", [False, True])
async def test_the_configured_ispb_is_sent_and_an_answer_naming_it_is_accepted(single: bool) -> None:
    servicer = _Echo(None)
    result = await _ask(servicer, "12345678", single=single)
    assert servicer.asked == ["12345678"]
    assert result.snapshot.participant_ispb == "12345678"


@pytest.mark.parametrize("single", [False, True])
async def test_an_answer_about_another_participant_is_refused_whole(single: bool) -> None:
    with pytest.raises(BridgeMalformedError) as caught:
        await _ask(_Echo("87654321"), "12345678", single=single)
    assert caught.value.reason == "participant_mismatch"
    assert "87654321" in str(caught.value)
    assert "12345678" in str(caught.value)


async def test_an_old_bridge_that_names_no_participant_is_accepted_for_the_one_asked() -> None:
    result = await _ask(_Echo(""), "12345678")
    assert result.snapshot.participant_ispb == "12345678"


async def test_without_a_configured_ispb_the_bridge_is_asked_for_its_own_and_its_answer_kept() -> None:
    servicer = _Echo("00000000")
    result = await _ask(servicer, None)
    assert servicer.asked == [""]  # empty: the Bridge's own participant
    assert result.snapshot.participant_ispb == "00000000"
    garbled = await _ask(_Echo("not-an-ispb"), None)
    assert garbled.snapshot.participant_ispb == ""  # nothing to check it against: not kept either


def test_the_ispb_comes_from_settings() -> None:
    settings = ExporterSettings(participant_ispb="00038166")
    assert BridgeClient.from_settings(settings).participant_ispb == "00038166"
