"""The Grafana dashboard: current with its generator, and following the rules a dashboard must keep."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

import pytest
import yaml

from tests.support.env import ROOT

DASHBOARD = ROOT / "dashboards" / "dict-rate-limit.json"
PROVISIONING = ROOT / "dashboards" / "provisioning"
PROM_TYPE = "prometheus"
PG_TYPE = "grafana-postgresql-datasource"
BUILTIN_SERIES = {"ALERTS"}  # Prometheus' own series of alert states
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def load_dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def panels() -> list[dict[str, Any]]:
    return [p for p in load_dashboard()["panels"] if p["type"] != "row"]


def queries(source_type: str, field: str) -> list[tuple[str, str]]:
    """(panel title, query text) of every target on a datasource of ``source_type``."""
    return [
        (panel["title"], target[field])
        for panel in panels()
        for target in panel["targets"]
        if target["datasource"]["type"] == source_type
    ]


def prom_exprs() -> list[tuple[str, str]]:
    return queries(PROM_TYPE, "expr")


def sql_queries() -> list[tuple[str, str]]:
    return queries(PG_TYPE, "rawSql")


def rules() -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for path in sorted((ROOT / "rules").glob("*.rules.yml")):
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            found.extend(group["rules"])
    return found


def rule(name: str) -> dict[str, Any]:
    return next(r for r in rules() if r.get("alert") == name or r.get("record") == name)


def contract_metric_names() -> set[str]:
    text = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    return set(re.findall(r"^\| `(dict_rate_limit_[a-z0-9_]+)`", text, flags=re.MULTILINE))


def thresholds(panel: dict[str, Any]) -> list[float]:
    steps = panel["fieldConfig"]["defaults"].get("thresholds", {}).get("steps", [])
    return [step["value"] for step in steps if step["value"] is not None]


def test_committed_json_is_what_the_generator_produces() -> None:
    result = subprocess.run(
        [sys.executable, "dashboards/build.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_dashboard_has_a_stable_uid_and_a_current_schema() -> None:
    board = load_dashboard()
    assert board["uid"] == "dict-rate-limit"
    assert board["schemaVersion"] >= 39
    assert "id" not in board or board["id"] is None


def test_panel_ids_are_unique_and_panels_stay_inside_the_grid() -> None:
    every = load_dashboard()["panels"]
    ids = [p["id"] for p in every]
    assert len(ids) == len(set(ids))
    for panel in every:
        pos = panel["gridPos"]
        assert pos["x"] >= 0, panel["title"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]


def test_every_panel_has_a_unit() -> None:
    missing = [p["title"] for p in panels() if not p["fieldConfig"]["defaults"].get("unit")]
    assert missing == []


def test_every_panel_and_query_uses_a_datasource_variable() -> None:
    expected = {PROM_TYPE: "${prometheus_datasource}", PG_TYPE: "${postgres_datasource}"}
    for panel in panels():
        source = panel["datasource"]
        assert expected[source["type"]] == source["uid"], panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == source, panel["title"]


def test_variables_select_datasources_category_and_policy() -> None:
    variables = {v["name"]: v for v in load_dashboard()["templating"]["list"]}
    assert list(variables) == [
        "prometheus_datasource",
        "postgres_datasource",
        "job",
        "cluster",
        "namespace",
        "participant",
        "category",
        "policy",
    ]
    prometheus, postgres = variables["prometheus_datasource"], variables["postgres_datasource"]
    assert (prometheus["type"], prometheus["query"]) == ("datasource", PROM_TYPE)
    assert (postgres["type"], postgres["query"]) == ("datasource", PG_TYPE)
    for name in ("job", "cluster", "namespace", "participant"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"]["uid"] == "${prometheus_datasource}"
        assert variables[name]["allValue"] == (".+" if name == "job" else ".*")
    # The job list is the jobs exposing the product's build info, not a job-name pattern: the seeds' job
    # `dict-rate-limit` or a prefixed one (kustomize namePrefix) must be selectable too.
    assert "job=" not in variables["job"]["query"]
    assert "_build_info" in variables["job"]["query"]
    # A single-participant exporter has no participant label: All (".*") matches the empty value.
    assert variables["participant"]["includeAll"]
    assert re.fullmatch(variables["participant"]["allValue"], "")
    assert variables["participant"]["query"].startswith("label_values(dict_rate_limit_available_tokens{")
    assert variables["participant"]["query"].endswith("}, participant)")
    for name in ("category", "policy"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"]["uid"] == "${prometheus_datasource}"
        assert variables[name]["multi"]
        assert variables[name]["includeAll"]
        # No custom "all" value: SQL panels expand All into a quoted list for IN (...).
        assert "allValue" not in variables[name]
    assert 'psp_category=~"$category"' in variables["policy"]["query"]


def test_every_bucket_query_filters_by_category_and_policy() -> None:
    for title, expr in prom_exprs():
        if "endpoint_id" in expr or "dict_rate_limit_remaining" in expr:
            if any(name in expr for name in ("bridge_up", "last_success", "history_", "outbox_")):
                continue
            assert 'endpoint_id=~"$policy"' in expr, title
            assert 'psp_category=~"$category"' in expr, title


def test_every_range_is_the_rate_interval() -> None:
    ranges = [(title, r) for title, expr in prom_exprs() for r in re.findall(r"\[([^\]]+)\]", expr)]
    assert ranges, "no rate() at all: the test would prove nothing"
    assert [(t, r) for t, r in ranges if r != "$__rate_interval"] == []
    for title, expr in prom_exprs():
        for call in re.finditer(r"\b(rate|irate|increase)\(", expr):
            assert "[$__rate_interval]" in expr[call.end() :], title


def test_metric_names_come_from_the_contract_and_the_recording_rules() -> None:
    known = contract_metric_names()
    recorded = {r["record"] for r in rules() if "record" in r}
    assert len(known) > 30
    assert recorded
    used: set[str] = set()
    for _, expr in prom_exprs():
        for name in re.findall(r"(?<![\w:$])([a-zA-Z_:][\w:]*)\s*(?=\{|\[|\)|$| and| or| \*)", expr):
            if name.startswith("dict_rate_limit_") or ":" in name or name in BUILTIN_SERIES:
                used.add(name)
    unknown = {
        name
        for name in used
        if name not in known
        and name not in recorded
        and name not in BUILTIN_SERIES
        and not (name.endswith(HISTOGRAM_SUFFIXES) and name.rsplit("_", 1)[0] in known)
    }
    assert unknown == set()
    assert {"dict_rate_limit_bridge_up", "endpoint:dict_rate_limit_remaining:ratio"} <= used


def _rule_default(record: str) -> float:
    """The default threshold a recording rule falls back to: `... or 0 * x + 0.20`."""
    match = re.search(r"\+\s*([0-9.]+)\s*$", rule(record)["expr"].strip())
    assert match, record
    return float(match.group(1))


def test_thresholds_match_the_alert_rules() -> None:
    warning = _rule_default("endpoint:dict_rate_limit_warning_remaining:ratio")
    critical = _rule_default("endpoint:dict_rate_limit_critical_remaining:ratio")
    soon_rule = rule("endpoint:dict_rate_limit_exhaustion_soon:bool")["expr"]  # what ExhaustionSoon reads
    soon = float(re.search(r"<\s*(?:bool\s+)?([0-9.]+)", soon_rule).group(1))  # type: ignore[union-attr]
    assert (warning, critical, soon) == (0.20, 0.10, 3600.0)
    by_title = {p["title"]: p for p in panels()}
    checked = 0
    for panel in panels():
        if panel["title"] == LOOKUP_404_PANEL:  # a share of lookups, not of a bucket: its own test
            continue
        unit = panel["fieldConfig"]["defaults"]["unit"]
        if unit == "percent" and thresholds(panel):
            assert thresholds(panel) == pytest.approx([100 * (1 - warning), 100 * (1 - critical)]), panel[
                "title"
            ]
            checked += 1
        if unit == "percentunit" and thresholds(panel):
            assert thresholds(panel) == pytest.approx([critical, warning]), panel["title"]
            checked += 1
    assert checked >= 4
    assert thresholds(by_title["Exhaustion projection"]) == [soon]


def test_alert_panels_name_the_rules_alerts() -> None:
    alerts = {r["alert"] for r in rules() if "alert" in r}
    for _, expr in prom_exprs():
        for name in re.findall(r'alertname="(\w+)"', expr):
            assert name in alerts


def _runbook_anchors() -> set[str]:
    text = (ROOT / "docs" / "runbooks.md").read_text(encoding="utf-8")
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    anchors.update(re.findall(r'<a (?:id|name)="([^"]+)"', text))
    return anchors


def test_panel_links_point_at_runbook_anchors_the_rules_use() -> None:
    runbook_urls = [r["annotations"]["runbook_url"] for r in rules() if "alert" in r]
    base = runbook_urls[0].split("#")[0]
    anchors = _runbook_anchors()
    links = [(p["title"], link["url"]) for p in panels() for link in p.get("links", [])]
    assert len(links) >= 8
    for title, url in links:
        page, _, anchor = url.partition("#")
        assert page == base, title
        assert anchor == "" or anchor in anchors, f"{title}: #{anchor} is not a heading of docs/runbooks.md"


def test_sql_panels_use_grafana_time_filter_and_existing_tables() -> None:
    schema = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "sql").glob("*.up.sql"))
    queries = sql_queries()
    assert {t for t, _ in queries} >= {"Alert history (PostgreSQL)"}
    for title, raw_sql in queries:
        assert "$__timeFilter(" in raw_sql, title
        assert "IN ($policy)" in raw_sql, title
        for table in re.findall(r"\bFROM\s+(\w+)", raw_sql):
            assert re.search(rf"CREATE (TABLE|VIEW) {table}\b", schema), f"{title}: {table}"


def test_provisioning_loads_the_dashboard_and_both_datasource_types() -> None:
    providers = yaml.safe_load((PROVISIONING / "dashboards.yml").read_text(encoding="utf-8"))
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"].startswith("/")
    sources = yaml.safe_load((PROVISIONING / "datasources.yml").read_text(encoding="utf-8"))
    types = {s["type"] for s in sources["datasources"]}
    assert types == {PROM_TYPE, PG_TYPE}
    for source in sources["datasources"]:
        assert "password" not in source.get("jsonData", {}), "secrets belong in secureJsonData"


def _paths(value: object, prefix: str = "") -> set[str]:
    if isinstance(value, dict):
        return {p for key, item in value.items() for p in _paths(item, f"{prefix}/{key}")} | {prefix}
    if isinstance(value, list):
        return {p for i, item in enumerate(value) for p in _paths(item, f"{prefix}[{i}]")} | {prefix}
    return {prefix}


def test_the_pinned_sdk_round_trips_the_dashboard_without_dropping_a_field() -> None:
    # The SDK build must match the Grafana the dashboard targets (11.6): the 10.1 build a plain install
    # picks drops allowCustomValue and bar-gauge options when it reads the JSON back.
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models import dashboard as dm

    original = load_dashboard()
    again = json.loads(json.dumps(dm.Dashboard.from_json(original), cls=JSONEncoder))
    assert _paths(original) - _paths(again) == set()
    assert sum('"allowCustomValue"' in json.dumps(v) for v in original["templating"]["list"]) >= 5


LOOKUP_404_PANEL = "404 share of key lookups (24 h)"


def test_the_404_share_panel_draws_the_alerts_threshold_and_reads_its_recording_rule() -> None:
    alert = rule("DICTRateLimitLookupNotFoundShareHigh")
    threshold = float(re.search(r"ratio24h > ([0-9.]+)", alert["expr"]).group(1))  # type: ignore[union-attr]
    assert threshold == 0.07
    panel = {p["title"]: p for p in panels()}[LOOKUP_404_PANEL]
    assert thresholds(panel) == [threshold]
    assert panel["fieldConfig"]["defaults"]["unit"] == "percentunit"
    assert "deployment:dict_rate_limit_dict_lookup_404:ratio24h{" in panel["targets"][0]["expr"]


def test_the_429_panel_shows_every_policy_with_answers_per_participant() -> None:
    panel = {p["title"]: p for p in panels()}["429 answers received, by policy"]
    (target,) = panel["targets"]
    assert "increase(endpoint:dict_rate_limit_dict_429_responses_total:max{" in target["expr"]
    # Filtered by category through the answers themselves: per-end-user policies have no bucket series.
    assert "(increase(dict_rate_limit_dict_responses_total{" in target["expr"]
    assert "on (participant, endpoint_id)" in target["expr"]


#: Series without a participant label: the exporter's shared history queue and the receiver's.
SHARED_SERIES = ("history_queue", "history_dropped", "outbox_", "alerts_created", "alerts_resolved")


def test_every_participant_scoped_query_selects_the_participant_and_joins_on_it() -> None:
    checked = 0
    for title, expr in prom_exprs():
        if any(name in expr for name in SHARED_SERIES):
            assert "$participant" not in expr, title  # would hide them when one participant is chosen
            continue
        assert 'participant=~"$participant"' in expr, title
        for on in re.findall(r"on \(([^)]*)\)", expr):
            assert "participant" in on.split(", "), (title, on)
        checked += 1
    assert checked > 15
