"""The seeds' pool keys, DATABASE_MIN_CONNECTIONS and DATABASE_CONNECTION_TIMEOUT, as the receiver applies
them on a real PostgreSQL: connections kept open, and how long a request waits for one before its 503."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from exporter import config
from exporter.config import ConfigError, ReceiverSettings
from exporter.receiver.webhook import STATE, create_app
from tests.support.receiver import AUTH, TOKEN, alert, migrate, payload

Client = TestClient[Any, Any]
MakeClient = Callable[[web.Application], Awaitable[Client]]


def _settings(database_url: str, **changes: Any) -> ReceiverSettings:
    return ReceiverSettings(
        database_url=database_url, webhook_bearer_token=TOKEN, alertmanager_url="off", **changes
    )


def _connections(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
    return int(row[0]) if row else 0


@pytest.mark.parametrize("minimum", [1, 4])
async def test_the_pool_keeps_database_min_connections_open(
    aiohttp_client: MakeClient, database_url: str, minimum: int
) -> None:
    migrate(database_url)
    await aiohttp_client(create_app(_settings(database_url, database_min_connections=minimum), relay=None))
    for _ in range(100):  # the pool fills in the background: up to 10 s
        if _connections(database_url) >= minimum:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)  # and no more than that once idle
    assert _connections(database_url) == minimum


async def test_a_request_waits_database_connection_timeout_for_a_pooled_connection_then_gets_503(
    aiohttp_client: MakeClient, database_url: str
) -> None:
    migrate(database_url)
    settings = _settings(database_url, database_max_connections=1, database_connection_timeout=1.5)
    client = await aiohttp_client(create_app(settings, relay=None))
    pool = client.server.app[STATE].pool
    assert pool is not None
    async with pool.connection():  # the only connection, busy elsewhere
        started = time.monotonic()
        response = await client.post("/alerts", json=payload(alert("firing")), headers=AUTH)
        waited = time.monotonic() - started
    assert response.status == 503
    assert 1.4 <= waited < 4.5  # the key's 1.5 s, not the former fixed 5 s
    response = await client.post("/alerts", json=payload(alert("firing")), headers=AUTH)
    assert response.status == 200  # free again: recorded


@pytest.mark.parametrize(
    ("raw", "seconds"), [("30s", 30.0), ("1500ms", 1.5), ("2m", 120.0), ("7", 7.0), ("2.5", 2.5)]
)
def test_the_connection_timeout_takes_seconds_or_a_go_style_duration(raw: str, seconds: float) -> None:
    environ = {"DATABASE_URL": "postgresql:///x", "WEBHOOK_BEARER_TOKEN": "t"}
    loaded = config.load("receiver", environ={**environ, "DATABASE_CONNECTION_TIMEOUT": raw})
    assert loaded.database_connection_timeout == seconds


@pytest.mark.parametrize(
    ("environ", "key"),
    [
        ({"DATABASE_CONNECTION_TIMEOUT": "forever"}, "DATABASE_CONNECTION_TIMEOUT"),
        ({"DATABASE_CONNECTION_TIMEOUT": "10ms"}, "DATABASE_CONNECTION_TIMEOUT"),
        ({"DATABASE_MIN_CONNECTIONS": "-1"}, "DATABASE_MIN_CONNECTIONS"),
        ({"DATABASE_MIN_CONNECTIONS": "11", "DATABASE_MAX_CONNECTIONS": "10"}, "DATABASE_MIN_CONNECTIONS"),
    ],
)
def test_wrong_pool_keys_are_configuration_errors_naming_the_key(environ: dict[str, str], key: str) -> None:
    base = {"DATABASE_URL": "postgresql:///x", "WEBHOOK_BEARER_TOKEN": "t"}
    with pytest.raises(ConfigError) as caught:
        config.load("receiver", environ={**base, **environ})
    assert caught.value.key == key
