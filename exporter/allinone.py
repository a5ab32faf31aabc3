"""``dict-rate-limit all-in-one``: the exporter and the receiver in one process, for small installations.

The exporter polls and serves as ``dict-rate-limit exporter`` does; the receiver's webhook listens on
RECEIVER_PORT. One ``/metrics`` (METRICS_PORT) carries both parts' series (the seed histogram
``dict_rate_limit_monitoring_duration_seconds`` once, with every operation), and ``/health/ready``
(HEALTH_CHECK_PORT) is ready when both parts are. Both need DATABASE_URL; the webhook needs its token.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import psycopg
from aiohttp import web
from prometheus_client import generate_latest

from exporter import runtime
from exporter.config import AllInOneSettings
from exporter.receiver import webhook as receiver
from exporter.receiver.metrics import ReceiverMetrics
from exporter.service import http as exporter_web
from exporter.service.app import ExporterService
from exporter.telemetry import new_registry
from exporter.web import limits as http_limits

log = logging.getLogger(__name__)

SERVICE = exporter_web.SERVICE
RECEIVER = receiver.STATE


async def metrics(request: web.Request) -> web.Response:
    service, state = request.app[SERVICE], request.app[RECEIVER]
    compress = exporter_web.accepts_gzip(request.headers.get("Accept-Encoding", ""))
    # The bucket part stays pre-compressed; only the per-scrape tail (both parts' own series) is new.
    body = service.metrics_body(gzip=compress, extra=generate_latest(state.metrics.registry))
    headers = {"Content-Type": exporter_web.METRICS_CONTENT_TYPE, "Vary": "Accept-Encoding"}
    if compress:
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
    service: ExporterService,
    webhook: web.Application,
    settings: AllInOneSettings,
    guard: Sequence[Any] = (),
) -> dict[int, web.Application]:
    """One application per distinct port; the webhook app takes the other roles when ports coincide.

    ``guard`` (the web configuration file's middleware) goes on the metrics port's app; a distinct
    health port stays open for the kubelet.
    """
    apps: dict[int, web.Application] = {settings.receiver_port: webhook}
    webhook[SERVICE] = service
    metrics_port = settings.metrics_listen[1]
    for port in (metrics_port, settings.health_check_port):
        if port not in apps:
            app = web.Application(middlewares=guard if port == metrics_port else ())
            app[SERVICE], app[RECEIVER] = service, webhook[RECEIVER]
            apps[port] = app
    metrics_app, health_app = apps[metrics_port], apps[settings.health_check_port]
    metrics_app[exporter_web.TELEMETRY_PATH] = settings.web_telemetry_path
    metrics_app.router.add_get("/", exporter_web.landing)
    metrics_app.router.add_get(settings.web_telemetry_path, metrics)
    metrics_app.router.add_get("/api/v1/policies", exporter_web.policies)
    health_app.router.add_get("/health/live", exporter_web.live)
    health_app.router.add_get("/health/startup", exporter_web.startup)
    health_app.router.add_get("/health/ready", ready)
    return apps


async def serve(settings: AllInOneSettings, stop: asyncio.Event) -> None:
    """Runs both parts until ``stop`` is set; a port that cannot be bound ends start-up (OSError)."""
    receiver.check_settings(settings)
    service = ExporterService(settings, serve_http=False)
    web_config, guard = receiver.web_guard(settings)
    webhook = receiver.create_app(
        settings,
        # process_* come once, from the exporter's registry; the seed histogram once, from the exporter's.
        metrics=ReceiverMetrics(registry=new_registry(process=False), observe=service.metrics.observe),
        include_ops=False,
        middlewares=guard if settings.receiver_port == settings.metrics_listen[1] else (),
    )
    apps = build_apps(service, webhook, settings, guard)
    runners: list[web.AppRunner] = []
    limits = http_limits.limits_of(settings)
    try:
        for port, app in apps.items():  # the webhook app first: its start-up opens the database and relay
            runner = http_limits.runner(app, limits)
            await runner.setup()
            runners.append(runner)
            if app is webhook:
                tls = receiver.tls_context(settings)
            else:
                tls = web_config.tls if port == settings.metrics_listen[1] else None
            host = settings.metrics_listen[0] if port == settings.metrics_listen[1] else settings.listen_host
            await http_limits.LimitedSite(runner, host, port, limits, ssl_context=tls).start()
        await service.start()
    except BaseException:
        for runner in reversed(runners):
            await runner.cleanup()
        raise
    log.info("all-in-one started", extra={"ctx": {"ports": sorted(apps)}})
    try:
        await stop.wait()
    finally:
        await service.stop()
        for runner in reversed(runners):
            await runner.cleanup()


def run(settings: AllInOneSettings) -> int:
    """Entry point of ``dict-rate-limit all-in-one`` (signals and exit codes: :mod:`exporter.runtime`)."""
    receiver.check_settings(settings)
    return runtime.run(
        "all-in-one", lambda stop: serve(settings, stop), startup_errors=(psycopg.OperationalError,)
    )
