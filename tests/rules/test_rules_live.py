"""The rules bundle against live components: the exporter's real exposition carries every metric and label
that rules, runbooks and dashboards query (contract), and a real Prometheus scraping it raises WARNING,
then CRITICAL, then resolves both while the simulator drains and refills ENTRIES_WRITE (scenario)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from devstack.embedded import free_port
from exporter.history import migrations
from exporter.rules.render import RULES_DIR, render_fast_rules, rule_files
from exporter.simulator.server import SimulatorServer
from tests.support.env import ROOT, require_binary

EXPORTER = [sys.executable, "-m", "exporter.cli", "exporter"]
JOB = "dict-rate-limit-exporter"
CAPACITY = 36000  # ENTRIES_WRITE for every category (dict-domain.md §2)
#: Labels that Prometheus (targets, histograms, ALERTS) or the rules' folding add, never the exporter.
#: Labels Prometheus (discovery, relabelling) puts on the series, not the exporter: the deployment labels
#: of the rules' default rendering among them.
TARGET_LABELS = {
    "job",
    "instance",
    "pod",
    "le",
    "alertname",
    "alertstate",
    "cluster",
    "namespace",
    "participant",
}


# --- what the bundle queries


def _queries() -> list[str]:
    """Rule expressions and annotation templates, the seed's rules, runbook PromQL and dashboard queries."""
    texts: list[str] = []
    for path in rule_files(RULES_DIR):
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            for rule in group["rules"]:
                texts.append(rule["expr"])
                annotations = " ".join(rule.get("annotations", {}).values())
                texts.extend(re.findall(r"\{\{.*?\}\}", annotations))
    # The seed's own rules (tests/rules/seed_rules.yml) must keep working against the exporter too.
    texts.extend(
        r["expr"]
        for g in yaml.safe_load((ROOT / "tests" / "rules" / "seed_rules.yml").read_text())["groups"]
        for r in g["rules"]
    )
    runbooks = (ROOT / "docs" / "runbooks.md").read_text(encoding="utf-8")
    texts.extend(re.findall(r"```promql\n(.*?)```", runbooks, flags=re.DOTALL))
    for path in sorted((ROOT / "dashboards").glob("*.json")):
        texts.extend(_dashboard_exprs(json.loads(path.read_text(encoding="utf-8"))))
    # Template strings escape their quotes: \" in a Go template is " in the query.
    return [text.replace('\\"', '"') for text in texts]


def _dashboard_exprs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return own + [e for value in node.values() for e in _dashboard_exprs(value)]
    if isinstance(node, list):
        return [e for value in node for e in _dashboard_exprs(value)]
    return []


def used_metrics() -> dict[str, set[str]]:
    """Metric name -> label names its selectors match on (recording rule names excluded)."""
    used: dict[str, set[str]] = {}
    for text in _queries():
        for name, selector in re.findall(r"(?<![:\w])(dict_rate_limit_\w+)(\{[^}]*\})?", text):
            used.setdefault(name, set()).update(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector))
    return used


def used_grouping_labels() -> set[str]:
    labels: set[str] = set()
    for text in _queries():
        for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", text):
            labels.update(label.strip() for label in group.split(",") if label.strip())
    return labels - TARGET_LABELS


def receiver_contract() -> tuple[set[str], set[str]]:
    """Metric and label names of the receiver's table in docs/metrics.md (the test runs no receiver)."""
    text = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8").split("## Receiver", 1)[1]
    names = set(re.findall(r"`(dict_rate_limit_\w+)`", text))
    return names, set(re.findall(r"`([a-z_]+)`", text)) - names


# --- live components


def _environment(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "CONFIG_FILE"}}
    env.update({"LISTEN_HOST": "127.0.0.1", "LOG_FORMAT": "json", **values})
    return env


@contextlib.asynccontextmanager
async def exporter_process(sim: SimulatorServer, **env: str) -> AsyncIterator[str]:
    """A real `dict-rate-limit exporter` polling ``sim`` every second; yields its /metrics URL."""
    metrics_port = free_port()
    process = await asyncio.create_subprocess_exec(
        *EXPORTER,
        env=_environment(
            BRIDGE_ADDRESS=sim.address,
            POLL_INTERVAL_SECONDS="1",
            POLL_BUDGET_OVERRIDE="true",
            METRICS_PORT=str(metrics_port),
            HEALTH_CHECK_PORT=str(free_port()),
            **env,
        ),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        yield f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


@contextlib.asynccontextmanager
async def pin(sim: SimulatorServer, policy: str, tokens: float) -> AsyncIterator[None]:
    """Holds a simulator bucket at ``tokens`` (re-set 5 times a second, against its refill)."""

    async def reset() -> None:
        while True:
            sim.engine.set_tokens(policy, tokens)
            await asyncio.sleep(0.2)

    task = asyncio.create_task(reset())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def keep_full(sim: SimulatorServer) -> contextlib.AbstractAsyncContextManager[None]:
    """Polling once a second is 10x the POLICIES_LIST refill: the simulator would rightly answer 429
    after ~20 s. The test keeps that bucket full, as a participant within budget never needs to."""
    return pin(sim, "POLICIES_LIST", 20)


async def scrape(http: aiohttp.ClientSession, url: str) -> dict[str, set[str]]:
    """Sample name -> label names seen in one scrape of the real exposition."""
    async with http.get(url) as response:
        text = await response.text()
    samples: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    return samples


async def eventually(check: Callable[[], Any], within: float, what: str) -> Any:
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.3)
    raise AssertionError(f"{what} not seen within {within:g} s (last: {last!r})")


# --- contract


#: Series that exist only while something is wrong, so a healthy exporter need not export them
#: (dict_rate_limit_policy_missing: 1 while a policy seen before is absent; the exporter side of issue 11).
ONLY_WHILE_MISSING = {"dict_rate_limit_policy_missing"}


def _missing(used: dict[str, set[str]], exposed: dict[str, set[str]], receiver: set[str]) -> list[str]:
    problems = []
    for name, labels in sorted(used.items()):
        if name in receiver:
            continue
        if name not in exposed:
            if name in ONLY_WHILE_MISSING:
                continue
            problems.append(f"{name}: not exported")
        elif labels - TARGET_LABELS - exposed[name]:
            problems.append(f"{name}: no label {sorted(labels - TARGET_LABELS - exposed[name])}")
    return problems


@pytest.mark.slow
async def test_every_metric_and_label_queried_by_rules_runbooks_and_dashboards_is_exported(
    database_url: str,
) -> None:
    migrations.apply(database_url)  # history metrics exist only with a database
    used, (receiver, receiver_labels) = used_metrics(), receiver_contract()
    assert len(used) > 30, sorted(used)
    sim = SimulatorServer(category="A")
    await sim.start()
    # Conditional series: a 404 share once two snapshots with answer counts exist (the simulator counts
    # the list calls themselves), a projection only while draining.
    try:
        async with (
            keep_full(sim),
            exporter_process(sim, DATABASE_URL=database_url) as url,
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
        ):
            problems: list[str] = ["not scraped yet"]
            exposed: dict[str, set[str]] = {}
            deadline = time.monotonic() + 30
            while problems and time.monotonic() < deadline:
                sim.engine.consume("ENTRIES_WRITE", 2000)  # draining: the projection gets a sample
                await asyncio.sleep(0.5)
                with contextlib.suppress(aiohttp.ClientError):
                    exposed = await scrape(http, url)
                    problems = _missing(used, exposed, receiver)
            assert problems == []
    finally:
        await sim.stop()
    all_labels = set().union(*exposed.values())
    assert sorted(used_grouping_labels() - all_labels - receiver_labels) == []
    assert exposed["dict_rate_limit_remaining_ratio"] == {"endpoint_id", "psp_category"}
    # What only the receiver exports is at least in its contract table.
    absent = {n for n in used if n not in exposed} - ONLY_WHILE_MISSING
    assert sorted(n for n in absent if n not in receiver) == []
    assert absent <= receiver


# --- scenario


async def firing(http: aiohttp.ClientSession, base: str) -> dict[str, dict[str, Any]]:
    """ENTRIES_WRITE alerts in Prometheus' /api/v1/alerts by name (any state)."""
    async with http.get(f"{base}/api/v1/alerts") as response:
        alerts = (await response.json())["data"]["alerts"]
    return {a["labels"]["alertname"]: a for a in alerts if a["labels"].get("endpoint_id") == "ENTRIES_WRITE"}


async def prometheus_process(tmp_path: Path, target: str) -> tuple[asyncio.subprocess.Process, str]:
    render_fast_rules(RULES_DIR, tmp_path / "rules", 0.01)  # WARNING 5m -> 3s, CRITICAL 2m -> 2s
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp_path / "rules" / "*.rules.yml")],
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [target]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    address = f"127.0.0.1:{free_port()}"
    process = await asyncio.create_subprocess_exec(
        require_binary("prometheus"),
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address={address}",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return process, f"http://{address}"


def hold(sim: SimulatorServer, ratio: float) -> contextlib.AbstractAsyncContextManager[None]:
    """Keeps ENTRIES_WRITE at ``ratio`` of its capacity (the refill would lift it by 20 tokens/s)."""
    return pin(sim, "ENTRIES_WRITE", ratio * CAPACITY)


def _expect_labels(alert: dict[str, Any], severity: str) -> None:
    assert alert["labels"] == {
        "alertname": alert["labels"]["alertname"],
        "severity": severity,
        "job": JOB,
        "endpoint_id": "ENTRIES_WRITE",
    }
    # The category is not part of the identity (BCB changes it); it travels as an annotation.
    assert alert["annotations"]["psp_category"] == "A"
    assert alert["annotations"]["data_state"] == "fresh"


@pytest.mark.slow
async def test_prometheus_raises_warning_then_critical_then_resolves_both(tmp_path: Path) -> None:
    started = time.monotonic()
    sim = SimulatorServer(category="A")
    await sim.start()
    prometheus: asyncio.subprocess.Process | None = None
    try:
        async with (
            keep_full(sim),
            exporter_process(sim) as url,
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
        ):
            prometheus, base = await prometheus_process(tmp_path, url.split("/")[2])

            async def ratio_in_prometheus() -> bool:
                query = 'endpoint:dict_rate_limit_remaining:ratio{endpoint_id="ENTRIES_WRITE"}'
                try:
                    async with http.get(f"{base}/api/v1/query", params={"query": query}) as response:
                        return bool((await response.json())["data"]["result"])
                except aiohttp.ClientError:
                    return False

            await eventually(ratio_in_prometheus, 30, "the recording rule fed by the exporter")

            async with hold(sim, 0.15):
                alerts = await eventually(
                    lambda: _state(http, base, "DICTRateLimitWarning", "firing"), 20, "WARNING firing"
                )
                assert "DICTRateLimitCritical" not in alerts, "CRITICAL must not fire at 15% remaining"
                warning = alerts["DICTRateLimitWarning"]
                _expect_labels(warning, "warning")
                assert re.match(
                    r"ENTRIES_WRITE \(category A\) has 54\d\d of 36000 tokens left \(15",
                    warning["annotations"]["description"],
                ), warning["annotations"]["description"]

            async with hold(sim, 0.05):
                alerts = await eventually(
                    lambda: _state(http, base, "DICTRateLimitCritical", "firing"), 20, "CRITICAL firing"
                )
                _expect_labels(alerts["DICTRateLimitCritical"], "critical")
                assert alerts["DICTRateLimitWarning"]["state"] == "firing"

            sim.engine.set_tokens("ENTRIES_WRITE", CAPACITY)  # the scenario refills the bucket

            async def resolved() -> bool:
                # Other alerts may follow the drain (ExhaustionSoon reads a 5-minute rate): not this test's.
                return not {"DICTRateLimitWarning", "DICTRateLimitCritical"} & set(await firing(http, base))

            await eventually(resolved, 20, "WARNING and CRITICAL resolved")
    finally:
        if prometheus is not None and prometheus.returncode is None:
            prometheus.terminate()
            await prometheus.wait()
        await sim.stop()
    assert time.monotonic() - started < 90


async def _state(
    http: aiohttp.ClientSession, base: str, alertname: str, state: str
) -> dict[str, dict[str, Any]] | None:
    try:
        alerts = await firing(http, base)
    except aiohttp.ClientError:
        return None
    alert = alerts.get(alertname)
    return alerts if alert is not None and alert["state"] == state else None


@pytest.mark.slow
async def test_a_firing_critical_holds_when_the_exporter_stops_and_the_liveness_alert_explains_why(
    tmp_path: Path,
) -> None:
    """Real Prometheus, real exporter: stopping the exporter does not resolve the Critical (no false
    "resolved"); it keeps firing marked data missing while DICTRateLimitExporterAbsent fires."""
    sim = SimulatorServer(category="A")
    await sim.start()
    prometheus: asyncio.subprocess.Process | None = None
    try:
        async with keep_full(sim), aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            async with exporter_process(sim) as url, hold(sim, 0.05):
                prometheus, base = await prometheus_process(tmp_path, url.split("/")[2])
                await eventually(
                    lambda: _state(http, base, "DICTRateLimitCritical", "firing"), 40, "CRITICAL firing"
                )
            # The exporter is gone: its target fails, every series of it goes stale.

            async def absent() -> bool:
                async with http.get(f"{base}/api/v1/alerts") as response:
                    alerts = (await response.json())["data"]["alerts"]
                return any(
                    a["labels"]["alertname"] == "DICTRateLimitExporterAbsent" and a["state"] == "firing"
                    for a in alerts
                )

            await eventually(absent, 30, "ExporterAbsent firing")
            await asyncio.sleep(5)  # longer than the fast Critical's window and keep_firing_for
            alerts = await firing(http, base)
            critical = alerts["DICTRateLimitCritical"]
            assert critical["state"] == "firing"
            assert critical["annotations"]["data_state"] == "missing"
            assert "? (data missing)" in critical["annotations"]["description"]
    finally:
        if prometheus is not None and prometheus.returncode is None:
            prometheus.terminate()
            await prometheus.wait()
        await sim.stop()
