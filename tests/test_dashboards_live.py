"""Every panel query of the dashboard runs against real data: Prometheus fed by the exporter, the receiver
and the simulator (default scenario, real traffic), and PostgreSQL written by the exporter's history.

A query fails on a parse error, and on an empty result unless its panel is one documented to be empty
in a healthy state (docs/dashboards.md, "Panels empty in a healthy state"). Grafana's variables and
macros are replaced the way Grafana would: ``$__rate_interval`` by 15s, ``$policy``/``$category`` by
``.*`` (All) and by real values, the SQL macros by their PostgreSQL expansions.
"""

from __future__ import annotations

import json
import re
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import ROOT, require_binary
from psycopg import sql
from stack_support import ThreadedSimulator

from exporter.embedded import EmbeddedPulsar
from exporter.processes import http_get
from exporter.scenario import builtin_scenario
from exporter.stack import Stack, Timings

pytestmark = pytest.mark.slow

DASHBOARD = json.loads((ROOT / "dashboards" / "dict-rate-limit.json").read_text(encoding="utf-8"))
#: Keep in step with docs/dashboards.md.
EMPTY_WHEN_HEALTHY = {
    "Exhaustion projection": "no bucket drains faster than it refills",
    "Active alerts": "nothing fires",
    "Alerts created / resolved": "the receiver's counters appear with the first alert",
    "Alert history (PostgreSQL)": "no alert was ever recorded",
}
SELECTIONS = [
    {"policy": ".*", "category": ".*"},  # All
    {"policy": "ENTRIES_WRITE", "category": "A"},
]
TIMINGS = Timings(poll_interval=1.0, poll_lead=0.1, scrape_interval=1.0, evaluation_interval=1.0)


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


def prometheus_problems(stack: Stack) -> list[str]:
    problems = []
    for panel in panels():
        for target in panel["targets"]:
            if target["datasource"]["type"] != "prometheus":
                continue
            for selection in SELECTIONS:
                status, answer = prometheus_query(stack, promql(target["expr"], selection))
                where = f"{panel['title']} [{target['refId']}] {selection}"
                if status != 200 or answer["status"] != "success":
                    problems.append(f"{where}: {answer.get('error', status)}")
                elif not answer["data"]["result"] and panel["title"] not in EMPTY_WHEN_HEALTHY:
                    problems.append(f"{where}: empty")
    return problems


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


def sql_problems(database_url: str) -> list[str]:
    problems = []
    with psycopg.connect(database_url, autocommit=True) as conn:
        for panel in panels():
            for target in panel["targets"]:
                if target["datasource"]["type"] == "prometheus":
                    continue
                for policies in (["ENTRIES_WRITE", "CLAIMS_READ"], ["ENTRIES_WRITE"]):
                    query = sql_text(target["rawSql"], policies, ["A"])
                    try:
                        rows = conn.execute(query).fetchall()
                    except psycopg.Error as exc:
                        problems.append(f"{panel['title']}: {exc}")
                        continue
                    if not rows and panel["title"] not in EMPTY_WHEN_HEALTHY:
                        problems.append(f"{panel['title']} {policies}: no rows")
    return problems


@pytest.fixture
def running_stack(tmp_path: Path, database_url: str, pulsar_broker: EmbeddedPulsar) -> Iterator[Stack]:
    require_binary("prometheus")
    require_binary("prometheus-alertmanager")
    simulator = ThreadedSimulator(builtin_scenario("default"))
    stack = Stack(tmp_path / "stack", TIMINGS, topic=f"persistent://lb-conn/dict/live-{uuid.uuid4().hex[:8]}")
    try:
        stack.start(database_url=database_url, pulsar_url=pulsar_broker.url, bridge_address=simulator.start())
        yield stack
    finally:
        stack.stop()
        simulator.stop()


def test_every_panel_and_variable_query_returns_data_on_a_live_stack(
    running_stack: Stack, database_url: str
) -> None:
    # One stack for both checks: starting it costs more than the checks.
    found = variable_values(running_stack)
    assert found["category"] == ["A"]
    assert {"ENTRIES_WRITE", "CLAIMS_READ", "PERSONS_STATISTICS_READ"} <= set(found["policy"])
    # rate() over 15 s needs a few scrapes of the counters; retry until the data is there (or report why).
    deadline = time.monotonic() + 45
    problems = prometheus_problems(running_stack) + sql_problems(database_url)
    while problems and time.monotonic() < deadline:
        time.sleep(1)
        problems = prometheus_problems(running_stack) + sql_problems(database_url)
    assert problems == []


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
            url = f"{base}/label/{match.group(2)}/values?match[]={urllib.parse.quote(selector, safe='')}"
            status, body = http_get(url)
            assert status == 200, body
            found[name] = json.loads(body)["data"]
        time.sleep(0.5)
    return found
