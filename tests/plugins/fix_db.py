"""PostgreSQL fixtures: the machine's server (DATABASE_URL) and an embedded one; a fresh database per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from devstack.embedded import EmbeddedPostgres
from tests.support.env import unavailable


@pytest.fixture(scope="session")
def embedded_pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "data")
    try:
        url = server.start()
    except Exception as exc:  # pragma: no cover - the environment, not the code, is broken
        unavailable("embedded PostgreSQL", exc)
        raise
    yield url
    server.stop()


#: For the long tests about something else than PostgreSQL (Alertmanager clustering, process kills, fuzzing,
#: broker outages, the demo's end-to-end path): one server, the embedded one every machine has, instead of
#: both. Every storage behaviour they rely on is tested on both servers by the history and receiver tests;
#: running these twice cost about 2.5 minutes of CI for nothing they check.
ONE_SERVER = pytest.mark.parametrize("pg_server", ["embedded"], indirect=True)


def _server_params() -> list[str]:
    # Both servers in CI when the machine has one: the embedded server always, DATABASE_URL when given.
    return ["embedded", "external"] if os.environ.get("DATABASE_URL") else ["embedded"]


@pytest.fixture(scope="session", params=_server_params())
def pg_server(request: pytest.FixtureRequest) -> str:
    """URL of an administrative database on a real PostgreSQL server."""
    if request.param == "external":
        return os.environ["DATABASE_URL"]
    url: str = request.getfixturevalue("embedded_pg_server")
    return url


def _with_dbname(url: str, dbname: str) -> str:
    return psycopg.conninfo.make_conninfo(url, dbname=dbname)


@pytest.fixture
def database_url(pg_server: str) -> Iterator[str]:
    """A fresh, empty database for one test (dropped afterwards), so parallel runs never share tables."""
    name = f"drl_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield _with_dbname(pg_server, name)
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
