"""Fixtures of the report tests: a migrated database holding the exact scenario (built once per module,
it is 470 000 rows) and a runner of the real ``dict-rate-limit report`` command."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from exporter import cli
from exporter.history import migrations
from tests.report.report_scenario import load_exact_scenario


def _create(pg_server: str) -> str:
    name = f"drl_report_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return name


def _drop(pg_server: str, name: str) -> None:
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def scenario_url(pg_server: str) -> Iterator[str]:
    """A migrated database with the exact scenario of report_scenario.py."""
    name = _create(pg_server)
    url = psycopg.conninfo.make_conninfo(pg_server, dbname=name)
    migrations.apply(url)
    load_exact_scenario(url)
    yield url
    _drop(pg_server, name)


@pytest.fixture
def migrated_url(database_url: str) -> str:
    migrations.apply(database_url)
    return database_url


RunReport = Callable[..., tuple[int, str]]


@pytest.fixture
def run_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> RunReport:
    """Runs the command through the console script's main(); returns (exit code, stderr).

    ``"--database-url", URL`` among the arguments becomes the environment's DATABASE_URL (secrets have no
    command-line flag: they would show in ``ps``); without it DATABASE_URL is unset."""

    def run(*args: str) -> tuple[int, str]:
        words = list(args)
        monkeypatch.delenv("DATABASE_URL", raising=False)
        if "--database-url" in words:
            at = words.index("--database-url")
            monkeypatch.setenv("DATABASE_URL", words[at + 1])
            del words[at : at + 2]
        code = cli.main(["report", "--log-level", "warning", *words])
        return code, capsys.readouterr().err

    return run


@pytest.fixture
def report_json(run_report: RunReport, tmp_path: Path) -> Callable[..., dict[str, Any]]:
    def run(url: str, *args: str) -> dict[str, Any]:
        output = tmp_path / f"report-{uuid.uuid4().hex[:6]}.json"
        code, err = run_report("--database-url", url, "--format", "json", "--output", str(output), *args)
        assert code == 0, err
        loaded: dict[str, Any] = json.loads(output.read_text(encoding="utf-8"))
        return loaded

    return run
