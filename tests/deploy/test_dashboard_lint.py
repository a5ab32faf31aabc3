"""grafana/dashboard-linter's rules (lint/rule_*.go, re-implemented) on the generated dashboard.

The linter is a Go program that no package registry this project uses ships, so its rules are rewritten
here rule by rule, with the names it reports them under, and its configuration file is honoured:
``dashboards/.lint`` excludes a rule (or one entry of it) only with a reason. PromQL is parsed by the real
promtool (target-promql-rule); the other PromQL rules walk the expression's selectors with a small
tokenizer whose results are checked against known expressions first. The LogQL rules have nothing to
check (no Loki panel).
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.env import ROOT, require_binary

DASHBOARD_PATH = ROOT / "dashboards" / "dict-rate-limit.json"
LINT_PATH = ROOT / "dashboards" / ".lint"
# lint/constants.go: the panel types most rules look at ("table" is the linter's panelTypeTimeTable).
CHECKED_PANELS = {"stat", "singlestat", "graph", "table", "timeseries", "gauge"}
DATASOURCE_PANELS = {"singlestat", "graph", "table", "timeseries"}
# lint/rule_panel_units.go, validUnits (grafana-data valueFormats/categories.ts).
VALID_UNITS = set(Path(__file__).with_name("grafana_units.txt").read_text(encoding="utf-8").split())
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}
KEYWORDS |= {"offset", "inf", "nan"}
LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}


@dataclass(frozen=True)
class Selector:
    metric: str
    matchers: dict[str, tuple[str, str]]  # label -> (operator, value)
    ranged: str | None  # the [range] right after it, if any
    call: str | None  # the function whose argument it directly is


@dataclass(frozen=True)
class Problem:
    rule: str
    where: str  # dashboard, a variable name, or a panel title
    message: str


def _matchers(body: str) -> dict[str, tuple[str, str]]:
    found = {}
    for label, operator, value in re.findall(r'([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"', body):
        found[label] = (operator, value)
    return found


TOKEN = re.compile(
    r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<braces>\{[^}]*\})|(?P<range>\[[^\]]*\])|(?P<num>\d[\w.]*)'
    r"|(?P<name>[A-Za-z_:][\w:]*)|(?P<punct>[()]|[^\s\w(){}\[\]\"]+|,))"
)


AGGREGATORS = {"sum", "min", "max", "avg", "count", "group", "stddev", "stdvar", "topk", "bottomk"}
AGGREGATORS |= {"quantile", "count_values", "limitk", "limit_ratio"}


def _skip_list(tokens: list[tuple[str, str]], i: int) -> int:
    """Index of the ")" closing the label list that opens at tokens[i + 1]."""
    depth, i = 0, i + 1
    while i < len(tokens):
        depth += tokens[i][1] == "("
        depth -= tokens[i][1] == ")"
        if depth == 0:
            return i
        i += 1
    return i


def selectors(expr: str) -> list[Selector]:
    """The vector selectors of a PromQL expression with the call each is an argument of."""
    tokens = [(m.lastgroup or "", m.group(m.lastgroup or 0)) for m in TOKEN.finditer(expr)]
    found: list[Selector] = []
    calls: list[str | None] = []  # per open parenthesis: the function it belongs to
    pending: str | None = None  # a function name waiting for its "("
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1] if i + 1 < len(tokens) else ("", "")
        if text == "(" and kind == "punct":
            calls.append(pending)
            pending = None
        elif text == ")" and kind == "punct":
            if calls:
                calls.pop()
        elif kind == "name" and text in LABEL_LISTS and following[1] == "(":
            i = _skip_list(tokens, i)  # by (...), on (...): label names, not selectors
        elif kind == "name" and (following[1] == "(" or text in AGGREGATORS):
            pending = text
        elif (kind == "name" and text.lower() not in KEYWORDS) or kind == "braces":
            body = text if kind == "braces" else ""
            if kind == "name" and following[0] == "braces":
                body, i = following[1], i + 1
            after = tokens[i + 1] if i + 1 < len(tokens) else ("", "")
            ranged = after[1][1:-1] if after[0] == "range" else None
            metric = text if kind == "name" else ""
            found.append(Selector(metric, _matchers(body), ranged, calls[-1] if calls else None))
        i += 1
    return found


def test_the_selector_walker_finds_what_promql_means() -> None:
    walked = selectors(
        'histogram_quantile(0.95, sum by (le, instance) (rate(x_bucket{job=~"$job"}[$__rate_interval])))'
        ' / on (job) group_left () y_total{a="b"} and count(ALERTS{alertstate="firing"}) or vector(0)'
    )
    assert [(s.metric, s.ranged, s.call) for s in walked] == [
        ("x_bucket", "$__rate_interval", "rate"),
        ("y_total", None, None),
        ("ALERTS", None, "count"),
    ]
    assert walked[0].matchers == {"job": ("=~", "$job")}
    assert selectors("time() - up") == [Selector("up", {}, None, None)]


# --- the dashboard as the linter sees it


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD_PATH.read_text(encoding="utf-8"))
    return loaded


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def variables(board: dict[str, Any], kind: str | None = None) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = board["templating"]["list"]
    return [v for v in listed if kind is None or v["type"] == kind]


def prometheus_first(board: dict[str, Any]) -> bool:
    """The linter's getTemplateDatasource: its Prometheus rules apply when the first is Prometheus."""
    datasources = variables(board, "datasource")
    return bool(datasources) and datasources[0]["query"] == "prometheus"


def prom_targets(board: dict[str, Any]) -> Iterator[tuple[dict[str, Any], str]]:
    for panel in panels(board):
        for target in panel.get("targets", []):
            if target.get("expr"):
                yield panel, target["expr"]


# --- the rules, one function each, named as the linter names them


def template_datasource_rule(board: dict[str, Any]) -> Iterator[Problem]:
    datasources = variables(board, "datasource")
    if not datasources:
        yield Problem("template-datasource-rule", "dashboard", "does not have a templated data source")
    for variable in datasources:
        query = variable["query"]
        names = {f"{query.lower()}_datasource"} | ({"datasource"} if len(datasources) == 1 else set())
        labels = {f"{query.title()} data source"} | ({"Data source"} if len(datasources) == 1 else set())
        if variable["name"] not in names:
            yield Problem("template-datasource-rule", variable["name"], f"should be named {sorted(names)}")
        if variable.get("label") not in labels and query == "prometheus":
            yield Problem(
                "template-datasource-rule", variable["name"], f"should be labelled {sorted(labels)}"
            )


def _template_rule(name: str) -> Callable[[dict[str, Any]], Iterator[Problem]]:
    def rule(board: dict[str, Any]) -> Iterator[Problem]:
        if not prometheus_first(board):
            return
        found = [v for v in variables(board) if v["name"] == name]
        if not found:
            yield Problem(f"template-{name}-rule", "dashboard", f"is missing the {name} template")
            return
        variable = found[0]
        uid = variable.get("datasource", {}).get("uid")
        allowed = {"$datasource", "${datasource}", "$prometheus_datasource", "${prometheus_datasource}"}
        if uid not in allowed:
            yield Problem(f"template-{name}-rule", name, f"should use the Prometheus datasource, uses {uid}")
        if variable["type"] != "query":
            yield Problem(f"template-{name}-rule", name, "should be a Prometheus query")
        if not variable.get("multi"):
            yield Problem(f"template-{name}-rule", name, "should be a multi select")
        if variable.get("allValue") != ".+":
            yield Problem(f"template-{name}-rule", name, "allValue should be '.+'")

    return rule


def template_on_time_change_reload_rule(board: dict[str, Any]) -> Iterator[Problem]:
    for variable in variables(board, "query"):
        if variable.get("refresh") != 2:
            yield Problem("template-on-time-change-reload-rule", variable["name"], "refresh should be 2")


def template_label_promql_rule(board: dict[str, Any]) -> Iterator[Problem]:
    if not prometheus_first(board):
        return
    for variable in variables(board, "query"):
        match = re.search(r"([a-z_]+)\((.+)\)", variable["query"])
        if not match or match.group(1) not in {"label_names", "label_values", "metrics", "query_result"}:
            yield Problem("template-label-promql-rule", variable["name"], f"invalid {variable['query']!r}")


def uneditable_dashboard(board: dict[str, Any]) -> Iterator[Problem]:
    if board.get("editable", True):
        yield Problem("uneditable-dashboard", "dashboard", "is editable, it should be 'editable: false'")


def panel_datasource_rule(board: dict[str, Any]) -> Iterator[Problem]:
    names = {v["name"] for v in variables(board, "datasource")}
    allowed = {f"${n}" for n in names} | {f"${{{n}}}" for n in names}
    for panel in panels(board):
        if panel["type"] in DATASOURCE_PANELS and panel.get("datasource", {}).get("uid") not in allowed:
            yield Problem("panel-datasource-rule", panel["title"], "does not use a templated datasource")


def panel_title_description_rule(board: dict[str, Any]) -> Iterator[Problem]:
    for panel in panels(board):
        if panel["type"] in CHECKED_PANELS and not (panel.get("title") and panel.get("description")):
            yield Problem("panel-title-description-rule", panel.get("title", "?"), "title or description")


def panel_units_rule(board: dict[str, Any]) -> Iterator[Problem]:
    for panel in panels(board):
        if panel["type"] not in CHECKED_PANELS:
            continue
        if panel["type"] == "stat" and panel.get("options", {}).get("reduceOptions", {}).get("fields"):
            continue  # non-numeric stat: the linter skips it
        config = panel.get("fieldConfig", {})
        overrides = [p for o in config.get("overrides", []) for p in o.get("properties", [])]
        if config.get("defaults", {}).get("mappings") or any(p["id"] == "mappings" for p in overrides):
            continue
        unit = next((p["value"] for p in overrides if p["id"] == "unit"), None)
        unit = unit or config.get("defaults", {}).get("unit", "")
        if unit not in VALID_UNITS:
            yield Problem("panel-units-rule", panel["title"], f"has no or invalid units defined: {unit!r}")


def panel_no_targets_rule(board: dict[str, Any]) -> Iterator[Problem]:
    for panel in panels(board):
        if panel["type"] in CHECKED_PANELS and not panel.get("targets"):
            yield Problem("panel-no-targets-rule", panel["title"], "has no targets")


def _target_matcher_rule(label: str) -> Callable[[dict[str, Any]], Iterator[Problem]]:
    def rule(board: dict[str, Any]) -> Iterator[Problem]:
        if not prometheus_first(board):
            return
        for panel, expr in prom_targets(board):
            for selector in selectors(expr):
                if selector.matchers.get(label) != ("=~", f"${label}"):
                    message = f'{selector.metric} has no {label}=~"${label}" matcher'
                    yield Problem(f"target-{label}-rule", panel["title"], message)

    return rule


def target_rate_interval_rule(board: dict[str, Any]) -> Iterator[Problem]:
    if not prometheus_first(board):
        return
    for panel, expr in prom_targets(board):
        for selector in selectors(expr):
            if (
                selector.ranged
                and selector.call in {"rate", "irate"}
                and selector.ranged != "$__rate_interval"
            ):
                yield Problem("target-rate-interval-rule", panel["title"], f"{expr}: use $__rate_interval")


def target_counter_agg_rule(board: dict[str, Any]) -> Iterator[Problem]:
    for panel, expr in prom_targets(board):
        for selector in selectors(expr):
            counted = selector.ranged and selector.call in {"rate", "irate", "increase"}
            if selector.metric.endswith("_total") and not counted:
                yield Problem("target-counter-agg-rule", panel["title"], f"{selector.metric} not aggregated")


RULES: dict[str, Callable[[dict[str, Any]], Iterator[Problem]]] = {
    "template-datasource-rule": template_datasource_rule,
    "template-job-rule": _template_rule("job"),
    "template-instance-rule": _template_rule("instance"),
    "template-on-time-change-reload-rule": template_on_time_change_reload_rule,
    "template-label-promql-rule": template_label_promql_rule,
    "uneditable-dashboard": uneditable_dashboard,
    "panel-datasource-rule": panel_datasource_rule,
    "panel-title-description-rule": panel_title_description_rule,
    "panel-units-rule": panel_units_rule,
    "panel-no-targets-rule": panel_no_targets_rule,
    "target-job-rule": _target_matcher_rule("job"),
    "target-instance-rule": _target_matcher_rule("instance"),
    "target-rate-interval-rule": target_rate_interval_rule,
    "target-counter-agg-rule": target_counter_agg_rule,
}
#: Not a linter rule: the issue asks every selector to carry the deployment labels too.
IDENTITY_LABELS = ("cluster", "namespace")


def _matches(entry: dict[str, str], board: dict[str, Any], problem: Problem) -> bool:
    """An entry of the linter's configuration: every attribute it sets must match (dashboard, panel)."""
    if "dashboard" in entry and entry["dashboard"] != board["title"]:
        return False
    return "panel" not in entry or entry["panel"] == problem.where


def lint(board: dict[str, Any]) -> list[Problem]:
    exclusions = yaml.safe_load(LINT_PATH.read_text(encoding="utf-8"))["exclusions"]
    problems = []
    for name, rule in RULES.items():
        excluded = exclusions.get(name)
        for problem in rule(board):
            if excluded is None or (
                excluded.get("entries")
                and not any(_matches(entry, board, problem) for entry in excluded["entries"])
            ):
                problems.append(problem)
    return problems


def test_the_lint_file_gives_a_reason_for_every_exclusion_of_a_known_rule() -> None:
    exclusions = yaml.safe_load(LINT_PATH.read_text(encoding="utf-8"))["exclusions"]
    for name, exclusion in exclusions.items():
        assert name in RULES, name
        assert len(exclusion["reason"]) > 40, name


def test_the_generated_dashboard_passes_the_linter_rules() -> None:
    assert lint(dashboard()) == []


def test_only_the_postgresql_variable_breaks_the_datasource_naming_rule() -> None:
    # The .lint exclusion is per dashboard (the linter's granularity): say what it hides.
    assert [p.where for p in template_datasource_rule(dashboard())] == ["postgres_datasource"]
    board = dashboard()
    variables(board, "datasource")[0]["name"] = "prom"
    assert [p.where for p in template_datasource_rule(board)] == ["prom", "postgres_datasource"]


@pytest.mark.parametrize("label", IDENTITY_LABELS)
def test_every_selector_carries_the_deployment_labels(label: str) -> None:
    assert list(_target_matcher_rule(label)(dashboard())) == []


def test_each_rule_catches_what_it_is_about() -> None:
    # A rule that cannot fail proves nothing: break the dashboard one way per rule and see it reported.
    def broken(change: Callable[[dict[str, Any]], None]) -> set[str]:
        board = dashboard()
        change(board)
        return {p.rule for p in lint(board)}

    def first(board: dict[str, Any], kind: str) -> dict[str, Any]:
        return next(p for p in panels(board) if p["type"] == kind)

    def set_expr(board: dict[str, Any], expr: str) -> None:
        first(board, "timeseries")["targets"][0]["expr"] = expr

    cases: dict[str, Callable[[dict[str, Any]], None]] = {
        "uneditable-dashboard": lambda b: b.update(editable=True),
        "panel-units-rule": lambda b: first(b, "timeseries")["fieldConfig"]["defaults"].update(
            unit="tokens/min"
        ),
        "panel-title-description-rule": lambda b: first(b, "stat").update(description=""),
        "panel-datasource-rule": lambda b: first(b, "timeseries")["datasource"].update(uid="prometheus"),
        "panel-no-targets-rule": lambda b: first(b, "gauge").update(targets=[]),
        "template-job-rule": lambda b: next(v for v in variables(b) if v["name"] == "job").update(
            allValue=".*"
        ),
        "template-on-time-change-reload-rule": lambda b: variables(b, "query")[0].update(refresh=1),
        "target-job-rule": lambda b: set_expr(b, "dict_rate_limit_bridge_up"),
        "target-rate-interval-rule": lambda b: set_expr(b, 'rate(x{job=~"$job"}[5m])'),
        "target-counter-agg-rule": lambda b: set_expr(b, 'x_total{job=~"$job"}'),
        "template-label-promql-rule": lambda b: variables(b, "query")[0].update(query="up"),
    }
    for rule, change in cases.items():
        assert rule in broken(change), rule


def test_every_promql_target_parses_with_promtool(tmp_path: Path) -> None:
    # target-promql-rule: the linter parses with Prometheus' parser after expanding the variables; so
    # does promtool, given the expressions as recording rules with the variables expanded as Grafana would.
    promtool = require_binary("promtool")
    rules = []
    for index, (_panel, expr) in enumerate(prom_targets(dashboard())):
        text = expr.replace("$__rate_interval", "1m")
        text = re.sub(r"\$\w+", ".*", text)
        rules.append({"record": f"lint:target_{index}", "expr": text})
    assert rules
    path = tmp_path / "targets.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "lint", "rules": rules}]}), encoding="utf-8")
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
