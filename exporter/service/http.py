"""HTTP endpoints of the exporter (aiohttp): /metrics, the landing page, the policies API and health.

Every handler reads state the poller already holds: no request ever calls the Bridge or the database.
"""

from __future__ import annotations

import json
from html import escape as html_escape
from typing import Any, Protocol

from aiohttp import web

from exporter.web.webconfig import WebConfig, middleware


class ExporterState(Protocol):
    """What the endpoints read from the running exporter (``app.ExporterService`` provides it); a protocol
    here keeps the HTTP layer free of the wiring module, which imports it."""

    version: str

    @property
    def health_port(self) -> int: ...

    @property
    def poll_interval_seconds(self) -> float: ...

    def metrics_body(self, *, gzip: bool, extra: bytes = b"") -> bytes: ...

    def policies_payload(self) -> dict[str, Any] | None: ...

    def liveness(self) -> tuple[bool, dict[str, str]]: ...

    def readiness(self) -> tuple[bool, dict[str, str]]: ...

    def startup_state(self) -> tuple[bool, dict[str, str]]: ...


SERVICE: web.AppKey[ExporterState] = web.AppKey("exporter_service")
#: The path the exposition is served on (``--web.telemetry-path``), for the landing page's link.
TELEMETRY_PATH: web.AppKey[str] = web.AppKey("telemetry_path")
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LANDING = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>DICT rate-limit exporter</title></head>
<body><h1>DICT rate-limit exporter</h1>
<p>Version {version}. Values are cached from one Bridge poll every {interval:g} s;
scrapes never call the Bridge.</p>
<ul>
<li><a href="{telemetry_path}">{telemetry_path}</a>: Prometheus exposition</li>
<li><a href="/api/v1/policies">/api/v1/policies</a>: the latest snapshot as JSON</li>
<li><a href="/health/live">/health/live</a>, <a href="/health/ready">/health/ready</a>,
<a href="/health/startup">/health/startup</a> (port {health_port})</li>
</ul></body></html>
"""


def _service(request: web.Request) -> ExporterState:
    return request.app[SERVICE]


def _json(payload: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(payload, separators=(",", ":"), allow_nan=False).encode(),
        status=status,
        content_type="application/json",
    )


def accepts_gzip(header: str) -> bool:
    """True when Accept-Encoding lists gzip without refusing it (``gzip;q=0``)."""
    for part in header.split(","):
        coding, _, params = part.partition(";")
        if coding.strip().lower() == "gzip":
            quality = params.strip().lower().removeprefix("q=").strip() or "1"
            try:
                return float(quality) > 0
            except ValueError:
                return False
    return False


async def metrics(request: web.Request) -> web.Response:
    gzip = accepts_gzip(request.headers.get("Accept-Encoding", ""))
    body = _service(request).metrics_body(gzip=gzip)
    headers = {"Content-Type": METRICS_CONTENT_TYPE, "Vary": "Accept-Encoding"}
    if gzip:
        headers["Content-Encoding"] = "gzip"
    return web.Response(body=body, headers=headers)


async def landing(request: web.Request) -> web.Response:
    service = _service(request)
    html = LANDING.format(
        version=service.version,
        interval=service.poll_interval_seconds,
        health_port=service.health_port,
        telemetry_path=html_escape(request.app.get(TELEMETRY_PATH, "/metrics")),
    )
    return web.Response(text=html, content_type="text/html")


async def policies(request: web.Request) -> web.Response:
    payload = _service(request).policies_payload()
    if payload is None:
        return _json({"status": "unavailable", "reason": "no successful poll of the Bridge yet"}, 503)
    return _json(payload)


async def live(request: web.Request) -> web.Response:
    status, checks = _service(request).liveness()
    return _json({"status": "ok" if status else "failed", "checks": checks}, 200 if status else 503)


async def ready(request: web.Request) -> web.Response:
    status, checks = _service(request).readiness()
    return _json({"status": "ok" if status else "unavailable", "checks": checks}, 200 if status else 503)


async def startup(request: web.Request) -> web.Response:
    status, checks = _service(request).startup_state()
    return _json({"status": "ok" if status else "starting", "checks": checks}, 200 if status else 503)


def add_metrics_routes(app: web.Application, telemetry_path: str = "/metrics") -> None:
    app[TELEMETRY_PATH] = telemetry_path
    app.router.add_get("/", landing)
    app.router.add_get(telemetry_path, metrics)
    app.router.add_get("/api/v1/policies", policies)


def add_health_routes(app: web.Application) -> None:
    app.router.add_get("/health/live", live)
    app.router.add_get("/health/ready", ready)
    app.router.add_get("/health/startup", startup)


def build_apps(
    service: ExporterState,
    metrics_port: int,
    health_port: int,
    web_config: WebConfig | None = None,
    *,
    telemetry_path: str = "/metrics",
) -> dict[int, web.Application]:
    """One application per distinct port: both route sets on one app when the ports are equal.

    The web configuration file guards the metrics port (basic auth there; the caller serves it with the
    file's TLS). A separate health port stays plain and open for the kubelet; on a shared port the
    ``/health/*`` paths are exempt from basic auth.
    """
    apps: dict[int, web.Application] = {}
    guard = [middleware(web_config)] if web_config is not None and web_config.enabled else []
    for port in (metrics_port, health_port):
        if port not in apps:
            app = web.Application(middlewares=guard if port == metrics_port else [])
            app[SERVICE] = service
            apps[port] = app
    add_metrics_routes(apps[metrics_port], telemetry_path)
    add_health_routes(apps[health_port])
    return apps
