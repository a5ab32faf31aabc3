"""The Bridge gRPC client: TLS/mTLS channels, budgeted retries of transient errors, response validation.

Validation is field by field at the edge: a value the rest of the pipeline (Prometheus, JSON, PostgreSQL)
cannot hold is rejected or cleaned here with a counted reason, and a bad field never costs other fields or
other policies their place in the snapshot.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio

from exporter.backoff import Backoff
from exporter.bridge.budget import CallBudget
from exporter.bridge.proto import rate_limit_pb2 as pb
from exporter.bridge.proto import rate_limit_pb2_grpc as pb_grpc
from exporter.config import BridgeKeys
from exporter.snapshot import (
    CATEGORIES,
    MAX_HTTP_STATUS,
    MIN_HTTP_STATUS,
    PolicyReading,
    ResponseCounts,
    Snapshot,
)

log = logging.getLogger(__name__)

#: Failures a later poll may not see. Only UNAVAILABLE and DEADLINE_EXCEEDED are retried within a poll:
#: RESOURCE_EXHAUSTED is DICT's 429 (POLICIES_LIST is empty), and retrying it only keeps it empty.
TRANSIENT_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"})
RETRIED_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})
#: Trailing metadata key through which the Bridge passes DICT's Retry-After (seconds, decimal).
RETRY_AFTER_KEY = "retry-after"
#: A Retry-After above this is read as this: a broken header must not silence the exporter for days.
MAX_RETRY_AFTER_SECONDS = 3600.0
CONFIG_CODES = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED", "INVALID_ARGUMENT"})
#: Backoff between transient failures (exporter.backoff): doubles from BACKOFF_BASE up to BACKOFF_MAX,
#: 50-100% of it slept, so a fleet of exporters does not retry in lock-step.
BACKOFF_BASE = 0.2
BACKOFF_MAX = 5.0
#: Without a deadline from the caller, a call makes at most this many attempts.
MAX_ATTEMPTS = 3
#: An attempt with less time than this left before the deadline could not succeed: it is not made.
MIN_ATTEMPT_SECONDS = 0.05
_HANDSHAKE_HINTS = ("handshake", "ssl", "tls", "certificate", "socket closed")
#: gRPC's own words when an answer exceeds the receive limit (it reports RESOURCE_EXHAUSTED locally).
_TOO_LARGE_HINTS = ("larger than max", "message too large", "exceeds maximum")
#: Token counts above 2^53 - 1 lose integer precision as the float64 Prometheus and JSON carry.
MAX_TOKENS = 2**53 - 1
#: A refill period longer than a (leap) year is no rate limit; also keeps it far inside a 32-bit column.
MAX_REFILL_PERIOD_SECONDS = 366 * 86400
#: Policy names: at most this long, and no control characters (NUL cannot be stored in PostgreSQL text,
#: newlines forge log lines); anything else, including names never seen before, is exported as it is.
MAX_NAME_LENGTH = 128
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: What a correlation id may keep (DICT sends 32 hex characters); other characters are removed.
_CORRELATION_DISALLOWED = re.compile(r"[^0-9A-Za-z_.:-]")
MAX_CORRELATION_ID_LENGTH = 64
_ISPB = re.compile(r"[0-9]{8}")

Response = TypeVar("Response")


class BridgeError(Exception):
    """A Bridge call failed. ``code`` is the gRPC status name; ``transient`` says a later poll may succeed."""

    def __init__(
        self, message: str, *, code: str, transient: bool = False, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.transient = transient
        #: Seconds the Bridge (DICT's Retry-After) asked to wait before the next call; None if it did not.
        self.retry_after = retry_after


class BridgeTransientError(BridgeError):
    """UNAVAILABLE, DEADLINE_EXCEEDED or RESOURCE_EXHAUSTED, still failing when the retries ran out."""

    def __init__(self, message: str, *, code: str, retry_after: float | None = None) -> None:
        super().__init__(message, code=code, transient=True, retry_after=retry_after)


class BridgeBudgetError(BridgeError):
    """No call was made: the ceiling of list calls per minute is spent (retries included)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="BUDGET_EXHAUSTED", transient=True)


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
    checks = (
        (not policy.name, "missing_field"),
        (len(policy.name) > MAX_NAME_LENGTH or bool(_CONTROL.search(policy.name)), "invalid_name"),
        (policy.capacity <= 0, "capacity_not_positive"),
        (policy.refill_period_sec <= 0, "refill_period_not_positive"),
        (policy.refill_tokens < 0, "refill_tokens_negative"),
        (
            max(policy.capacity, policy.refill_tokens, abs(policy.available_tokens)) > MAX_TOKENS
            or policy.refill_period_sec > MAX_REFILL_PERIOD_SECONDS,
            "value_out_of_range",
        ),
    )
    return next((reason for failed, reason in checks if failed), None)


def _response_counts(policy: pb.RateLimitPolicy) -> tuple[ResponseCounts | None, str | None]:
    """The policy's cumulative answer counts, sorted by status, or None with the reason they were dropped.

    All or nothing: a status outside 100..599, a status listed twice or a count beyond 2^53 make the whole
    set untrustworthy (which of two counts of 404 is the real one?), so the policy keeps its bucket values
    and exports no count and no 404 share this poll.
    """
    counts = policy.response_counts
    if not counts:
        return None, None  # a Bridge that does not count (or predates the field)
    if any(not MIN_HTTP_STATUS <= entry.code <= MAX_HTTP_STATUS for entry in counts):
        return None, "invalid_response_code"
    if len({entry.code for entry in counts}) != len(counts):
        return None, "duplicate_response_code"
    if any(entry.count > MAX_TOKENS for entry in counts):
        return None, "response_count_out_of_range"
    return tuple(sorted((entry.code, entry.count) for entry in counts)), None


def _participant(answered: str, asked: str | None) -> str:
    """The ISPB the answer is about; BridgeMalformedError when it names another participant than asked.

    An empty answer ISPB comes from a Bridge that predates the field: it answered for the participant it
    was asked about (or its own). Never mixing participants matters more than one poll: the answer is
    refused whole, its buckets never reach the series of the participant this exporter watches.
    """
    if asked and answered and answered != asked:
        shown = _CONTROL.sub("?", answered[:16])
        raise BridgeMalformedError(
            f"the Bridge answered about participant {shown!r}, not {asked!r} as asked",
            reason="participant_mismatch",
        )
    return asked or (answered if _ISPB.fullmatch(answered) else "")


def _category(raw: str) -> tuple[str, str | None]:
    """The category letter and the reason it had to be cleaned ("" when unusable: the poller decides)."""
    cleaned = raw.strip().upper()
    if len(cleaned) == 1 and cleaned in CATEGORIES:
        return cleaned, None if cleaned == raw else "category_normalized"
    return "", "unknown_category"


def _correlation_id(raw: str) -> tuple[str, str | None]:
    cleaned = _CORRELATION_DISALLOWED.sub("", raw)[:MAX_CORRELATION_ID_LENGTH]
    return cleaned, None if cleaned == raw else "invalid_correlation_id"


def _response_time(response: pb.GetRateLimitPoliciesResponse | pb.GetRateLimitPolicyResponse) -> Any:
    if not response.HasField("response_time"):
        raise BridgeMalformedError("Bridge response has no response_time", reason="missing_field")
    try:
        return response.response_time.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise BridgeMalformedError(
            "Bridge response_time is outside the range of dates", reason="implausible_response_time"
        ) from None


def _to_snapshot(
    response: pb.GetRateLimitPoliciesResponse | pb.GetRateLimitPolicyResponse,
    policies: Iterable[pb.RateLimitPolicy],
    asked_ispb: str | None = None,
) -> BridgeResult:
    """The usable part of an answer and every reason something was left out or cleaned.

    An unusable category leaves ``snapshot.category`` empty (the poller keeps the previous one or fails
    the poll): the policies themselves are still good. The deprecated ``error_404_rate`` ratio is not
    read: the exporter computes the 404 share from ``response_counts``.
    """
    participant = _participant(response.participant_ispb, asked_ispb)
    response_time = _response_time(response)
    rejected: list[Rejection] = []
    category, reason = _category(response.category)
    if reason is not None:
        rejected.append(Rejection("", reason))
        log.warning("Bridge category %s", reason, extra={"ctx": {"category": repr(response.category[:8])}})
    correlation_id, reason = _correlation_id(response.correlation_id)
    if reason is not None:
        rejected.append(Rejection("", reason))
        log.warning("Bridge correlation_id cleaned", extra={"ctx": {"correlation_id": correlation_id}})
    readings: list[PolicyReading] = []
    seen: set[str] = set()
    for policy in policies:
        reason = _policy_rejection(policy)
        if reason is None and policy.name in seen:
            reason = "duplicate_name"  # the first one wins; later ones cannot be told apart in metrics
        if reason is not None:
            rejected.append(Rejection(policy.name, reason))
            log.warning(
                "Bridge policy rejected",
                extra={"ctx": {"policy": _CONTROL.sub("?", policy.name[:64]), "reason": reason}},
            )
            continue
        seen.add(policy.name)
        counts, reason = _response_counts(policy)
        if reason is not None:
            rejected.append(Rejection(policy.name, reason))
            log.warning("Bridge field rejected", extra={"ctx": {"policy": policy.name, "reason": reason}})
        readings.append(
            PolicyReading(
                name=policy.name,
                available_tokens=policy.available_tokens,
                capacity=policy.capacity,
                refill_tokens=policy.refill_tokens,
                refill_period_sec=policy.refill_period_sec,
                response_counts=counts,
            )
        )
    snapshot = Snapshot(
        response_time=response_time,
        correlation_id=correlation_id,
        category=category,
        policies=tuple(readings),
        participant_ispb=participant,
    )
    return BridgeResult(snapshot=snapshot, rejected=tuple(rejected))


def is_loopback(address: str) -> bool:
    """True when HOST:PORT names this machine (localhost, 127/8, ::1, a Unix socket)."""
    if address.startswith("unix:"):
        return True
    host = address.rpartition(":")[0].strip("[]") or address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
        budget: CallBudget | None = None,
        participant_ispb: str | None = None,
    ) -> None:
        self.address = address
        #: Sent in every request (the Bridge's PI-RequestingParticipant); answers about another are refused.
        self.participant_ispb = participant_ispb
        self.tls = tls or bool(ca_file or cert_file)
        # Read at construction so a missing or unreadable file fails at start-up, not at the first poll.
        self._ca = _read(ca_file)
        self._cert = _read(cert_file)
        self._key = _read(key_file)
        self._server_name = server_name
        self.timeout = timeout
        self._on_attempt = on_attempt
        #: Ceiling of list calls per minute, retries included; None for tools that call by hand.
        self.budget = budget
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None
        self._rng = random.Random()  # noqa: S311 - jitter, not secrecy
        if not self.tls and not is_loopback(address):
            log.warning(
                "the Bridge at %s is called over plaintext gRPC: set BRIDGE_TLS (and a client certificate "
                "for mTLS) for any address other than loopback",
                address,
                extra={"ctx": {"bridge": address}},
            )

    @classmethod
    def from_settings(
        cls,
        settings: BridgeKeys,
        on_attempt: Callable[[str], None] | None = None,
        budget: CallBudget | None = None,
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
            budget=budget,
            participant_ispb=settings.participant_ispb,
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
        request = pb.GetRateLimitPoliciesRequest(participant_ispb=self.participant_ispb or "")
        response: pb.GetRateLimitPoliciesResponse = await self._call(
            lambda timeout: stub.GetRateLimitPolicies(request, timeout=timeout),
            deadline,
            self.budget,
        )
        return _to_snapshot(response, response.policies, self.participant_ispb)

    async def get_policy(self, name: str, *, deadline: float | None = None) -> BridgeResult:
        """One policy (GetRateLimitPolicy): a snapshot holding that policy, or none if it was rejected."""
        stub = self._stub_or_open()
        response: pb.GetRateLimitPolicyResponse = await self._call(
            lambda timeout: stub.GetRateLimitPolicy(
                pb.GetRateLimitPolicyRequest(policy_name=name, participant_ispb=self.participant_ispb or ""),
                timeout=timeout,
            ),
            deadline,
            None,
        )
        if not response.HasField("policy"):
            raise BridgeMalformedError("Bridge answered without the policy", reason="missing_field")
        return _to_snapshot(response, [response.policy], self.participant_ispb)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(grace=None)
        self._channel = None
        self._stub = None

    async def _call(
        self,
        attempt: Callable[[float], Awaitable[Response]],
        deadline: float | None,
        budget: CallBudget | None,
    ) -> Response:
        """Attempts until one succeeds, an error is not retried, the budget is spent, or a retry would
        pass the deadline. Every attempt is one DICT call: each goes through ``budget``."""
        failures = 0
        backoff = Backoff(BACKOFF_BASE, BACKOFF_MAX, rng=self._rng)
        while True:
            timeout = self.timeout
            if deadline is not None:
                timeout = min(timeout, deadline - time.monotonic())
                if timeout < MIN_ATTEMPT_SECONDS:
                    raise BridgeTransientError(
                        f"no time left before the deadline to call the Bridge at {self.address}",
                        code="DEADLINE_EXCEEDED",
                    )
            if budget is not None and not budget.acquire():
                raise BridgeBudgetError(
                    f"the ceiling of {budget.limit} Bridge list calls per minute is spent (retries count)"
                )
            try:
                response = await attempt(timeout)
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
                self._report(code)
                error = self._classify(code, exc.details() or "", _retry_after(exc))
                failures += 1
                delay = max(backoff.next(), error.retry_after or 0.0)
                if error.code not in RETRIED_CODES or not self._may_retry(failures, delay, deadline, budget):
                    raise error from None
                log.info(
                    "Bridge call failed, retrying",
                    extra={"ctx": {"code": code, "attempt": failures, "retry_in_s": round(delay, 3)}},
                )
                await asyncio.sleep(delay)
                continue
            self._report("OK")
            return response

    def _may_retry(
        self, failures: int, delay: float, deadline: float | None, budget: CallBudget | None
    ) -> bool:
        if budget is not None and budget.wait_seconds() > delay:
            return False  # a retry now would spend a call the budget does not have
        if deadline is None:
            return failures < MAX_ATTEMPTS
        return time.monotonic() + delay + MIN_ATTEMPT_SECONDS < deadline

    def _report(self, code: str) -> None:
        if self._on_attempt is not None:
            self._on_attempt(code)

    def _classify(self, code: str, details: str, retry_after: float | None = None) -> BridgeError:
        lowered = details.lower()
        if code == "RESOURCE_EXHAUSTED" and any(word in lowered for word in _TOO_LARGE_HINTS):
            # The answer is bigger than gRPC accepts: it will be again; retrying only spends tokens.
            return BridgeError(
                f"the Bridge's answer exceeds the gRPC receive limit ({details}); not retried",
                code="MESSAGE_TOO_LARGE",
            )
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
            return BridgeTransientError(message, code=code, retry_after=retry_after)
        if code in CONFIG_CODES:
            return BridgeConfigError(
                f"{message} (a configuration problem: check credentials and address; not retried)", code=code
            )
        return BridgeError(message, code=code, retry_after=retry_after)


def _retry_after(exc: grpc.aio.AioRpcError) -> float | None:
    """DICT's Retry-After as the Bridge passes it: trailing metadata ``retry-after`` in seconds."""
    metadata: Any = exc.trailing_metadata() or ()
    for key, value in tuple(metadata):
        if str(key).lower() != RETRY_AFTER_KEY:
            continue
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
        try:
            seconds = float(text.strip())
        except ValueError:
            log.warning(
                "ignored a malformed retry-after from the Bridge", extra={"ctx": {"value": text[:32]}}
            )
            return None
        if not math.isfinite(seconds) or seconds < 0:
            return None
        return min(seconds, MAX_RETRY_AFTER_SECONDS)
    return None
