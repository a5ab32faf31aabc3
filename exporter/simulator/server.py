"""The Bridge simulator: a gRPC RateLimitService over the bucket engine, and the ``simulator`` command."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path

import grpc
import grpc.aio

from exporter.bridge.proto import rate_limit_pb2 as pb
from exporter.bridge.proto import rate_limit_pb2_grpc as pb_grpc
from exporter.config import ConfigError, Settings
from exporter.simulator import policy_table as dp
from exporter.simulator.clock import Clock
from exporter.simulator.engine import BucketEngine
from exporter.simulator.scenario import Scenario, ScenarioError, resolve_scenario
from exporter.snapshot import PolicyReading

log = logging.getLogger(__name__)


def _policy_message(reading: PolicyReading) -> pb.RateLimitPolicy:
    message = pb.RateLimitPolicy(
        name=reading.name,
        available_tokens=reading.available_tokens,
        capacity=reading.capacity,
        refill_tokens=reading.refill_tokens,
        refill_period_sec=reading.refill_period_sec,
    )
    if reading.error_404_rate is not None:
        message.error_404_rate = reading.error_404_rate
    return message


class _Servicer(pb_grpc.RateLimitServiceServicer):
    """Answers as DICT would: each call spends its own bucket and is refused (429) when it is empty."""

    def __init__(self, server: SimulatorServer) -> None:
        self._server = server
        self._engine = server.engine

    async def _gate(self, context: grpc.aio.ServicerContext[object, object], bucket: str) -> None:
        latency = self._engine.latency()
        if latency > 0:
            await asyncio.sleep(latency)
        code = self._engine.next_error()
        if code is not None:
            await context.abort(grpc.StatusCode[code], f"{code} injected by the simulator")
        if not self._engine.charge_call(bucket):
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"{bucket} has no tokens left (DICT would answer 429)"
            )

    async def GetRateLimitPolicies(
        self, request: pb.GetRateLimitPoliciesRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.GetRateLimitPoliciesResponse:
        self._server.list_calls += 1
        await self._gate(context, dp.POLICIES_LIST)
        response = pb.GetRateLimitPoliciesResponse(
            correlation_id=self._engine.correlation_id(),
            category=self._engine.category,
            policies=[_policy_message(reading) for reading in self._engine.readings()],
        )
        response.response_time.FromDatetime(self._engine.response_time())
        return response

    async def GetRateLimitPolicy(
        self, request: pb.GetRateLimitPolicyRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.GetRateLimitPolicyResponse:
        self._server.read_calls += 1
        if not request.policy_name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "policy_name is required")
        await self._gate(context, dp.POLICIES_READ)
        reading = self._engine.reading(request.policy_name)
        if reading is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such policy")
            raise AssertionError("abort raises")  # pragma: no cover - keeps the type checker honest
        response = pb.GetRateLimitPolicyResponse(
            correlation_id=self._engine.correlation_id(),
            category=self._engine.category,
            policy=_policy_message(reading),
        )
        response.response_time.FromDatetime(self._engine.response_time())
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
    ) -> None:
        self.engine = BucketEngine(
            category=category, scenario=scenario, seed=seed, refill=refill, clock=clock
        )
        self.listen = listen
        self.list_calls = 0
        self.read_calls = 0
        # PEM files are read here, so a missing one fails before anything listens.
        self._tls = tuple(
            Path(p).read_bytes() if p else None for p in (tls_cert_file, tls_key_file, tls_client_ca_file)
        )
        self._server: grpc.aio.Server | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._port: int | None = None

    @property
    def address(self) -> str:
        if self._port is None:
            raise RuntimeError("the simulator is not started")
        host = self.listen.rpartition(":")[0]
        return f"{host}:{self._port}"

    async def start(self) -> None:
        server = grpc.aio.server()
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
            raise OSError(f"cannot listen on {self.listen}: {exc}") from None
        await server.start()
        self._server = server
        # Plays scenario ticks as they come, so each event is applied and logged at its time even when
        # nobody calls; with a manual clock it does nothing until the test advances the clock.
        self._ticker = asyncio.create_task(self._tick())

    async def _tick(self) -> None:
        while True:
            self.engine.advance()
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


def _transport(settings: Settings) -> str:
    if settings.simulator_tls_client_ca_file:
        return "mTLS"
    return "TLS" if settings.simulator_tls_cert_file else "plaintext"


async def _serve(settings: Settings, scenario: Scenario, server: SimulatorServer) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
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
            }
        },
    )
    try:
        await stop.wait()
    finally:
        log.info("Bridge simulator stopping", extra={"ctx": {"list_calls": server.list_calls}})
        await server.stop()


def run(settings: Settings) -> int:
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
    try:
        asyncio.run(_serve(settings, scenario, server))
    except OSError as exc:
        raise ConfigError("SIMULATOR_LISTEN", str(exc)) from None
    return 0
