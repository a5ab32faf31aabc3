"""Shared fixtures: real PostgreSQL (the machine's via DATABASE_URL, and an embedded one), a real Pulsar
broker, and the rule that a missing real component fails the run under CI=true instead of skipping."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from exporter.embedded import EmbeddedPostgres, EmbeddedPulsar

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def require_binary(name: str) -> str:
    """Path of a real tool (promtool, amtool, prometheus...). Missing: a failure in CI, a skip elsewhere."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (run `make test`, which installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message + "; CI fails here instead of skipping")
    return path


@pytest.fixture(scope="session")
def embedded_pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "data")
    try:
        url = server.start()
    except Exception as exc:  # pragma: no cover - the environment, not the code, is broken
        if IN_CI:
            pytest.fail(f"embedded PostgreSQL did not start: {exc}")
        pytest.skip(f"embedded PostgreSQL did not start: {exc}; CI fails here instead of skipping")
    yield url
    server.stop()


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


@pytest.fixture(scope="session")
def pulsar_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPulsar]:
    """A real Pulsar broker (pulsar-lite) on loopback for the whole session."""
    broker = EmbeddedPulsar(tmp_path_factory.mktemp("pulsar"))
    try:
        broker.start()
    except Exception as exc:  # pragma: no cover
        if IN_CI:
            pytest.fail(f"embedded Pulsar broker did not start: {exc}")
        pytest.skip(f"embedded Pulsar broker did not start: {exc}; CI fails here instead of skipping")
    yield broker
    broker.stop()
