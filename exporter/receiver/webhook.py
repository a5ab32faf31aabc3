"""``dict-rate-limit receiver``: the Alertmanager webhook that records alerts and relays them to Pulsar.

``POST /alerts`` (RECEIVER_PORT) takes webhook payloads version 4, authenticated by a bearer token. Each
notification is recorded in one PostgreSQL transaction (alert rows + outbox rows) and answered 200 only
after the commit; 4xx for bad input (Alertmanager never retries those), 503 when the database is
unavailable (it retries). The outbox relay publishes to Pulsar in the background. ``/metrics`` is served
on METRICS_PORT, ``/health/*`` on HEALTH_CHECK_PORT (either may equal another port).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import psycopg
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from psycopg_pool import AsyncConnectionPool

from exporter import dsn, runtime
from exporter.config import ReceiverSettings
from exporter.receiver.metrics import MAX_KNOWN_POLICIES, ReceiverMetrics
from exporter.receiver.outbox import OutboxRelay, RelayTuning
from exporter.receiver.payload import PayloadError, WebhookPayload, parse_payload
from exporter.receiver.publisher import PulsarPublisher
from exporter.receiver.reconcile import Reconciler
from exporter.receiver.store import RecordResult, record_alerts
from exporter.web import limits as http_limits
from exporter.web import webconfig
from exporter.web.webconfig import WebConfig

log = logging.getLogger(__name__)

OUTBOX_TABLE = "dict_rate_limit_alert_outbox"
RECORD_FUNCTION = "dict_rate_limit_record_alerts(text[],jsonb,interval,text)"
KNOWN_POLICIES = "SELECT DISTINCT endpoint_id FROM dict_rate_limit_policies ORDER BY 1 LIMIT %s"
KNOWN_POLICIES_REFRESH_SECONDS = 60.0


#: The receiver cannot start (unmigrated database...); ``str()`` is the one line shown.
StartupError = runtime.StartupError


@dataclass
class ReceiverState:
    """What the handlers share; opened by :func:`_resources`, so it exists only while the app runs."""

    settings: ReceiverSettings
    metrics: ReceiverMetrics
    relay_tuning: RelayTuning | None
    limits: http_limits.HttpLimits
    pool: AsyncConnectionPool | None = None
    relay: OutboxRelay | None = None
    publisher: PulsarPublisher | None = None
    reconciler: Reconciler | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def start_tolerance(self) -> timedelta:
        return timedelta(seconds=self.settings.alert_start_tolerance_seconds)


STATE = web.AppKey("receiver_state", ReceiverState)


def check_settings(settings: ReceiverSettings) -> None:
    """Refuses what would run an insecure or useless receiver (ConfigError, exit code 2): the checks of the
    settings type (``config.ReceiverKeys``), also run for settings built without ``config.load``."""
    settings.validate()


def create_app(
    settings: ReceiverSettings,
    *,
    metrics: ReceiverMetrics | None = None,
    relay: RelayTuning | None = RelayTuning(),  # noqa: B008 - immutable default
    include_ops: bool = True,
    middlewares: Sequence[Any] = (),
) -> web.Application:
    """The webhook application; with ``include_ops`` also ``/metrics`` and ``/health/*``.

    ``relay=None`` runs no outbox relay (events stay queued in PostgreSQL until a relay runs).
    ``middlewares`` are the web configuration file's guard (``/alerts`` is exempt: it has its token).
    """
    check_settings(settings)
    app = web.Application(client_max_size=settings.webhook_max_body_bytes, middlewares=middlewares)
    app[STATE] = ReceiverState(settings, metrics or ReceiverMetrics(), relay, http_limits.limits_of(settings))
    app.cleanup_ctx.append(_resources)
    app.router.add_post("/alerts", handle_alerts)
    if include_ops:
        add_ops_routes(app)
    return app


def create_ops_app(
    webhook_app: web.Application,
    *,
    metrics: bool = True,
    health: bool = True,
    middlewares: Sequence[Any] = (),
) -> web.Application:
    """``/metrics`` and/or ``/health/*`` for another port, sharing the webhook app's state."""
    ops = web.Application(middlewares=middlewares)
    ops[STATE] = webhook_app[STATE]
    add_ops_routes(ops, metrics=metrics, health=health)
    return ops


def add_ops_routes(app: web.Application, *, metrics: bool = True, health: bool = True) -> None:
    if metrics:
        app.router.add_get("/", handle_landing)
        app.router.add_get(app[STATE].settings.web_telemetry_path, handle_metrics)
    if health:
        app.router.add_get("/health/live", handle_live)
        app.router.add_get("/health/startup", handle_live)
        app.router.add_get("/health/ready", handle_ready)


async def _resources(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    settings = state.settings
    assert settings.database_url is not None  # check_settings
    pool: AsyncConnectionPool = AsyncConnectionPool(
        settings.database_url,
        min_size=settings.database_min_connections,
        max_size=settings.database_max_connections,
        open=False,
        # How long a request waits for a pooled connection before answering 503 (Alertmanager retries).
        timeout=settings.database_connection_timeout,
        # No check at each checkout (a round trip per request): a connection the server dropped fails
        # its statement, the request is retried once on another connection (_record), and the pool
        # replaces the broken one. Autocommit: a notification is one statement (store.py, sql/0009), its
        # own transaction, with no BEGIN and COMMIT round trips around it.
        kwargs={
            "autocommit": True,
            "connect_timeout": dsn.connect_timeout(settings.database_connection_timeout),
        },
        name="receiver",
    )
    try:
        # A signal during this wait cancels start-up (exporter.runtime); the pool's workers go with it.
        await pool.open(wait=True, timeout=30)
    except BaseException:
        await pool.close(timeout=1)
        raise
    try:
        await _require_schema(pool)
        state.pool = pool
        if state.relay_tuning is not None:
            state.publisher = PulsarPublisher(
                settings.pulsar_url,
                settings.pulsar_topic,
                state.metrics,
                auth_token=settings.pulsar_auth_token,
                send_timeout_ms=state.relay_tuning.send_timeout_ms,
            )
            state.relay = OutboxRelay(
                settings.database_url, state.publisher, state.metrics, state.relay_tuning
            )
            state.tasks.append(asyncio.create_task(state.relay.run(), name="outbox-relay"))
        if (settings.alertmanager_url or "").strip().lower() != "off":
            explicit = [u for u in (settings.alertmanager_url or "").split(",") if u.strip()]
            state.reconciler = Reconciler(
                pool,
                explicit or None,  # None: the Alertmanagers that send notifications (externalURL)
                settings.alert_replica_labels,
                settings.reconcile_interval_seconds,
                settings.reconcile_grace_seconds,
            )
            state.tasks.append(
                asyncio.create_task(state.reconciler.run(lambda r: _recorded(state, r)), name="reconcile")
            )
        state.tasks.append(asyncio.create_task(_refresh_policies(state), name="known-policies"))
        yield
    finally:
        if state.reconciler is not None:
            await state.reconciler.stop()
        if state.relay is not None:
            await state.relay.stop()
        for task in state.tasks:
            if task.get_name() == "known-policies":
                task.cancel()
        for task in state.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if state.publisher is not None:
            await state.publisher.close()
        await pool.close()


async def _refresh_policies(state: ReceiverState) -> None:
    """Keeps the metrics' known policies in step with dict_rate_limit_policies (bounded label values)."""
    while True:
        if state.pool is not None:
            try:
                async with state.pool.connection() as conn:
                    cursor = await conn.execute(KNOWN_POLICIES, [MAX_KNOWN_POLICIES])
                    state.metrics.labels.set_known(row[0] for row in await cursor.fetchall())
            except psycopg.Error as exc:  # the webhook says so itself; this only refreshes labels
                log.info("known policies not refreshed", extra={"ctx": {"error": str(exc)}})
        await asyncio.sleep(KNOWN_POLICIES_REFRESH_SECONDS)


async def _require_schema(pool: AsyncConnectionPool) -> None:
    async with pool.connection() as conn:
        cursor = await conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL AND to_regprocedure(%s) IS NOT NULL",
            [OUTBOX_TABLE, RECORD_FUNCTION],
        )
        row = await cursor.fetchone()
    if row is None or not row[0]:
        raise StartupError("the database has no alert tables yet: run `dict-rate-limit migrate` first")


def _error(status: int, message: str, **extra: str) -> web.Response:
    return web.json_response({"status": "error", "error": message, **extra}, status=status)


def _authorized(request: web.Request, token: str | None) -> bool:
    if token is None:  # WEBHOOK_ALLOW_UNAUTHENTICATED
        return True
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    # aiohttp keeps undecodable header bytes as surrogates: encode them back, so a non-UTF-8 byte is a
    # wrong token (401), not a UnicodeEncodeError (500).
    presented = credentials.strip().encode("utf-8", "surrogateescape")
    return scheme.lower() == "bearer" and hmac.compare_digest(presented, token.encode())


async def handle_alerts(request: web.Request) -> web.Response:
    state = request.app[STATE]
    started = time.perf_counter()
    try:
        response = await _receive(request, state)
    except Exception:  # a bug: answered (and counted) as a 500, never an uncounted traceback from aiohttp
        log.exception("webhook request failed")
        response = _error(500, "internal error")
    state.metrics.webhook_requests.labels(str(response.status)).inc()
    state.metrics.observe("webhook", time.perf_counter() - started)
    return response


async def _receive(request: web.Request, state: ReceiverState) -> web.Response:
    if not _authorized(request, state.settings.webhook_bearer_token):
        response = _error(401, "missing or wrong bearer token")
        response.headers["WWW-Authenticate"] = 'Bearer realm="dict-rate-limit-receiver"'
        return response
    payload = await _payload(request, state)
    if isinstance(payload, web.Response):
        return payload
    if payload.truncated_alerts:
        state.metrics.truncated.inc(payload.truncated_alerts)
        log.warning(
            "Alertmanager truncated a notification: raise max_alerts of the webhook receiver",
            extra={"ctx": {"truncated_alerts": payload.truncated_alerts, "group_key": payload.group_key}},
        )
    try:
        result = await _record(state, payload)
    except psycopg.OperationalError as exc:
        log.warning("database unavailable: answering 503", extra={"ctx": {"error": str(exc)}})
        return _error(503, "database unavailable, retry later")
    except psycopg.DataError as exc:  # a value PostgreSQL refuses that validation let through: still input
        state.metrics.invalid_payloads.labels("invalid_field").inc()
        return _error(400, f"rejected by the database: {exc.diag.message_primary or exc}")
    except psycopg.Error:
        log.exception("recording alerts failed")
        return _error(500, "recording alerts failed")
    _recorded(state, result)
    if state.reconciler is not None and payload.external_url:
        state.reconciler.learn(payload.external_url)
    _log_result(payload, result)
    return web.json_response(
        {
            "status": "ok",
            "alerts": len(payload.alerts),
            "created": result.created,
            "resolved": result.resolved,
            "duplicates": result.duplicates,
        }
    )


async def _record(state: ReceiverState, payload: WebhookPayload) -> RecordResult:
    """Records the notification, again on another connection while the one it got turns out broken.

    Connections are not checked at checkout (a round trip per request): one the server closed while idle
    (a restart, a failover, an idle timeout) is found out here, fails at once, and the pool discards it.
    Repeating is safe: the statement is idempotent (a notification whose commit did happen before the
    connection broke finds its alerts and counts them as duplicates). After a database restart every idle
    connection is stale, so up to one attempt per pooled connection plus a new one.
    """
    assert state.pool is not None
    attempts = state.settings.database_max_connections + 1
    for attempt in range(1, attempts + 1):
        conn = None
        try:
            async with state.pool.connection() as conn:
                return await record_alerts(conn, payload.alerts, state.start_tolerance, payload.external_url)
        except psycopg.OperationalError as exc:
            if attempt == attempts or conn is None or not conn.broken:
                raise
            log.info("pooled connection broken: retrying on another", extra={"ctx": {"error": str(exc)}})
    raise AssertionError("unreachable")


def _recorded(state: ReceiverState, result: RecordResult) -> None:
    """After a commit: the seed counters, and the relay woken for the new events."""
    state.metrics.count_recorded(result)
    if result.transitions and state.relay is not None:
        state.relay.wake()


async def _payload(request: web.Request, state: ReceiverState) -> WebhookPayload | web.Response:
    limit = state.settings.webhook_max_body_bytes
    try:
        if request.content_length is not None and request.content_length > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
        body = await http_limits.read_body(request, state.limits)
    except TimeoutError:
        state.metrics.invalid_payloads.labels("too_slow").inc()
        return _error(
            408, f"body not received within HTTP_BODY_TIMEOUT_SECONDS ({state.limits.body_timeout:g} s)"
        )
    except web.HTTPRequestEntityTooLarge:
        state.metrics.invalid_payloads.labels("too_large").inc()
        return _error(413, f"body larger than WEBHOOK_MAX_BODY_BYTES ({limit} bytes)")
    try:
        return parse_payload(body, state.settings.alert_replica_labels)
    except PayloadError as exc:
        state.metrics.invalid_payloads.labels(exc.reason).inc()
        log.warning("invalid webhook payload", extra={"ctx": {"reason": str(exc)}})
        return _error(400, str(exc), field=exc.field)


def _log_result(payload: WebhookPayload, result: RecordResult) -> None:
    for transition in result.transitions:
        log.info(
            "alert %s",
            transition.kind,
            extra={
                "ctx": {
                    "endpoint_id": transition.endpoint_id,
                    "severity": transition.severity,
                    "group_key": payload.group_key,
                }
            },
        )


async def handle_metrics(request: web.Request) -> web.Response:
    # Rendered in a worker thread: a scrape never holds the event loop the webhook runs on.
    body = await asyncio.to_thread(generate_latest, request.app[STATE].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def handle_landing(request: web.Request) -> web.Response:
    path = request.app[STATE].settings.web_telemetry_path
    text = "dict-rate-limit receiver: POST /alerts (Alertmanager webhook), " + path
    text += ", /health/live, /health/ready"
    return web.Response(text=text + "\n")


async def handle_live(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def handle_ready(request: web.Request) -> web.Response:
    """Ready when PostgreSQL answers. Pulsar is reported but does not gate readiness: the outbox exists
    so that alerts are accepted during a broker outage, which an unready receiver would refuse."""
    state = request.app[STATE]
    database = await database_check(state)
    checks = {"database": database, "pulsar": pulsar_check(state)}
    ready = database == "ok"
    return web.json_response(
        {"status": "ok" if ready else "unavailable", "checks": checks}, status=200 if ready else 503
    )


async def database_check(state: ReceiverState) -> str:
    """ "ok" when a pooled connection answers within 2 s, else "down"."""
    if state.pool is not None:
        with contextlib.suppress(psycopg.Error):
            async with state.pool.connection(timeout=2.0) as conn:
                await conn.execute("SELECT 1")
                return "ok"
    return "down"


def pulsar_check(state: ReceiverState) -> str:
    if state.relay is None or state.publisher is None:
        return "disabled"
    if not state.relay.is_leader:
        return "standby"  # another replica publishes; this one takes over if it stops
    if state.publisher.connected() and state.relay.last_error is None:
        return "ok"
    return "down"


def tls_context(settings: ReceiverSettings) -> ssl.SSLContext | None:
    if not settings.receiver_tls_cert_file or not settings.receiver_tls_key_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.receiver_tls_cert_file, settings.receiver_tls_key_file)
    return context


def web_guard(settings: ReceiverSettings) -> tuple[WebConfig, list[Any]]:
    """The web configuration file and the middleware list it asks for (ConfigError when wrong)."""
    web_config = webconfig.load(settings.web_config_file)
    webconfig.check_ports(
        web_config, settings.metrics_listen[1], settings.health_check_port, settings.receiver_port
    )
    guard = [webconfig.middleware(web_config, exempt=("/alerts",))] if web_config.enabled else []
    return web_config, guard


async def _unless_stopped(work: Awaitable[None], stop: asyncio.Event) -> bool:
    """Runs ``work`` unless ``stop`` is set first (then cancels it): False when stopped.

    Start-up waits up to 30 s for the database; a caller's stop must end that wait at once (the process
    runtime also cancels start-up on SIGTERM/SIGINT).
    """
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if task.done():
        task.result()
        return True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return False


async def serve(
    settings: ReceiverSettings, stop: asyncio.Event, *, metrics: ReceiverMetrics | None = None
) -> None:
    """Serves the webhook and the ops ports until ``stop`` is set (also while still starting).

    The web configuration file (TLS, basic auth) applies to METRICS_PORT; a distinct HEALTH_CHECK_PORT
    is plain HTTP without authentication, so the kubelet's probes work whatever the file says.
    """
    web_config, guard = web_guard(settings)
    (metrics_host, metrics_port), health_port, webhook_port = (
        settings.metrics_listen,
        settings.health_check_port,
        settings.receiver_port,
    )
    shares = webhook_port in {metrics_port, health_port}
    app = create_app(settings, metrics=metrics, include_ops=shares, middlewares=guard)
    limits = app[STATE].limits
    runners = [http_limits.runner(app, limits)]
    if not await _unless_stopped(runners[0].setup(), stop):
        log.info("receiver stopped while starting")
        return
    try:
        host = settings.listen_host
        await http_limits.LimitedSite(
            runners[0], host, webhook_port, limits, ssl_context=tls_context(settings)
        ).start()
        ops: list[tuple[int, web.Application, ssl.SSLContext | None]] = []
        if metrics_port != webhook_port:
            both = health_port == metrics_port
            ops.append((metrics_port, create_ops_app(app, health=both, middlewares=guard), web_config.tls))
        if health_port not in {webhook_port, metrics_port}:
            ops.append((health_port, create_ops_app(app, metrics=False), None))
        for port, ops_app, tls in ops:
            runner = http_limits.runner(ops_app, limits)
            await runner.setup()
            runners.append(runner)
            bind = metrics_host if port == metrics_port else host
            await http_limits.LimitedSite(runner, bind, port, limits, ssl_context=tls).start()
        log.info(
            "receiver listening",
            extra={"ctx": {"webhook_port": webhook_port, "ops_ports": sorted(port for port, *_ in ops)}},
        )
        await stop.wait()
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


def run(settings: ReceiverSettings) -> int:
    """``dict-rate-limit receiver`` (signals and exit codes: :mod:`exporter.runtime`)."""
    check_settings(settings)
    return runtime.run(
        "receiver", lambda stop: serve(settings, stop), startup_errors=(psycopg.OperationalError,)
    )
