"""The exporter's HTTP servers under a connection flood (real sockets, the real Bridge simulator): stalled
connections are closed after the header timeout, connections beyond the cap at once, /metrics and /health
keep answering; and readiness names a database that refuses writes for a missing schema, not "unreachable"."""

from __future__ import annotations

import asyncio
from typing import Any

from exporter.simulator.server import SimulatorServer
from tests.service.test_exporter_service import http, settings_for, sim, start  # noqa: F401 - fixtures


async def _stalled(port: int, count: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    return [await asyncio.open_connection("127.0.0.1", port) for _ in range(count)]


async def _closed(connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]], within: float) -> int:
    async def one(reader: asyncio.StreamReader) -> bool:
        try:
            return await asyncio.wait_for(reader.read(1), within) == b""
        except (TimeoutError, ConnectionError):
            return False

    return sum(await asyncio.gather(*(one(reader) for reader, _ in connections)))


async def test_a_flood_of_stalled_connections_is_capped_and_timed_out_while_scrapes_answer(
    sim: SimulatorServer,  # noqa: F811
    start: Any,  # noqa: F811
) -> None:
    running = await start(
        settings_for(sim.address, http_max_connections=100, http_header_timeout_seconds=2.0)
    )
    flood = await _stalled(running.service.ports["metrics"], 250)
    assert await _closed(flood, within=1.0) >= 140  # beyond the cap of 100: closed at once
    health_flood = await _stalled(running.service.ports["health"], 50)
    status, _ = await running.status("/health/live")  # its own port, its own cap
    assert status == 200
    assert await _closed(flood + health_flood, within=15) == 300  # the rest after the header timeout
    assert "dict_rate_limit_bridge_up" in await running.text()
    for _, writer in flood + health_flood:
        writer.close()


async def test_readiness_says_schema_not_migrated_not_unreachable(
    sim: SimulatorServer,  # noqa: F811
    start: Any,  # noqa: F811
    database_url: str,
) -> None:
    running = await start(settings_for(sim.address, database_url=database_url))
    body: dict[str, Any] = {}
    for _ in range(100):
        _, body = await running.status("/health/ready")
        if body["checks"].get("database", "ok") not in {"ok", "no write yet"}:
            break
        await asyncio.sleep(0.1)
    assert body["checks"]["database"].startswith("schema not migrated (run `dict-rate-limit migrate`)")
