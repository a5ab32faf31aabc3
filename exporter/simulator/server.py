"""The Bridge simulator: a gRPC RateLimitService over the bucket engine, and the ``simulator`` command."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import time
from datetime import UTC, datetime
from pathlib import Path

import grpc
import grpc.aio

from exporter import runtime
from exporter.bridge.proto import rate_limit_pb2 as pb
from exporter.bridge.proto import rate_limit_pb2_grpc as pb_grpc
from exporter.config import ConfigError, SimulatorSettings
from exporter.simulator import policy_table as dp
from exporter.simulator.clock import Clock
from exporter.simulator.engine import BucketEngine
from exporter.simulator.scenario import Scenario, ScenarioError, resolve_scenario
from exporter.snapshot import PolicyReading

log = logging.getLogger(__name__)


def _policy_message(reading: PolicyReading, engine: BucketEngine, *, legacy: bool) -> pb.RateLimitPolicy:
    message = pb.RateLimitPolicy(
        name=reading.name,
        available_tokens=reading.available_tokens,
        capacity=reading.capacity,
        refill_tokens=reading.refill_tokens,
        refill_period_sec=reading.refill_period_sec,
    )
    # The deprecated ratio is still sent, as Bridges written before response_counts do: the exporter
    # ignores it, and the contract tests prove that.
    rate = engine.error_404_rate(reading.name)
    if rate is not None:
        message.error_404_rate = rate
    if not legacy:
        for code, count in reading.response_counts or ():
            message.response_counts.add(code=code, count=count)
    return message


def _break(response: pb.GetRateLimitPoliciesResponse, kind: str) -> None:
    """Turns a good list answer into the broken answer of ``kind`` (scenario ``fault`` events)."""
    if kind == "empty":
        del response.policies[:]
    elif kind == "zero_capacity":
        for policy in response.policies:
            policy.capacity = 0
    elif kind == "bad_category":
        response.category = "?"
    elif kind == "future_time":
        response.response_time.FromDatetime(datetime(9999, 12, 31, tzinfo=UTC))
    elif kind == "nan_404":
        for policy in response.policies:
            policy.error_404_rate = math.nan
    elif kind == "bad_counts":
        for policy in response.policies:
            policy.response_counts.add(code=404, count=1)
            policy.response_counts.add(code=404, count=2)
    elif kind == "nul_name" and response.policies:
        response.policies[0].name += "\x00"


class _Servicer(pb_grpc.RateLimitServiceServicer):
    """Answers as DICT would: each call spends its own bucket and is refused (429) when it is empty.

    The participant is the request's ISPB (DICT's PI-RequestingParticipant): empty selects the default
    participant, an ISPB the simulator does not serve is refused with PERMISSION_DENIED, as DICT refuses
    a participant the caller may not act for (403).
    """

    def __init__(self, server: SimulatorServer) -> None:
        self._server = server

    async def _engine(
        self, ispb: str, context: grpc.aio.ServicerContext[object, object]
    ) -> tuple[BucketEngine, str]:
        engine = self._server.engine_for(ispb)
        if engine is None:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"participant {ispb[:16]!r} is not served by this simulator (DICT would answer 403)",
            )
            raise AssertionError("abort raises")  # pragma: no cover - keeps the type checker honest
        return engine, self._server.answered_ispb(ispb)

    async def _gate(
        self, engine: BucketEngine, context: grpc.aio.ServicerContext[object, object], bucket: str
    ) -> None:
        latency = engine.latency()
        if latency > 0:
            await asyncio.sleep(latency)
        code = engine.next_error()
        if code is not None:
            await context.abort(grpc.StatusCode[code], f"{code} injected by the simulator")
        if not engine.charge_call(bucket):
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"{bucket} has no tokens left (DICT would answer 429)"
            )

    async def GetRateLimitPolicies(
        self, request: pb.GetRateLimitPoliciesRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.GetRateLimitPoliciesResponse:
        self._server.list_calls += 1
        self._server.list_call_times.append(time.monotonic())
        engine, ispb = await self._engine(request.participant_ispb, context)
        await self._gate(engine, context, dp.POLICIES_LIST)
        legacy = self._server.legacy
        response = pb.GetRateLimitPoliciesResponse(
            correlation_id=engine.correlation_id(),
            category=engine.category,
            policies=[_policy_message(reading, engine, legacy=legacy) for reading in engine.readings()],
            participant_ispb="" if legacy else ispb,
        )
        response.response_time.FromDatetime(engine.response_time())
        fault = engine.next_fault()
        if fault is not None:
            _break(response, fault)
        return response

    async def GetRateLimitPolicy(
        self, request: pb.GetRateLimitPolicyRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.GetRateLimitPolicyResponse:
        self._server.read_calls += 1
        if not request.policy_name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "policy_name is required")
        engine, ispb = await self._engine(request.participant_ispb, context)
        await self._gate(engine, context, dp.POLICIES_READ)
        reading = engine.reading(request.policy_name)
        if reading is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such policy")
            raise AssertionError("abort raises")  # pragma: no cover - keeps the type checker honest
        legacy = self._server.legacy
        response = pb.GetRateLimitPolicyResponse(
            correlation_id=engine.correlation_id(),
            category=engine.category,
            policy=_policy_message(reading, engine, legacy=legacy),
            participant_ispb="" if legacy else ispb,
        )
        response.response_time.FromDatetime(engine.response_time())
        return response


class SimulatorServer:
    """The simulator on a real gRPC port, for the CLI and for other components' tests (``engine`` knobs)."""

    def __init__(
        self,
        *,
        category: str = "A",
        scenario: Scenario | None = None,
        seed: int = 0,
        refill: str = "continuous",
        clock: Clock | None = None,
        listen: str = "127.0.0.1:0",
        tls_cert_file: str | None = None,
        tls_key_file: str | None = None,
        tls_client_ca_file: str | None = None,
        legacy: bool = False,
    ) -> None:
        #: ISPB -> the engine of that participant; "" (no participants list) answers for any ISPB.
        self.engines: dict[str, BucketEngine] = {}
        participants = scenario.participants if scenario is not None else ()
        for index, participant in enumerate(participants):
            self.engines[participant.ispb] = BucketEngine(
                category=participant.category or category,
                scenario=scenario.for_participant(participant) if scenario is not None else None,
                seed=seed + index,  # participants do not draw the same traffic
                refill=refill,
                clock=clock,
            )
        if not self.engines:
            self.engines[""] = BucketEngine(
                category=category, scenario=scenario, seed=seed, refill=refill, clock=clock
            )
        #: The default participant's engine (the first listed): what an empty ISPB selects.
        self.engine = next(iter(self.engines.values()))
        self.default_ispb = next(iter(self.engines))
        #: An old-style Bridge: answers carry neither response_counts nor participant_ispb.
        self.legacy = legacy
        self.listen = listen
        self.list_calls = 0
        #: time.monotonic() of every list call received, answered or refused (budget checks in tests).
        self.list_call_times: list[float] = []
        self.read_calls = 0
        # PEM files are read here, so a missing one fails before anything listens.
        self._tls = tuple(
            Path(p).read_bytes() if p else None for p in (tls_cert_file, tls_key_file, tls_client_ca_file)
        )
        self._server: grpc.aio.Server | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._port: int | None = None

    def engine_for(self, ispb: str) -> BucketEngine | None:
        """The engine answering for ``ispb``: empty is the default participant; None: not served."""
        if not ispb or "" in self.engines:
            return self.engine
        return self.engines.get(ispb)

    def answered_ispb(self, ispb: str) -> str:
        """The ISPB an answer names: the one asked about, else the default participant's (may be "")."""
        return ispb or self.default_ispb

    def restart_counts(self) -> None:
        """A simulated Bridge restart: every participant's answer counts go back to 0."""
        for engine in self.engines.values():
            engine.restart_counts()

    @property
    def address(self) -> str:
        if self._port is None:
            raise RuntimeError("the simulator is not started")
        host = self.listen.rpartition(":")[0]
        return f"{host}:{self._port}"

    async def start(self) -> None:
        # grpc sets SO_REUSEPORT by default on Linux: a second simulator on a busy port would start and
        # silently share the calls with the first. Without it, a taken address fails as it does elsewhere.
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_RateLimitServiceServicer_to_server(_Servicer(self), server)  # type: ignore[no-untyped-call]
        cert, key, client_ca = self._tls
        try:
            if cert and key:
                credentials = grpc.ssl_server_credentials(
                    [(key, cert)], root_certificates=client_ca, require_client_auth=bool(client_ca)
                )
                self._port = server.add_secure_port(self.listen, credentials)
            else:
                self._port = server.add_insecure_port(self.listen)
        except RuntimeError as exc:  # grpc's way of saying the address is taken or invalid
            raise _bind_error(self.listen, exc) from None
        await server.start()
        self._server = server
        # Plays scenario ticks as they come, so each event is applied and logged at its time even when
        # nobody calls; with a manual clock it does nothing until the test advances the clock.
        self._ticker = asyncio.create_task(self._tick())

    async def _tick(self) -> None:
        while True:
            for engine in self.engines.values():
                engine.advance()
            await asyncio.sleep(self.engine.tick)

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        if self._server is not None:
            await self._server.stop(grace=0.5)
            self._server = None


def _bind_error(listen: str, exc: RuntimeError) -> OSError:
    """grpc only says "Failed to bind": ask the OS why, so a busy port reads as it does elsewhere."""
    host, _, port = listen.rpartition(":")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET) as probe:
            probe.bind((host.strip("[]"), int(port)))
    except OSError as why:
        return OSError(why.errno, f"cannot listen on {listen}: {why.strerror}")
    except ValueError:
        pass
    return OSError(f"cannot listen on {listen}: {exc}")


def _transport(settings: SimulatorSettings) -> str:
    if settings.simulator_tls_client_ca_file:
        return "mTLS"
    return "TLS" if settings.simulator_tls_cert_file else "plaintext"


async def _serve(
    settings: SimulatorSettings, scenario: Scenario, server: SimulatorServer, stop: runtime.StopSignal
) -> None:
    await server.start()
    log.info(
        "Bridge simulator serving",
        extra={
            "ctx": {
                "address": server.address,
                "category": settings.simulator_category,
                "scenario": scenario.name,
                "seed": settings.simulator_seed,
                "refill": settings.simulator_refill,
                "transport": _transport(settings),
                "participants": [ispb for ispb in server.engines if ispb] or "any ISPB",
            }
        },
    )
    try:
        await stop.wait()
    finally:
        log.info("Bridge simulator stopping", extra={"ctx": {"list_calls": server.list_calls}})
        await server.stop()


def run(settings: SimulatorSettings) -> int:
    """``dict-rate-limit simulator``: serves until SIGTERM or SIGINT, then exits 0."""
    try:
        scenario = resolve_scenario(settings.simulator_scenario)
    except ScenarioError as exc:
        raise ConfigError("SIMULATOR_SCENARIO", str(exc)) from None
    try:
        server = SimulatorServer(
            category=settings.simulator_category,
            scenario=scenario,
            seed=settings.simulator_seed,
            refill=settings.simulator_refill,
            listen=settings.simulator_listen,
            tls_cert_file=settings.simulator_tls_cert_file,
            tls_key_file=settings.simulator_tls_key_file,
            tls_client_ca_file=settings.simulator_tls_client_ca_file,
        )
    except OSError as exc:
        raise ConfigError("SIMULATOR_TLS_CERT_FILE", f"cannot read a TLS file: {exc}") from None
    return runtime.run("simulator", lambda stop: _serve(settings, scenario, server, stop))
