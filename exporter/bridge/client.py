"""The Bridge gRPC client: TLS/mTLS channels, bounded retries of transient errors, response validation."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio

from exporter.bridge.proto import rate_limit_pb2 as pb
from exporter.bridge.proto import rate_limit_pb2_grpc as pb_grpc
from exporter.config import Settings
from exporter.snapshot import CATEGORIES, PolicyReading, Snapshot

log = logging.getLogger(__name__)

TRANSIENT_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"})
CONFIG_CODES = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED", "INVALID_ARGUMENT"})
#: Backoff between transient failures: full delay doubles from BACKOFF_BASE up to BACKOFF_MAX, then
#: a random share of 50-100% of it is slept, so a fleet of exporters does not retry in lock-step.
BACKOFF_BASE = 0.2
BACKOFF_MAX = 5.0
#: Without a deadline from the caller, a call makes at most this many attempts.
MAX_ATTEMPTS = 3
#: An attempt with less time than this left before the deadline could not succeed: it is not made.
MIN_ATTEMPT_SECONDS = 0.05
_HANDSHAKE_HINTS = ("handshake", "ssl", "tls", "certificate", "socket closed")

Response = TypeVar("Response")


class BridgeError(Exception):
    """A Bridge call failed. ``code`` is the gRPC status name; ``transient`` says a later poll may succeed."""

    def __init__(self, message: str, *, code: str, transient: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.transient = transient


class BridgeTransientError(BridgeError):
    """UNAVAILABLE, DEADLINE_EXCEEDED or RESOURCE_EXHAUSTED, still failing when the retries ran out."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message, code=code, transient=True)


class BridgeConfigError(BridgeError):
    """UNAUTHENTICATED, PERMISSION_DENIED or INVALID_ARGUMENT: a configuration problem, never retried."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message, code=code, transient=False)


class BridgeMalformedError(BridgeError):
    """The whole response is unusable (no response_time, no valid category). ``reason`` is the counted one."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message, code="OK", transient=False)
        self.reason = reason


@dataclass(frozen=True)
class Rejection:
    """One policy left out of a snapshot, and why (one of the ``invalid_policies_total`` reasons)."""

    policy: str
    reason: str


@dataclass(frozen=True)
class BridgeResult:
    snapshot: Snapshot
    rejected: tuple[Rejection, ...]


def _policy_rejection(policy: pb.RateLimitPolicy) -> str | None:
    """The reason a policy is unusable, or None. proto3 scalars have no presence: "missing" means empty."""
    if not policy.name:
        return "missing_field"
    if policy.capacity <= 0:
        return "capacity_not_positive"
    if policy.refill_period_sec <= 0:
        return "refill_period_not_positive"
    if policy.refill_tokens < 0:
        return "refill_tokens_negative"
    return None


def _to_snapshot(
    response: pb.GetRateLimitPoliciesResponse | pb.GetRateLimitPolicyResponse,
    policies: Iterable[pb.RateLimitPolicy],
) -> BridgeResult:
    if not response.HasField("response_time"):
        raise BridgeMalformedError("Bridge response has no response_time", reason="missing_field")
    category = response.category
    if len(category) != 1 or category not in CATEGORIES:
        # The category labels every series: a snapshot without a valid one cannot be exported at all.
        raise BridgeMalformedError(
            f"Bridge response has category {category[:8]!r}, not one letter A-H", reason="unknown_category"
        )
    readings: list[PolicyReading] = []
    rejected: list[Rejection] = []
    seen: set[str] = set()
    for policy in policies:
        reason = _policy_rejection(policy)
        if reason is None and policy.name in seen:
            reason = "duplicate_name"  # the first one wins; later ones cannot be told apart in metrics
        if reason is not None:
            rejected.append(Rejection(policy.name, reason))
            log.warning(
                "Bridge policy rejected", extra={"ctx": {"policy": policy.name[:64], "reason": reason}}
            )
            continue
        seen.add(policy.name)
        readings.append(
            PolicyReading(
                name=policy.name,
                available_tokens=policy.available_tokens,
                capacity=policy.capacity,
                refill_tokens=policy.refill_tokens,
                refill_period_sec=policy.refill_period_sec,
                error_404_rate=policy.error_404_rate if policy.HasField("error_404_rate") else None,
            )
        )
    snapshot = Snapshot(
        response_time=response.response_time.ToDatetime(tzinfo=UTC),
        correlation_id=response.correlation_id,
        category=category,
        policies=tuple(readings),
    )
    return BridgeResult(snapshot=snapshot, rejected=tuple(rejected))


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


class BridgeClient:
    """Calls the Bridge's RateLimitService. One channel, opened on first use inside the running loop."""

    def __init__(
        self,
        address: str,
        *,
        tls: bool = False,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        server_name: str | None = None,
        timeout: float = 5.0,
        on_attempt: Callable[[str], None] | None = None,
    ) -> None:
        self.address = address
        self.tls = tls or bool(ca_file or cert_file)
        # Read at construction so a missing or unreadable file fails at start-up, not at the first poll.
        self._ca = _read(ca_file)
        self._cert = _read(cert_file)
        self._key = _read(key_file)
        self._server_name = server_name
        self.timeout = timeout
        self._on_attempt = on_attempt
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None
        self._rng = random.Random()  # noqa: S311 - jitter, not secrecy

    @classmethod
    def from_settings(
        cls, settings: Settings, on_attempt: Callable[[str], None] | None = None
    ) -> BridgeClient:
        return cls(
            settings.bridge_address,
            tls=settings.bridge_tls,
            ca_file=settings.bridge_tls_ca_file,
            cert_file=settings.bridge_tls_cert_file,
            key_file=settings.bridge_tls_key_file,
            server_name=settings.bridge_tls_server_name,
            timeout=settings.bridge_timeout_seconds,
            on_attempt=on_attempt,
        )

    def _stub_or_open(self) -> Any:
        if self._stub is None:
            if self.tls:
                credentials = grpc.ssl_channel_credentials(
                    root_certificates=self._ca, private_key=self._key, certificate_chain=self._cert
                )
                options = [("grpc.ssl_target_name_override", self._server_name)] if self._server_name else []
                self._channel = grpc.aio.secure_channel(self.address, credentials, options=options)
            else:
                self._channel = grpc.aio.insecure_channel(self.address)
            self._stub = pb_grpc.RateLimitServiceStub(self._channel)  # type: ignore[no-untyped-call]
        return self._stub

    async def list_policies(self, *, deadline: float | None = None) -> BridgeResult:
        """Every policy (GetRateLimitPolicies). ``deadline``: time.monotonic() by which retries must end."""
        stub = self._stub_or_open()
        response: pb.GetRateLimitPoliciesResponse = await self._call(
            lambda timeout: stub.GetRateLimitPolicies(pb.GetRateLimitPoliciesRequest(), timeout=timeout),
            deadline,
        )
        return _to_snapshot(response, response.policies)

    async def get_policy(self, name: str, *, deadline: float | None = None) -> BridgeResult:
        """One policy (GetRateLimitPolicy): a snapshot holding that policy, or none if it was rejected."""
        stub = self._stub_or_open()
        response: pb.GetRateLimitPolicyResponse = await self._call(
            lambda timeout: stub.GetRateLimitPolicy(
                pb.GetRateLimitPolicyRequest(policy_name=name), timeout=timeout
            ),
            deadline,
        )
        if not response.HasField("policy"):
            raise BridgeMalformedError("Bridge answered without the policy", reason="missing_field")
        return _to_snapshot(response, [response.policy])

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(grace=None)
        self._channel = None
        self._stub = None

    async def _call(
        self, attempt: Callable[[float], Awaitable[Response]], deadline: float | None
    ) -> Response:
        """Attempts until one succeeds, an error is not transient, or a retry would pass the deadline."""
        failures = 0
        while True:
            timeout = self.timeout
            if deadline is not None:
                timeout = min(timeout, deadline - time.monotonic())
                if timeout < MIN_ATTEMPT_SECONDS:
                    raise BridgeTransientError(
                        f"no time left before the deadline to call the Bridge at {self.address}",
                        code="DEADLINE_EXCEEDED",
                    )
            try:
                response = await attempt(timeout)
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
                self._report(code)
                error = self._classify(code, exc.details() or "")
                failures += 1
                if not isinstance(error, BridgeTransientError):
                    raise error from None
                delay = self._backoff(failures)
                if not self._may_retry(failures, delay, deadline):
                    raise error from None
                log.info(
                    "Bridge call failed, retrying",
                    extra={"ctx": {"code": code, "attempt": failures, "retry_in_s": round(delay, 3)}},
                )
                await asyncio.sleep(delay)
                continue
            self._report("OK")
            return response

    def _may_retry(self, failures: int, delay: float, deadline: float | None) -> bool:
        if deadline is None:
            return failures < MAX_ATTEMPTS
        return time.monotonic() + delay + MIN_ATTEMPT_SECONDS < deadline

    def _backoff(self, failures: int) -> float:
        full = min(BACKOFF_MAX, BACKOFF_BASE * 2.0 ** (failures - 1))
        jitter: float = self._rng.uniform(0.5, 1.0)
        return full * jitter

    def _report(self, code: str) -> None:
        if self._on_attempt is not None:
            self._on_attempt(code)

    def _classify(self, code: str, details: str) -> BridgeError:
        lowered = details.lower()
        # gRPC reports a refused handshake as UNAVAILABLE, often only as "Socket closed" (TLS 1.3 servers
        # reject a missing client certificate after the client considers the handshake done).
        if code == "UNAVAILABLE" and self.tls and any(word in lowered for word in _HANDSHAKE_HINTS):
            message = (
                f"TLS handshake failed with the Bridge at {self.address} (check the CA, the client "
                f"certificate and key, and the server name): {details}"
            )
        else:
            message = f"Bridge call to {self.address} failed: {code}: {details}"
        if code in TRANSIENT_CODES:
            return BridgeTransientError(message, code=code)
        if code in CONFIG_CODES:
            return BridgeConfigError(
                f"{message} (a configuration problem: check credentials and address; not retried)", code=code
            )
        return BridgeError(message, code=code)
