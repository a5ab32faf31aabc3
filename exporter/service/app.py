"""`dict-rate-limit exporter`: wires the Bridge client, poller, collector, history writer and HTTP servers.

:class:`ExporterService` is the reusable building block (the all-in-one command runs it next to the
receiver); :func:`run` adds signal handling and the exit code.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from datetime import UTC
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

from exporter import __version__, runtime
from exporter.bridge.budget import CallBudget
from exporter.bridge.client import BridgeClient
from exporter.config import ExporterSettings, call_ceiling, check_budget, warn_about_budget
from exporter.service.collector import RenderedBuckets
from exporter.service.derivation import DerivedSnapshot
from exporter.service.http import build_apps
from exporter.service.leader import LeaseTiming, PollerLease, single_poller_collector
from exporter.service.poller import Fetch, PollClock, Poller
from exporter.service.selfmetrics import SelfMetrics
from exporter.snapshot import DICT_POLICY_NAMES, RENAMED_POLICIES
from exporter.web import limits as http_limits
from exporter.web.webconfig import WebConfig, check_ports
from exporter.web.webconfig import load as load_web_config

log = logging.getLogger(__name__)

#: Longest wait for an in-flight poll at shutdown (further bounded by the interval).
STOP_POLL_SECONDS = 5.0
#: Longest wait for the history writer to flush queued snapshots at shutdown.
STOP_HISTORY_SECONDS = 5.0
#: Policies stored in dict_rate_limit_policies and seen within this many days count as "seen before"
#: after a restart (dict_rate_limit_policy_missing); older rows are history, not news.
KNOWN_POLICY_DAYS = 7
KNOWN_POLICIES_SQL = (
    "SELECT DISTINCT endpoint_id FROM dict_rate_limit_policies "
    "WHERE last_seen_at > now() - make_interval(days => %s)"
)


class History(Protocol):
    """What the exporter needs of exporter.history.writer.HistoryWriter."""

    collector: Collector

    @property
    def database_ok(self) -> bool: ...

    def render_metrics(self) -> bytes: ...

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
        settings: ExporterSettings,
        *,
        fetch: Fetch | None = None,
        clock: PollClock | None = None,
        serve_http: bool = True,
        budget: CallBudget | None = None,
    ) -> None:
        self.settings = settings
        self.version = __version__
        check_budget(settings.poll_interval_seconds, settings.poll_budget_override)
        warn_about_budget(settings.poll_interval_seconds)
        # A wrong file raises ConfigError here, before anything binds: one line, exit 2.
        self.web_config: WebConfig = load_web_config(settings.web_config_file)
        check_ports(self.web_config, settings.metrics_listen[1], settings.health_check_port)
        ceiling = call_ceiling(
            settings.poll_interval_seconds,
            settings.bridge_max_calls_per_minute,
            settings.poll_budget_override,
        )
        self.metrics = SelfMetrics(settings.poll_interval_seconds)
        # Injectable like fetch and clock: tests scale the 60 s window down to see several in seconds.
        self.budget = budget or CallBudget(ceiling)
        self._bridge: BridgeClient | None = None
        if fetch is None:
            self._bridge = BridgeClient.from_settings(
                settings, on_attempt=self.metrics.record_bridge_request, budget=self.budget
            )
            bridge = self._bridge

            async def fetch_from_bridge(seconds: float | None) -> Any:
                deadline = None if seconds is None else time.monotonic() + seconds
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
            budget=self.budget,
            max_skew=settings.bridge_max_clock_skew_seconds,
            thresholds=settings.policy_thresholds,
            error_404_window=settings.error_404_window_seconds,
        )
        _warn_unknown_thresholds(settings)
        #: With DATABASE_URL, replicas share one poller through PostgreSQL (exporter.service.leader).
        self.lease: PollerLease | None = None
        self._rendered = RenderedBuckets(None, settings.threshold_for, settings.error_404_window_seconds)
        self._withdrawn = self._rendered
        self.history: History | None = None
        self._history_open = False
        self._history_metrics: Callable[[], bytes] = _nothing
        #: dict_rate_limit_poller_leader and _replicas: a handful of series that change with the lease,
        #: rendered at each scrape (the history part is cached, see _history_metrics).
        self._poller_registry = CollectorRegistry(auto_describe=True)
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
            self.poller.known |= await _known_policies(self.settings)
        try:
            if self._serve_http:
                await self._start_http()
            if self.lease is not None:
                await self.lease.start()  # elected (or not) before the first poll
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
        if self.lease is not None:
            await self.lease.stop()  # released at once: a follower takes over within a third of a lease
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
            self._history_metrics = writer.render_metrics
            self.history = writer
            self._open_lease(self.settings.database_url)
        else:
            from exporter.history.writer import disabled_metrics

            log.info("history is disabled: DATABASE_URL is not set, no snapshot will be stored")
            disabled = disabled_metrics()
            self._history_metrics = lambda: disabled
            self._poller_registry.register(single_poller_collector())
            log.warning(
                "DATABASE_URL is not set: this replica polls the Bridge on its own, and replicas would each "
                "poll (each spending POLICIES_LIST tokens); run one replica, or set DATABASE_URL so replicas "
                "elect one poller"
            )

    def _open_lease(self, database_url: str) -> None:
        s = self.settings
        timing = LeaseTiming(s.poll_interval_seconds, s.poller_lease_seconds, s.poll_lead_seconds)
        self.lease = PollerLease(
            database_url,
            group=s.poller_group,
            timing=timing,
            adopt=self.poller.adopt,
            max_age=s.stale_after_intervals * s.poll_interval_seconds,
        )
        self.poller.gate = self.lease
        self._poller_registry.register(self.lease.collector)

    async def _stop_history(self) -> None:
        if self.history is not None and self._history_open:
            self._history_open = False
            await self.history.stop(STOP_HISTORY_SECONDS)

    async def _start_http(self) -> None:
        metrics_host, metrics_port = self.settings.metrics_listen
        health_port = self.settings.health_check_port
        limits = http_limits.limits_of(self.settings)
        apps = build_apps(
            self, metrics_port, health_port, self.web_config, telemetry_path=self.settings.web_telemetry_path
        )
        for port, app in apps.items():
            runner = http_limits.runner(app, limits)
            await runner.setup()
            self._runners.append(runner)
            host = metrics_host if port == metrics_port else self.settings.listen_host
            tls = self.web_config.tls if port == metrics_port else None
            site = http_limits.LimitedSite(runner, host, port, limits, ssl_context=tls)
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
        self._rendered = await asyncio.to_thread(
            RenderedBuckets, derived, self.settings.threshold_for, self.settings.error_404_window_seconds
        )

    # --- what the HTTP handlers read (no I/O)

    def metrics_body(self, *, gzip: bool, extra: bytes = b"") -> bytes:
        """The exposition; ``extra`` is appended (all-in-one: the receiver's series), compressed with the
        rest so the cached compressed bucket part is reused."""
        stale = self.poller.is_stale()
        buckets = self._withdrawn if stale else self._rendered
        # Both parts are cached until their metrics change: most scrapes only join two byte strings.
        tail = (
            self.metrics.render(stale=stale)
            + self._history_metrics()
            + generate_latest(self._poller_registry)
            + extra
        )
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
            "participant_ispb": snapshot.participant_ispb or None,
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
        notes: dict[str, str] = {}
        if poller.is_fresh():
            checks["bridge"] = "ok"
            if poller.last_error is not None:
                # Still ready: the last good snapshot is fresh and served (unready would stop the scrapes
                # and resolve every bucket alert). But say why the last poll failed.
                notes["last_poll"] = f"failed (serving the previous snapshot): {poller.last_error}"
        elif poller.latest is None:
            checks["bridge"] = f"no successful poll yet: {poller.last_error or 'first poll pending'}"
        else:
            checks["bridge"] = (
                f"no successful poll for {poller.stale_after} intervals (data withdrawn): {poller.last_error}"
            )
        if self.history is not None:
            # The cause in words (unreachable, schema not migrated...), never "unreachable" while it answers.
            checks["database"] = self.history.database_status
        lease_error = self.lease.last_error if self.lease is not None else None
        if lease_error is not None:
            # Before any snapshot is written the lease is what meets the database first: say its cause.
            checks["poller_lease"] = lease_error
            if lease_error.startswith("UndefinedTable") and checks.get("database") in {"ok", "no write yet"}:
                checks["database"] = f"schema not migrated (run `dict-rate-limit migrate`): {lease_error}"
        return all(value == "ok" for value in checks.values()), {**checks, **notes}

    def startup_state(self) -> tuple[bool, dict[str, str]]:
        """Started once the first poll was attempted, whatever its outcome (a Bridge outage is no crash)."""
        if self.poller.attempted == 0 and self.lease is not None and self.lease.decided:
            return True, {"first_poll": "another replica polls (follower)"}
        attempted = self.poller.attempted > 0
        return attempted, {"first_poll": "done" if attempted else "pending"}


def _nothing() -> bytes:
    return b""


def _policy_json(state: Any, settings: ExporterSettings) -> dict[str, Any]:
    reading = state.reading
    threshold = settings.threshold_for(reading.name)
    return {
        "name": reading.name,
        "available_tokens": reading.available_tokens,
        "capacity": reading.capacity,
        "refill_tokens": reading.refill_tokens,
        "refill_period_sec": reading.refill_period_sec,
        "refill_rate_per_second": reading.refill_rate_per_second,
        "error_404_rate": state.error_404_share,
        # {"404": 12, ...}: the Bridge's cumulative counts, JSON object keys being strings; null without.
        "response_counts": None
        if reading.response_counts is None
        else {str(code): count for code, count in reading.response_counts},
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


def _warn_unknown_thresholds(settings: ExporterSettings) -> None:
    """Start-up warning for overrides naming no policy of DICT's table (a rename orphans an override)."""
    for name in sorted(set(settings.policy_thresholds) - DICT_POLICY_NAMES):
        renamed = RENAMED_POLICIES.get(name)
        hint = f"DICT renamed it to {renamed}" if renamed else "renamed or removed by DICT?"
        log.warning(
            "POLICY_THRESHOLDS names %s, which is not a policy of DICT's table (%s); it is reported again "
            "if the Bridge does not return it",
            name,
            hint,
            extra={"ctx": {"policy": name}},
        )


async def _known_policies(settings: ExporterSettings) -> set[str]:
    """Policy names history saw recently, so a restart does not forget a policy that went missing."""
    import psycopg

    assert settings.database_url is not None
    try:
        async with await psycopg.AsyncConnection.connect(settings.database_url, connect_timeout=5) as conn:
            cursor = await conn.execute(KNOWN_POLICIES_SQL, (KNOWN_POLICY_DAYS,))
            return {str(row[0]) for row in await cursor.fetchall()}
    except psycopg.Error as exc:
        # Not fatal: "missing" then starts from the first poll, as without a database.
        log.warning("could not read known policies from history: %s", type(exc).__name__)
        return set()


def _bound_port(runner: web.AppRunner, requested: int) -> int:
    """The port actually bound (differs from the requested one when that was 0)."""
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return requested


async def serve(settings: ExporterSettings, stop: runtime.StopSignal) -> None:
    """Runs the exporter until ``stop`` is set; a port that cannot be bound ends start-up (OSError)."""
    service = ExporterService(settings)
    try:
        await service.start()
        await stop.wait()
        log.info("signal received, shutting down")
    finally:
        await service.stop()


def run(settings: ExporterSettings) -> int:
    """Entry point of ``dict-rate-limit exporter`` (signals and exit codes: :mod:`exporter.runtime`)."""
    return runtime.run("exporter", lambda stop: serve(settings, stop))
