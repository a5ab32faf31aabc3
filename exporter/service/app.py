"""`dict-rate-limit exporter`: wires the Bridge client, poller, collector, history writer and HTTP servers.

:class:`ExporterService` is the reusable building block (the all-in-one command runs it next to the
receiver); :func:`run` adds signal handling and the exit code.
"""

from __future__ import annotations

import asyncio
import gzip as gzip_module
import logging
import math
from collections.abc import Callable
from datetime import UTC
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.registry import Collector

from exporter import __version__, runtime
from exporter.bridge.budget import CallBudget
from exporter.config import ExporterSettings, check_budget, warn_about_budget
from exporter.service import exposition
from exporter.service.collector import RenderedBuckets
from exporter.service.derivation import DerivedSnapshot
from exporter.service.http import build_apps
from exporter.service.leader import PollerLease
from exporter.service.participant import ParticipantPoller
from exporter.service.poller import Fetch, PollClock
from exporter.service.selfmetrics import ProcessMetrics, SelfMetrics
from exporter.snapshot import DICT_POLICY_NAMES, RENAMED_POLICIES
from exporter.web import limits as http_limits
from exporter.web.webconfig import WebConfig, check_ports
from exporter.web.webconfig import load as load_web_config

log = logging.getLogger(__name__)

#: Longest wait for the history writer to flush queued snapshots at shutdown.
STOP_HISTORY_SECONDS = 5.0
#: Policies stored in dict_rate_limit_policies and seen within this many days count as "seen before"
#: after a restart (dict_rate_limit_policy_missing); older rows are history, not news.
KNOWN_POLICY_DAYS = 7
KNOWN_POLICIES_SQL = (
    "SELECT DISTINCT endpoint_id FROM dict_rate_limit_policies "
    "WHERE participant = %s AND last_seen_at > now() - make_interval(days => %s)"
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

    One :class:`ParticipantPoller` per watched participant: one for today's configuration (no label),
    one per entry of ``participants:`` otherwise (``fetch``, ``clock`` and ``budget`` apply to the single
    one only). History, the HTTP servers and the process's own series are shared.
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
        # The settings that poll: the top level's, or each participant's (the top level then polls nothing).
        for own in [p.settings for p in settings.participants] or [settings]:
            check_budget(own.poll_interval_seconds, own.poll_budget_override)
            warn_about_budget(own.poll_interval_seconds)
        # A wrong file raises ConfigError here, before anything binds: one line, exit 2.
        self.web_config: WebConfig = load_web_config(settings.web_config_file)
        check_ports(self.web_config, settings.metrics_listen[1], settings.health_check_port)
        if settings.participants:
            self.participants = [ParticipantPoller(p.settings, p.name) for p in settings.participants]
        else:
            self.participants = [ParticipantPoller(settings, fetch=fetch, clock=clock, budget=budget)]
        self.multi = bool(settings.participants)
        single = self.participants[0]
        #: The first (in single-participant mode the only) participant's parts, as before issue 15.
        self.poller = single.poller
        self.budget = single.budget
        #: Process-wide own series in multi-participant mode (history operations, process_*, build info).
        self.process_metrics = ProcessMetrics()
        self.metrics: SelfMetrics | ProcessMetrics = self.process_metrics if self.multi else single.metrics
        for participant in self.participants:
            _warn_unknown_thresholds(participant.settings)
        self.history: History | None = None
        self._history_open = False
        self._history_metrics: Callable[[], bytes] = _nothing
        #: The multi-participant body: (its parts, text, gzip text once asked for).
        self._merged: tuple[tuple[exposition.Families, ...], bytes, bytes | None] | None = None
        self._process_part: tuple[bytes, exposition.Families] = (b"", {})
        self._serve_http = serve_http
        self._runners: list[web.AppRunner] = []
        self.ports: dict[str, int] = {}
        self._started = False

    @property
    def lease(self) -> PollerLease | None:
        """The first participant's poller lease (the only one in single-participant mode)."""
        return self.participants[0].lease

    @property
    def _rendered(self) -> RenderedBuckets:
        return self.participants[0].rendered

    @property
    def _poller_registry(self) -> CollectorRegistry:
        return self.participants[0].registry

    # --- lifecycle

    async def start(self) -> None:
        """Opens history (when configured), binds the HTTP servers, then starts polling (first poll now)."""
        self._open_history()
        if self.history is not None:
            await self.history.start()
            self._history_open = True
            for participant in self.participants:
                participant.poller.known |= await _known_policies(self.settings, participant.name or "")
        try:
            if self._serve_http:
                await self._start_http()
            for participant in self.participants:
                await participant.start_lease()  # elected (or not) before the first poll
        except BaseException:
            await self._stop_history()
            raise
        for participant in self.participants:
            participant.start_polling()
        self._started = True
        log.info(
            "exporter started",
            extra={
                "ctx": {
                    "bridge": self.settings.bridge_address,
                    "participants": {p.name: p.settings.bridge_address for p in self.participants}
                    if self.multi
                    else None,
                    "poll_interval_seconds": self.settings.poll_interval_seconds,
                    "poll_lead_seconds": self.settings.poll_lead_seconds,
                    **{f"{name}_port": port for name, port in self.ports.items()},
                }
            },
        )

    async def stop(self) -> None:
        """Stops polling (in-flight polls bounded), flushes history (bounded), closes Bridges and servers."""
        await asyncio.gather(*(participant.stop() for participant in self.participants))
        await self._stop_history()
        for participant in self.participants:
            await participant.close()
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        log.info(
            "exporter stopped", extra={"ctx": {"polls": sum(p.poller.attempted for p in self.participants)}}
        )

    def _open_history(self) -> None:
        if self.settings.database_url:
            from exporter.history.writer import HistoryWriter

            writer = HistoryWriter(
                self.settings.database_url,
                queue_size=self.settings.history_queue_size,
                retention_months=self.settings.rate_limit_retention_months,
                maintenance_interval=self.settings.maintenance_interval_seconds,
                max_connections=self.settings.database_max_connections,
                min_connections=self.settings.database_min_connections,
                connect_timeout=self.settings.database_connection_timeout,
                observe=self.metrics.observe,
                thresholds=self.settings.threshold_for,
                participant_thresholds={p.name: p.settings.threshold_for for p in self.settings.participants},
            )
            self._history_metrics = writer.render_metrics
            self.history = writer
            for participant in self.participants:
                participant.submit = writer.submit
                participant.open_lease(self.settings.database_url)
        else:
            from exporter.history.writer import disabled_metrics

            log.info("history is disabled: DATABASE_URL is not set, no snapshot will be stored")
            disabled = disabled_metrics()
            self._history_metrics = lambda: disabled
            for participant in self.participants:
                participant.without_lease()
            log.warning(
                "DATABASE_URL is not set: this replica polls the Bridge on its own, and replicas would each "
                "poll (each spending POLICIES_LIST tokens); run one replica, or set DATABASE_URL so replicas "
                "elect one poller"
            )

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

    # --- what the HTTP handlers read (no I/O)

    def metrics_body(self, *, gzip: bool, extra: bytes = b"") -> bytes:
        """The exposition; ``extra`` is appended (all-in-one: the receiver's series), compressed with the
        rest so the cached compressed bucket part is reused."""
        if self.multi:
            return self._merged_body(gzip=gzip, extra=extra)
        participant = self.participants[0]
        stale, buckets = participant.buckets()
        # Both parts are cached until their metrics change: most scrapes only join two byte strings.
        tail = (
            participant.metrics.render(stale=stale)
            + self._history_metrics()
            + participant.lease_series()
            + extra
        )
        return buckets.body(tail, gzip=gzip)

    def _merged_body(self, *, gzip: bool, extra: bytes) -> bytes:
        """Every participant's series labelled, then the process's, each family once (exposition.merge).

        Every part is cached until it changes, and so is the merged body (and its gzip form): between
        polls most scrapes return the same bytes object."""
        parts = [part for participant in self.participants for part in participant.labelled_parts()]
        tail = self.process_metrics.render() + self._history_metrics() + extra
        if self._process_part[0] != tail:
            self._process_part = (tail, exposition.split(tail))
        parts.append(self._process_part[1])
        key = tuple(parts)
        cached = self._merged
        # By identity: a part is a new object whenever its text changed (the cache keeps the old ones alive).
        if (
            cached is None
            or len(cached[0]) != len(key)
            or any(a is not b for a, b in zip(cached[0], key, strict=True))
        ):
            cached = self._merged = (key, exposition.merge(parts), None)
        if not gzip:
            return cached[1]
        if cached[2] is None:
            cached = self._merged = (key, cached[1], gzip_module.compress(cached[1], compresslevel=6))
        assert cached[2] is not None
        return cached[2]

    def policies_payload(self) -> dict[str, Any] | None:
        """The latest snapshot as JSON; multi-participant: ``{"participants": {name: ...}}``, None (503)
        only when no participant has had a successful poll."""
        if not self.multi:
            return _participant_payload(self.participants[0])
        payloads = {p.name or "": _participant_payload(p) for p in self.participants}
        if all(payload is None for payload in payloads.values()):
            return None
        return {
            "participants": {
                name: payload if payload is not None else _unavailable(participant)
                for (name, payload), participant in zip(payloads.items(), self.participants, strict=True)
            }
        }

    def liveness(self) -> tuple[bool, dict[str, str]]:
        checks: dict[str, str] = {}
        for participant in self.participants:
            failed = participant.poller.failed
            if failed is not None:
                state = f"stopped: {type(failed).__name__}: {failed}"
            else:
                state = "running" if self._started else "not started"
            checks[_scoped("poller", participant)] = state
        return all(not value.startswith("stopped") for value in checks.values()), checks

    def readiness(self) -> tuple[bool, dict[str, str]]:
        """Ready: a successful poll within STALE_AFTER_INTERVALS intervals, and the database if configured.

        Multi-participant: ready while at least one participant serves fresh data. One participant's Bridge
        being down must not make Kubernetes stop routing scrapes (and every other participant's alerts)
        to this pod; it shows in the body (``bridge:<name>``) and in ``dict_rate_limit_bridge_up``."""
        checks: dict[str, str] = {}
        notes: dict[str, str] = {}
        bridges: list[str] = []
        for participant in self.participants:
            status, note = participant.bridge_check()
            checks[_scoped("bridge", participant)] = status
            bridges.append(status)
            if note is not None:
                notes[_scoped("last_poll", participant)] = note
        if self.history is not None:
            # The cause in words (unreachable, schema not migrated...), never "unreachable" while it answers.
            checks["database"] = self.history.database_status
        for participant in self.participants:
            lease_error = participant.lease.last_error if participant.lease is not None else None
            if lease_error is None:
                continue
            # Before any snapshot is written the lease is what meets the database first: say its cause.
            checks[_scoped("poller_lease", participant)] = lease_error
            if lease_error.startswith("UndefinedTable") and checks.get("database") in {"ok", "no write yet"}:
                checks["database"] = f"schema not migrated (run `dict-rate-limit migrate`): {lease_error}"
        if not self.multi:
            return all(value == "ok" for value in checks.values()), {**checks, **notes}
        others = [value for name, value in checks.items() if not name.startswith("bridge:")]
        return "ok" in bridges and all(value == "ok" for value in others), {**checks, **notes}

    def startup_state(self) -> tuple[bool, dict[str, str]]:
        """Started once the first poll was attempted, whatever its outcome (a Bridge outage is no crash);
        multi-participant: once every participant's was."""
        checks: dict[str, str] = {}
        started = True
        for participant in self.participants:
            lease = participant.lease
            if participant.poller.attempted == 0 and lease is not None and lease.decided:
                checks[_scoped("first_poll", participant)] = "another replica polls (follower)"
                continue
            attempted = participant.poller.attempted > 0
            started = started and attempted
            checks[_scoped("first_poll", participant)] = "done" if attempted else "pending"
        return started, checks


def _scoped(check: str, participant: ParticipantPoller) -> str:
    """A check's name, with the participant's after a colon in multi-participant mode."""
    return check if participant.name is None else f"{check}:{participant.name}"


def _participant_payload(participant: ParticipantPoller) -> dict[str, Any] | None:
    poller = participant.poller
    derived = poller.latest
    if derived is None:
        return None
    snapshot = derived.snapshot
    age = poller.age()
    return {
        "response_time": snapshot.response_time.astimezone(UTC).isoformat(timespec="milliseconds"),
        "correlation_id": snapshot.correlation_id,
        "category": snapshot.category,
        "participant_ispb": snapshot.participant_ispb or None,
        "stale": poller.is_stale(),
        "age_seconds": round(age, 3) if age is not None else None,
        "bridge_up": poller.consecutive_failures == 0,
        "policies": [_policy_json(state, participant.settings) for state in derived.states],
    }


def _unavailable(participant: ParticipantPoller) -> dict[str, Any]:
    """A participant without any successful poll, in the multi-participant /api/v1/policies."""
    why = participant.poller.last_error or "first poll pending"
    return {
        "status": "unavailable",
        "reason": f"no successful poll of the Bridge yet: {why}",
        "bridge_up": False,
        "policies": [],
    }


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


async def _known_policies(settings: ExporterSettings, participant: str) -> set[str]:
    """Policy names history saw recently, so a restart does not forget a policy that went missing."""
    import psycopg

    assert settings.database_url is not None
    try:
        async with await psycopg.AsyncConnection.connect(settings.database_url, connect_timeout=5) as conn:
            cursor = await conn.execute(KNOWN_POLICIES_SQL, (participant, KNOWN_POLICY_DAYS))
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
