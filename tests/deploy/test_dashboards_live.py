"""Every panel query of the dashboard runs against real data: Prometheus fed by the exporter, the receiver
and the simulator (default scenario, real traffic), and PostgreSQL written by the exporter's history.

A query fails on a parse error, and on an empty result unless its panel is one documented to be empty
in a healthy state (docs/dashboards.md, "Panels empty in a healthy state"); once a bucket is put below
CRITICAL, every panel, those included, must show data. Grafana's variables and
macros are replaced the way Grafana would: ``$__rate_interval`` by 15s, ``$policy``/``$category`` by
``.*`` (All) and by real values, the SQL macros by their PostgreSQL expansions.
"""

from __future__ import annotations

import json
import re
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from devstack.embedded import EmbeddedPulsar
from devstack.processes import http_get
from devstack.stack import Stack, Timings
from exporter.simulator.scenario import builtin_scenario
from tests.support.env import ROOT, require_binary
from tests.support.stack import ThreadedSimulator

pytestmark = pytest.mark.slow

DASHBOARD = json.loads((ROOT / "dashboards" / "dict-rate-limit.json").read_text(encoding="utf-8"))
#: Keep in step with docs/dashboards.md.
EMPTY_WHEN_HEALTHY = {
    "Exhaustion projection": "no bucket drains faster than it refills",
    "Active alerts": "nothing fires",
    "Alerts created / resolved": "the receiver's counters appear with the first alert",
    "Alert history (PostgreSQL)": "no alert was ever recorded",
}
# The identifying variables at All (their allValue); the demo's Prometheus adds no cluster/namespace.
#: participant: All (".*"), which also matches the demo's single-participant exporter (no such label).
IDENTITY = {"job": ".+", "cluster": ".*", "namespace": ".*", "participant": ".*"}
SELECTIONS = [
    {**IDENTITY, "policy": ".*", "category": ".*"},  # All
    {**IDENTITY, "policy": "ENTRIES_WRITE", "category": "A"},
]
TIMINGS = Timings(
    poll_interval=1.0,
    poll_lead=0.1,
    scrape_interval=1.0,
    evaluation_interval=1.0,
    alert_for={"DICTRateLimitWarning": "2s", "DICTRateLimitCritical": "2s"},
)


def panels() -> list[dict[str, Any]]:
    return [p for p in DASHBOARD["panels"] if p["type"] != "row"]


def promql(expr: str, selection: dict[str, str]) -> str:
    text = expr.replace("$__rate_interval", "15s")
    for name, value in selection.items():
        text = text.replace(f"${name}", value)
    assert "$" not in text, text
    return text


def prometheus_query(stack: Stack, expr: str) -> tuple[int, dict[str, Any]]:
    url = f"http://127.0.0.1:{stack.ports.prometheus}/api/v1/query?query={urllib.parse.quote(expr, safe='')}"
    status, body = http_get(url, timeout=5)
    return status, json.loads(body)


@dataclass(frozen=True)
class Outcome:
    """One query of one panel under one selection: its error, if any, and whether it returned data."""

    panel: str
    where: str
    error: str | None
    has_data: bool


def prometheus_outcomes(stack: Stack) -> list[Outcome]:
    outcomes = []
    for panel in panels():
        for target in panel["targets"]:
            if target["datasource"]["type"] != "prometheus":
                continue
            for selection in SELECTIONS:
                status, answer = prometheus_query(stack, promql(target["expr"], selection))
                where = f"{panel['title']} [{target['refId']}] {selection}"
                if status != 200 or answer["status"] != "success":
                    outcomes.append(Outcome(panel["title"], where, str(answer.get("error", status)), False))
                else:
                    outcomes.append(Outcome(panel["title"], where, None, bool(answer["data"]["result"])))
    return outcomes


def sql_text(raw: str, policies: list[str], categories: list[str]) -> sql.Composed:
    """Grafana's PostgreSQL macro expansion, with values as literals (as Grafana sends them)."""
    grouped = re.sub(
        r"\$__timeGroupAlias\((\w+), \$__interval\)", r'floor(extract(epoch from \1)/60)*60 AS "time"', raw
    )
    filtered = re.sub(r"\$__timeFilter\((\w+)\)", r"\1 BETWEEN {time_from} AND {time_to}", grouped)
    template = filtered.replace("($policy)", "({policies})").replace("($category)", "({categories})")
    assert "$" not in template, template
    now = datetime.now(UTC)
    return sql.SQL(template).format(  # type: ignore[arg-type] # the template is the dashboard's own SQL
        time_from=sql.Literal(now - timedelta(hours=6)),
        time_to=sql.Literal(now + timedelta(minutes=1)),
        policies=sql.SQL(", ").join(sql.Literal(p) for p in policies),
        categories=sql.SQL(", ").join(sql.Literal(c) for c in categories),
    )


def sql_outcomes(database_url: str) -> list[Outcome]:
    outcomes = []
    with psycopg.connect(database_url, autocommit=True) as conn:
        for panel in panels():
            for target in panel["targets"]:
                if target["datasource"]["type"] == "prometheus":
                    continue
                for policies in (["ENTRIES_WRITE", "CIDS_FILES_WRITE"], ["CIDS_FILES_WRITE"]):
                    where = f"{panel['title']} {policies}"
                    try:
                        rows = conn.execute(sql_text(target["rawSql"], policies, ["A"])).fetchall()
                    except psycopg.Error as exc:
                        outcomes.append(Outcome(panel["title"], where, str(exc), False))
                    else:
                        outcomes.append(Outcome(panel["title"], where, None, bool(rows)))
    return outcomes


def healthy_problems(outcomes: list[Outcome]) -> list[str]:
    """Errors, and empty results outside the panels documented to be empty in a healthy state."""
    return [
        f"{o.where}: {o.error or 'empty'}"
        for o in outcomes
        if o.error or (not o.has_data and o.panel not in EMPTY_WHEN_HEALTHY)
    ]


def panels_without_data(outcomes: list[Outcome]) -> list[str]:
    """Panels none of whose queries returned anything."""
    with_data = {o.panel for o in outcomes if o.has_data}
    return sorted({o.panel for o in outcomes} - with_data)


def retry(check: Callable[[], list[str]], timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    problems = check()
    while problems and time.monotonic() < deadline:
        time.sleep(1)
        problems = check()
    return problems


@pytest.fixture
def live_simulator() -> Iterator[ThreadedSimulator]:
    simulator = ThreadedSimulator(builtin_scenario("default"))
    yield simulator
    simulator.stop()


@pytest.fixture
def running_stack(
    tmp_path: Path, database_url: str, pulsar_broker: EmbeddedPulsar, live_simulator: ThreadedSimulator
) -> Iterator[Stack]:
    require_binary("prometheus")
    require_binary("prometheus-alertmanager")
    stack = Stack(tmp_path / "stack", TIMINGS, topic=f"persistent://lb-conn/dict/live-{uuid.uuid4().hex[:8]}")
    try:
        stack.start(
            database_url=database_url, pulsar_url=pulsar_broker.url, bridge_address=live_simulator.start()
        )
        yield stack
    finally:
        stack.stop()


def test_every_panel_and_variable_query_returns_data_on_a_live_stack(
    running_stack: Stack, database_url: str, live_simulator: ThreadedSimulator
) -> None:
    # One stack for all checks: starting it costs more than the checks.
    found = variable_values(running_stack)
    # Every job serving the product is offered, whatever it is named (not only dict-rate-limit-*).
    assert {"dict-rate-limit-exporter", "dict-rate-limit-receiver"} <= set(found["job"])
    assert found["category"] == ["A"]
    assert found["participant"] == []  # a single-participant exporter: no label, All still selects it
    assert {"ENTRIES_WRITE", "CLAIMS_READ", "PERSONS_STATISTICS_READ"} <= set(found["policy"])

    # Healthy: rate() over 15 s needs a few scrapes of the counters; retry until the data is there.
    def healthy() -> list[str]:
        return healthy_problems(prometheus_outcomes(running_stack) + sql_outcomes(database_url))

    assert retry(healthy, 45) == []

    # Unhealthy: a bucket below CRITICAL (and the scenario's ENTRIES_WRITE drain from 20 s) fill the panels
    # that are empty in a healthy state, which proves their queries match what the receiver and rules emit.
    live_simulator.set_tokens(10)

    def any_empty() -> list[str]:
        outcomes = prometheus_outcomes(running_stack) + sql_outcomes(database_url)
        return [f"{o.where}: {o.error}" for o in outcomes if o.error] + panels_without_data(outcomes)

    assert retry(any_empty, 60) == []


def variable_values(running_stack: Stack) -> dict[str, list[str]]:
    """What Grafana's label_values() variable queries list, through Prometheus' label values API."""
    variables = {v["name"]: v["query"] for v in DASHBOARD["templating"]["list"] if v["type"] == "query"}
    base = f"http://127.0.0.1:{running_stack.ports.prometheus}/api/v1"
    found: dict[str, list[str]] = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(found.get("policy", [])) < 20:
        for name, query in variables.items():
            match = re.fullmatch(r"label_values\((.+), (\w+)\)", query)
            assert match, query
            selector = match.group(1).replace("$category", ".*")
            for variable, value in IDENTITY.items():
                selector = selector.replace(f"${variable}", value)
            url = f"{base}/label/{match.group(2)}/values?match[]={urllib.parse.quote(selector, safe='')}"
            status, body = http_get(url)
            assert status == 200, body
            found[name] = json.loads(body)["data"]
        time.sleep(0.5)
    return found
