"""`dict-rate-limit exporter`: wires the Bridge client, poller, collector, history writer and HTTP servers.

:class:`ExporterService` is the reusable building block (the all-in-one command runs it next to the
receiver); :func:`run` adds signal handling and the exit code.
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
from datetime import UTC
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

from exporter import __version__, http_limits
from exporter.bridge.client import BridgeClient
from exporter.config import Settings
from exporter.service.collector import RenderedBuckets
from exporter.service.derivation import DerivedSnapshot
from exporter.service.http import build_apps
from exporter.service.poller import Clock, Fetch, Poller, check_budget
from exporter.service.selfmetrics import SelfMetrics

log = logging.getLogger(__name__)

#: Longest wait for an in-flight poll at shutdown (further bounded by the interval).
STOP_POLL_SECONDS = 5.0
#: Longest wait for the history writer to flush queued snapshots at shutdown.
STOP_HISTORY_SECONDS = 5.0


class History(Protocol):
    """What the exporter needs of exporter.history.writer.HistoryWriter."""

    collector: Collector

    @property
    def database_ok(self) -> bool: ...

    @property
    def database_status(self) -> str: ...

    async def start(self) -> None: ...
    def submit(self, derived: DerivedSnapshot) -> None: ...
    async def stop(self, timeout: float) -> None: ...  # noqa: ASYNC109 - HistoryWriter's signature


class ExporterService:
    """The exporter without process concerns: ``await start()``, serve, ``await stop()``.

    ``serve_http=False`` leaves the HTTP servers to the caller, which mounts the routes of
    :mod:`exporter.service.http` on its own applications (``add_metrics_routes``/``add_health_routes`` with
    ``app[SERVICE] = service``).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        fetch: Fetch | None = None,
        clock: Clock | None = None,
        serve_http: bool = True,
    ) -> None:
        self.settings = settings
        self.version = __version__
        check_budget(settings.poll_interval_seconds, settings.poll_budget_override)
        self.metrics = SelfMetrics(settings.poll_interval_seconds)
        self._bridge: BridgeClient | None = None
        if fetch is None:
            self._bridge = BridgeClient.from_settings(settings, on_attempt=self.metrics.record_bridge_request)
            bridge = self._bridge

            async def fetch_from_bridge(deadline: float | None) -> Any:
                return await bridge.list_policies(deadline=deadline)

            fetch = fetch_from_bridge
        self.poller = Poller(
            fetch,
            self.metrics,
            interval=settings.poll_interval_seconds,
            lead=settings.poll_lead_seconds,
            stale_after=settings.stale_after_intervals,
            on_snapshot=self._publish,
            clock=clock,
        )
        self._rendered = RenderedBuckets(None, settings.threshold_for)
        self._withdrawn = self._rendered
        self.history: History | None = None
        self._history_open = False
        self._history_registry = CollectorRegistry()
        self._serve_http = serve_http
        self._runners: list[web.AppRunner] = []
        self.ports: dict[str, int] = {}
        self._started = False

    # --- lifecycle

    async def start(self) -> None:
        """Opens history (when configured), binds the HTTP servers, then starts polling (first poll now)."""
        self._open_history()
        if self.history is not None:
            await self.history.start()
            self._history_open = True
        try:
            if self._serve_http:
                await self._start_http()
        except BaseException:
            await self._stop_history()
            raise
        self.poller.start()
        self._started = True
        log.info(
            "exporter started",
            extra={
                "ctx": {
                    "bridge": self.settings.bridge_address,
                    "poll_interval_seconds": self.settings.poll_interval_seconds,
                    "poll_lead_seconds": self.settings.poll_lead_seconds,
                    **{f"{name}_port": port for name, port in self.ports.items()},
                }
            },
        )

    async def stop(self) -> None:
        """Stops polling (in-flight poll bounded), flushes history (bounded), closes Bridge and servers."""
        await self.poller.stop(min(STOP_POLL_SECONDS, self.settings.poll_interval_seconds))
        await self._stop_history()
        if self._bridge is not None:
            await self._bridge.close()
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        log.info("exporter stopped", extra={"ctx": {"polls": self.poller.attempted}})

    def _open_history(self) -> None:
        if self.settings.database_url:
            from exporter.history.writer import HistoryWriter

            writer = HistoryWriter(
                self.settings.database_url,
                queue_size=self.settings.history_queue_size,
                retention_months=self.settings.rate_limit_retention_months,
                maintenance_interval=self.settings.maintenance_interval_seconds,
                max_connections=self.settings.database_max_connections,
                observe=self.metrics.observe,
                thresholds=self.settings.threshold_for,
            )
            self._history_registry.register(writer.collector)
            self.history = writer
        else:
            from exporter.history.writer import disabled_collector

            log.info("history is disabled: DATABASE_URL is not set, no snapshot will be stored")
            self._history_registry.register(disabled_collector())

    async def _stop_history(self) -> None:
        if self.history is not None and self._history_open:
            self._history_open = False
            await self.history.stop(STOP_HISTORY_SECONDS)

    async def _start_http(self) -> None:
        host = self.settings.listen_host
        metrics_port, health_port = self.settings.metrics_port, self.settings.health_check_port
        limits = http_limits.limits_of(self.settings)
        for port, app in build_apps(self, metrics_port, health_port).items():
            runner = http_limits.runner(app, limits)
            await runner.setup()
            self._runners.append(runner)
            site = http_limits.LimitedSite(runner, host, port, limits)
            await site.start()
            bound = _bound_port(runner, port)
            if port == metrics_port:
                self.ports["metrics"] = bound
            if port == health_port:
                self.ports["health"] = bound

    @property
    def health_port(self) -> int:
        return self.ports.get("health", self.settings.health_check_port)

    @property
    def poll_interval_seconds(self) -> float:
        return self.settings.poll_interval_seconds

    # --- the poller's output

    async def _publish(self, derived: DerivedSnapshot) -> None:
        if self.history is not None:
            self.history.submit(derived)
        # Rendered once here; every scrape until the next poll serves these bytes. In a worker thread:
        # 10,000 series take ~0.1-0.2 s of Python, during which scrapes keep being answered (old bytes).
        self._rendered = await asyncio.to_thread(RenderedBuckets, derived, self.settings.threshold_for)

    # --- what the HTTP handlers read (no I/O)

    def metrics_body(self, *, gzip: bool) -> bytes:
        stale = self.poller.is_stale()
        buckets = self._withdrawn if stale else self._rendered
        tail = self.metrics.render(stale=stale) + generate_latest(self._history_registry)
        return buckets.body(tail, gzip=gzip)

    def policies_payload(self) -> dict[str, Any] | None:
        derived = self.poller.latest
        if derived is None:
            return None
        snapshot = derived.snapshot
        age = self.poller.age()
        return {
            "response_time": snapshot.response_time.astimezone(UTC).isoformat(timespec="milliseconds"),
            "correlation_id": snapshot.correlation_id,
            "category": snapshot.category,
            "stale": self.poller.is_stale(),
            "age_seconds": round(age, 3) if age is not None else None,
            "bridge_up": self.poller.consecutive_failures == 0,
            "policies": [_policy_json(state, self.settings) for state in derived.states],
        }

    def liveness(self) -> tuple[bool, dict[str, str]]:
        failed = self.poller.failed
        if failed is not None:
            return False, {"poller": f"stopped: {type(failed).__name__}: {failed}"}
        return True, {"poller": "running" if self._started else "not started"}

    def readiness(self) -> tuple[bool, dict[str, str]]:
        """Ready: a successful poll within STALE_AFTER_INTERVALS intervals, and the database if configured."""
        checks: dict[str, str] = {}
        poller = self.poller
        if poller.is_fresh():
            checks["bridge"] = "ok"
        elif poller.latest is None:
            checks["bridge"] = f"no successful poll yet: {poller.last_error or 'first poll pending'}"
        else:
            checks["bridge"] = (
                f"no successful poll for {poller.stale_after} intervals (data withdrawn): {poller.last_error}"
            )
        if self.history is not None:
            # The cause in words (unreachable, schema not migrated...), never "unreachable" while it answers.
            checks["database"] = self.history.database_status
        return all(value == "ok" for value in checks.values()), checks

    def startup_state(self) -> tuple[bool, dict[str, str]]:
        """Started once the first poll was attempted, whatever its outcome (a Bridge outage is no crash)."""
        attempted = self.poller.attempted > 0
        return attempted, {"first_poll": "done" if attempted else "pending"}


def _policy_json(state: Any, settings: Settings) -> dict[str, Any]:
    reading = state.reading
    threshold = settings.threshold_for(reading.name)
    return {
        "name": reading.name,
        "available_tokens": reading.available_tokens,
        "capacity": reading.capacity,
        "refill_tokens": reading.refill_tokens,
        "refill_period_sec": reading.refill_period_sec,
        "refill_rate_per_second": reading.refill_rate_per_second,
        "error_404_rate": reading.error_404_rate,
        "remaining_ratio": state.remaining_ratio,
        "utilization_percent": state.utilization_percent,
        "consumed_tokens": state.consumed_tokens,
        "consumed_tokens_total": state.consumed_tokens_total,
        "consumption_rate_per_minute": state.consumption_rate_per_minute,
        # JSON has no infinity: null means "never", as for the exhaustion projection.
        "recovery_eta_seconds": state.recovery_eta_seconds
        if math.isfinite(state.recovery_eta_seconds)
        else None,
        "exhaustion_projection_seconds": state.exhaustion_projection_seconds,
        "warning_remaining_ratio": threshold.warning,
        "critical_remaining_ratio": threshold.critical,
    }


def _bound_port(runner: web.AppRunner, requested: int) -> int:
    """The port actually bound (differs from the requested one when that was 0)."""
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return requested


async def _serve(settings: Settings) -> int:
    service = ExporterService(settings)
    try:
        await service.start()
    except OSError as exc:
        log.error("cannot serve HTTP on %s: %s", settings.listen_host, exc)
        await service.stop()
        return 1
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    log.info("signal received, shutting down")
    await service.stop()
    return 0


def run(settings: Settings) -> int:
    """Entry point of ``dict-rate-limit exporter``; ConfigError (poll budget) reaches the CLI (exit 2)."""
    return asyncio.run(_serve(settings))
