"""Limits of the HTTP servers (exporter and receiver): connection cap, header, body and idle timeouts.

aiohttp on its own keeps a connection that never sends a request open for ever and accepts connections
until the process runs out of file descriptors (then nothing works: not the webhook, not /health, not the
database pool). :class:`LimitedSite` is a ``TCPSite`` whose protocol factory puts a guard in front of
aiohttp's handler: a connection beyond ``max_connections`` is closed at once, and one that has not sent
a complete request head within ``header_timeout`` of connecting is closed. Idle keep-alive connections
are closed by aiohttp after ``idle_timeout``; request bodies are read within ``body_timeout`` by
:func:`read_body`. Each site has its own cap, so a flood on the webhook port leaves /health on its own
port answering.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from exporter.config import Settings

log = logging.getLogger(__name__)

#: File descriptors kept free for everything else (database pool, Pulsar, logs, the listening sockets).
RESERVED_DESCRIPTORS = 128
#: A head larger than this without its blank line is not a request (aiohttp limits lines to 8 KB).
MAX_HEAD_BYTES = 128 * 1024


def default_max_connections() -> int:
    """A cap safely below this process's file-descriptor limit (and at most 4,096)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 4096
    return max(16, min(4096, soft - RESERVED_DESCRIPTORS))


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Per-server limits; the defaults suit Prometheus scrapes and Alertmanager webhooks."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    idle_timeout: float = 30.0
    max_connections: int = field(default_factory=default_max_connections)


def limits_of(settings: Settings) -> HttpLimits:
    """The HTTP_* keys of ``settings`` (HTTP_MAX_CONNECTIONS 0: :func:`default_max_connections`)."""
    return HttpLimits(
        header_timeout=settings.http_header_timeout_seconds,
        body_timeout=settings.http_body_timeout_seconds,
        idle_timeout=settings.http_idle_timeout_seconds,
        max_connections=settings.http_max_connections or default_max_connections(),
    )


class ConnectionGuard:
    """Counts a site's open connections; refuses beyond the cap and closes those too slow to ask."""

    def __init__(self, limits: HttpLimits) -> None:
        self.limits = limits
        self.active = 0
        self.refused = 0
        self.timed_out = 0

    def protocol_factory(self, inner_factory: Any) -> Any:
        def make() -> asyncio.Protocol:
            return _Guarded(inner_factory(), self)

        return make


class _Guarded(asyncio.Protocol):
    """Stands in front of aiohttp's RequestHandler and forwards every protocol call to it."""

    def __init__(self, inner: Any, guard: ConnectionGuard) -> None:
        self._inner = inner
        self._guard = guard
        self._counted = False
        self._head = b""
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # a TCP (or TLS) stream transport
        guard = self._guard
        if guard.active >= guard.limits.max_connections:
            guard.refused += 1
            log.warning(
                "HTTP connection refused: %d open connections is the cap (HTTP_MAX_CONNECTIONS)",
                guard.limits.max_connections,
            )
            transport.abort()
            return
        guard.active += 1
        self._counted = True
        self._transport = transport
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(guard.limits.header_timeout, self._too_slow)
        self._inner.connection_made(transport)

    def _too_slow(self) -> None:
        self._timer = None
        self._guard.timed_out += 1
        log.warning("HTTP connection closed: no complete request head within the header timeout")
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            self._head = (self._head + data)[-MAX_HEAD_BYTES:]
            if b"\r\n\r\n" in self._head:
                self._timer.cancel()
                self._timer = None
                self._head = b""
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        result: bool | None = self._inner.eof_received()
        return result

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._counted:
            return
        self._counted = False
        self._guard.active -= 1
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class LimitedSite(web.TCPSite):
    """``web.TCPSite`` with a :class:`ConnectionGuard` (see the module docstring)."""

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, limits: HttpLimits, **kwargs: Any
    ) -> None:
        super().__init__(runner, host, port, **kwargs)
        self.guard = ConnectionGuard(limits)

    async def start(self) -> None:
        self._runner._reg_site(self)  # what BaseSite.start does: the runner must know its sites
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self.guard.protocol_factory(server),
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port


def runner(app: web.Application, limits: HttpLimits) -> web.AppRunner:
    """An AppRunner whose connections idle out after ``limits.idle_timeout`` (aiohttp's keep-alive)."""
    return web.AppRunner(app, access_log=None, keepalive_timeout=limits.idle_timeout)


async def read_body(request: web.Request, limits: HttpLimits) -> bytes:
    """The request body, read within ``limits.body_timeout`` (a trickled body raises TimeoutError)."""
    async with asyncio.timeout(limits.body_timeout):
        return await request.read()
