"""``dict-rate-limit all-in-one``: the exporter and the receiver in one process, for small installations.

The exporter polls and serves as ``dict-rate-limit exporter`` does; the receiver's webhook listens on
RECEIVER_PORT. One ``/metrics`` (METRICS_PORT) carries both parts' series (the seed histogram
``dict_rate_limit_monitoring_duration_seconds`` once, with every operation), and ``/health/ready``
(HEALTH_CHECK_PORT) is ready when both parts are. Both need DATABASE_URL; the webhook needs its token.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import signal
import sys

import psycopg
from aiohttp import web
from prometheus_client import generate_latest

from exporter import http_limits
from exporter.config import Settings
from exporter.receiver import webhook as receiver
from exporter.receiver.metrics import ReceiverMetrics
from exporter.service import http as exporter_web
from exporter.service.app import ExporterService

log = logging.getLogger(__name__)

SERVICE = exporter_web.SERVICE
RECEIVER = receiver.STATE


async def metrics(request: web.Request) -> web.Response:
    service, state = request.app[SERVICE], request.app[RECEIVER]
    body = service.metrics_body(gzip=False) + generate_latest(state.metrics.registry)
    headers = {"Content-Type": exporter_web.METRICS_CONTENT_TYPE, "Vary": "Accept-Encoding"}
    if exporter_web.accepts_gzip(request.headers.get("Accept-Encoding", "")):
        body = gzip.compress(body, compresslevel=1)
        headers["Content-Encoding"] = "gzip"
    return web.Response(body=body, headers=headers)


async def ready(request: web.Request) -> web.Response:
    service, state = request.app[SERVICE], request.app[RECEIVER]
    exporter_ok, checks = service.readiness()
    database = await receiver.database_check(state)
    checks = {**checks, "receiver_database": database, "pulsar": receiver.pulsar_check(state)}
    ok = exporter_ok and database == "ok"
    return web.json_response(
        {"status": "ok" if ok else "unavailable", "checks": checks}, status=200 if ok else 503
    )


def build_apps(
    service: ExporterService, webhook: web.Application, settings: Settings
) -> dict[int, web.Application]:
    """One application per distinct port; the webhook app takes the other roles when ports coincide."""
    apps: dict[int, web.Application] = {settings.receiver_port: webhook}
    webhook[SERVICE] = service
    for port in (settings.metrics_port, settings.health_check_port):
        if port not in apps:
            app = web.Application()
            app[SERVICE], app[RECEIVER] = service, webhook[RECEIVER]
            apps[port] = app
    metrics_app, health_app = apps[settings.metrics_port], apps[settings.health_check_port]
    metrics_app.router.add_get("/", exporter_web.landing)
    metrics_app.router.add_get("/metrics", metrics)
    metrics_app.router.add_get("/api/v1/policies", exporter_web.policies)
    health_app.router.add_get("/health/live", exporter_web.live)
    health_app.router.add_get("/health/startup", exporter_web.startup)
    health_app.router.add_get("/health/ready", ready)
    return apps


async def serve(settings: Settings, stop: asyncio.Event) -> int:
    """Runs both parts until ``stop`` is set; 1 when a port cannot be bound."""
    receiver.check_settings(settings)
    service = ExporterService(settings, serve_http=False)
    webhook = receiver.create_app(
        settings, metrics=ReceiverMetrics(observe=service.metrics.observe), include_ops=False
    )
    apps = build_apps(service, webhook, settings)
    runners: list[web.AppRunner] = []
    limits = http_limits.limits_of(settings)
    try:
        for port, app in apps.items():  # the webhook app first: its start-up opens the database and relay
            runner = http_limits.runner(app, limits)
            await runner.setup()
            runners.append(runner)
            tls = receiver.tls_context(settings) if app is webhook else None
            await http_limits.LimitedSite(runner, settings.listen_host, port, limits, ssl_context=tls).start()
        await service.start()
    except BaseException as exc:
        for runner in reversed(runners):
            await runner.cleanup()
        if isinstance(exc, OSError):
            log.error("cannot serve HTTP on %s: %s", settings.listen_host, exc)
            return 1
        raise
    log.info("all-in-one started", extra={"ctx": {"ports": sorted(apps)}})
    try:
        await stop.wait()
    finally:
        await service.stop()
        for runner in reversed(runners):
            await runner.cleanup()
    return 0


def run(settings: Settings) -> int:
    """Entry point of ``dict-rate-limit all-in-one``."""
    receiver.check_settings(settings)

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        return await serve(settings, stop)

    try:
        return asyncio.run(main())
    except (receiver.StartupError, psycopg.OperationalError) as exc:
        log.error("all-in-one cannot start: %s", exc)
        print(f"dict-rate-limit all-in-one: cannot start: {exc}", file=sys.stderr)
        return 1
