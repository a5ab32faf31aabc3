"""The rules bundle (rules/): promtool-clean, every alert unit-tested, annotated, versioned, linked to a
runbook, written against the metrics contract, and its PrometheusRule manifest in step with its source."""

from __future__ import annotations

import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter.rules.render import (
    DEFAULT_DEPLOYMENT_LABELS,
    MANIFEST,
    TEMPLATES_DIR,
    RulesBundleError,
    Selectors,
    bundle_version,
    effective_for,
    format_duration,
    hysteresis_window,
    parse_duration,
    parse_selector,
    render_fast_rules,
    render_prometheusrule,
    render_rules,
    rule_files,
)
from tests.support.env import ROOT, require_binary

RULES = ROOT / "rules"
#: The fast-rules timeline test only checks when the alert fires: these annotations never match, so each
#: firing evaluation is reported by promtool with what it got.
ANY_ANNOTATIONS = {"summary": "(compared by alert set only)"}
RULE_FILES = rule_files(RULES)
TEST_FILES = sorted((RULES / "tests").glob("*.test.yml"))
RUNBOOK_URL = (
    "https://github.com/dict-rate-limit-exporter/dict-rate-limit-exporter/blob/main/docs/runbooks.md#"
)
SEVERITIES = {"critical", "warning", "info"}

#: Labels that identify one deployment in the default rendering (rules/).
DEPLOYMENT = frozenset(DEFAULT_DEPLOYMENT_LABELS)
#: Bundle major version 2: alert -> (severity, whether its identity includes endpoint_id). Identity is the
#: deployment labels (+ endpoint_id); psp_category is never a label (BCB changes it). Changing a name or
#: a label set here is a breaking change and needs a new major version in every rule file's header.
ALERTS_V2: dict[str, tuple[str, bool]] = {
    "DICTRateLimitWarning": ("warning", True),
    "DICTRateLimitCritical": ("critical", True),
    "DICTRateLimitExhaustionSoon": ("warning", True),
    "DICTRateLimitExhausted": ("critical", True),
    "DICTRateLimitBurstExhaustion": ("warning", True),
    "DICTRateLimitPoliciesListLow": ("warning", True),
    "DICTRateLimitCategoryChanged": ("warning", False),
    "DICTRateLimitWatchdog": ("none", False),
    "DICTRateLimitExporterAbsent": ("critical", False),
    "DICTRateLimitBridgeDown": ("critical", False),
    "DICTRateLimitPollsFailing": ("warning", False),
    "DICTRateLimitDataStale": ("critical", False),
    "DICTRateLimitPolicyMissing": ("warning", True),
    "DICTRateLimitHistoryWriteFailing": ("warning", False),
    "DICTRateLimitHistoryDropping": ("warning", False),
    "DICTRateLimitReceiverDown": ("warning", False),
    "DICTRateLimitReceiverFailing": ("warning", False),
    "DICTRateLimitAlertDeliveryFailing": ("warning", False),
    "DICTRateLimitPulsarPublishFailing": ("warning", False),
    "DICTRateLimitOutboxBacklog": ("warning", False),
    "DICTRateLimitOutboxEventSetAside": ("warning", False),
    # 2.1.0 (issue 15): DICT's answers relayed by the Bridge.
    "DICTRateLimitLookupNotFoundShareHigh": ("warning", False),
    "DICTRateLimitRequestsRefused": ("warning", True),
}
#: Per-policy alerts on DICT's answers (counters), not on a bucket's balance.
ANSWER_ALERTS = {"DICTRateLimitRequestsRefused"}
BUCKET_ALERTS = sorted(
    name
    for name, (_, per_policy) in ALERTS_V2.items()
    if per_policy and name != "DICTRateLimitPolicyMissing" and name not in ANSWER_ALERTS
)


def _rules(paths: list[Path]) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = []
    for path in paths:
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            rules.extend(group["rules"])
    return rules


ALERTS = {rule["alert"]: rule for rule in _rules(RULE_FILES) if "alert" in rule}
RECORDS = [rule["record"] for rule in _rules(RULE_FILES) if "record" in rule]


def _alert_cases() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = []
    for path in TEST_FILES:
        for test in yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]:
            cases.extend(test.get("alert_rule_test", []))
    return cases


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_binary("promtool"), *args], capture_output=True, text=True, check=False)


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_rule_file_passes_promtool_check_rules(path: Path) -> None:
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize("path", TEST_FILES, ids=lambda p: p.name)
def test_promtool_unit_tests_pass(path: Path) -> None:
    result = promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_silent_promtool_case() -> None:
    cases = _alert_cases()
    fires = {case["alertname"] for case in cases if case.get("exp_alerts")}
    silent = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    assert sorted(set(ALERTS) - fires) == [], "alerts without a promtool case where they fire"
    never_silent = {"DICTRateLimitWatchdog"}
    assert sorted(set(ALERTS) - silent - never_silent) == [], "alerts without a case where they stay silent"


def _lifecycles() -> dict[str, set[str]]:
    """Alert -> what its test groups show: silent one evaluation before firing, and silent after firing."""
    seen: dict[str, set[str]] = {name: set() for name in ALERTS}
    for path in TEST_FILES:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
        for test in document["tests"]:
            step = parse_duration(document.get("evaluation_interval", "1m"))
            timeline: dict[str, list[tuple[float, bool]]] = {}
            for case in test.get("alert_rule_test", []):
                timeline.setdefault(case["alertname"], []).append(
                    (parse_duration(case["eval_time"]), bool(case.get("exp_alerts")))
                )
            for name, points in timeline.items():
                firing = [t for t, fires in points if fires]
                if not firing:
                    continue
                if (min(firing) - step, False) in points:
                    seen[name].add("just before")
                if any(t > max(firing) and not fires for t, fires in points):
                    seen[name].add("resolved")
    return seen


def test_every_alert_is_tested_just_before_it_fires_and_after_it_resolves() -> None:
    lifecycles = _lifecycles()
    lifecycles.pop("DICTRateLimitWatchdog")  # always firing
    incomplete = {n: sorted({"just before", "resolved"} - s) for n, s in lifecycles.items() if len(s) < 2}
    assert incomplete == {}


def test_every_firing_case_asserts_exact_labels_and_all_annotations() -> None:
    for case in _alert_cases():
        for expected in case.get("exp_alerts") or []:
            rule = ALERTS[case["alertname"]]
            assert expected["exp_labels"]["severity"] == rule["labels"]["severity"], case["alertname"]
            assert set(expected["exp_annotations"]) == set(rule["annotations"]), case["alertname"]


def test_alert_names_severities_and_identity_labels_are_those_of_major_version_2() -> None:
    assert bundle_version(RULES).split(".")[0] == "2"
    assert set(ALERTS) == set(ALERTS_V2)
    checked = 0
    for case in _alert_cases():
        for expected in case.get("exp_alerts") or []:
            severity, per_policy = ALERTS_V2[case["alertname"]]
            labels = set(expected["exp_labels"]) - {"severity"}
            assert expected["exp_labels"]["severity"] == severity
            assert ("endpoint_id" in labels) == per_policy, case["alertname"]
            extra = labels - DEPLOYMENT - {"endpoint_id"}
            assert extra == set(), f"{case['alertname']} is identified by {extra} too"
            checked += 1
    assert checked > 50


def test_no_alert_carries_the_category_in_its_labels_and_bucket_alerts_carry_it_in_annotations() -> None:
    for name, rule in ALERTS.items():
        assert "psp_category" not in rule.get("labels", {}), name
        assert "psp_category" not in re.findall(r"by \(([^)]*)\)", rule["expr"].split("\n")[-1]), name
    for name in BUCKET_ALERTS:
        annotations = ALERTS[name]["annotations"]
        assert "psp_category" in annotations, name
        assert 'printf "endpoint:dict_rate_limit_remaining:ratio{' in annotations["data_state"], name


def test_descriptions_query_with_the_alerts_own_deployment_labels() -> None:
    identity = ",".join(f"{label}=%q" for label in DEFAULT_DEPLOYMENT_LABELS)
    arguments = " ".join(f"$labels.{label}" for label in DEFAULT_DEPLOYMENT_LABELS)
    queries = 0
    for name, rule in ALERTS.items():
        for text in rule["annotations"].values():
            for query, args in re.findall(r'printf "((?:[^"\\]|\\.)*)"((?: [$.\w]+)*)', text):
                if "{" not in query:  # a number format (printf "%.0f"), not a query
                    continue
                queries += 1
                assert identity in query, (name, query)
                assert args.strip().startswith(arguments), (name, args)
    assert queries > 40


def test_every_alert_holds_its_condition_and_says_how_long_it_keeps_firing() -> None:
    for name, rule in ALERTS.items():
        assert "for" in rule, name
        if name == "DICTRateLimitWatchdog":
            assert rule["expr"] == "vector(1)"
            continue
        if name == "DICTRateLimitBurstExhaustion":  # one snapshot is the evidence; it holds 5m + 5m
            assert "[5m]" in " ".join(r.get("expr", "") for r in _rules(RULE_FILES) if "record" in r)
            continue
        assert effective_for(rule) > 0, f"{name} fires on a single evaluation"
    for name in BUCKET_ALERTS:  # hysteresis: none resolves on the first good evaluation
        assert parse_duration(ALERTS[name].get("keep_firing_for", "0s")) >= 300, name


@pytest.mark.parametrize("name", sorted(ALERTS))
def test_alert_has_severity_static_summary_templated_description_and_runbook(name: str) -> None:
    rule = ALERTS[name]
    assert name.startswith("DICTRateLimit")
    assert rule["labels"]["severity"] in (
        SEVERITIES | {"none"} if name == "DICTRateLimitWatchdog" else SEVERITIES
    )
    annotations = rule["annotations"]
    assert "{{" not in annotations["summary"], "summary must be static"
    assert "{{" in annotations["description"], "description must carry the values"
    assert annotations["runbook_url"] == RUNBOOK_URL + name.lower()


def _github_anchors(markdown: str) -> set[str]:
    """Anchors GitHub derives from headings: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for heading in re.findall(r"^#{1,6} (.+)$", markdown, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def test_every_runbook_url_points_at_a_section_of_docs_runbooks() -> None:
    anchors = _github_anchors((ROOT / "docs" / "runbooks.md").read_text(encoding="utf-8"))
    missing = [
        name
        for name, rule in ALERTS.items()
        if rule["annotations"]["runbook_url"].split("#")[1] not in anchors
    ]
    assert missing == []


def test_docs_list_every_alert_and_how_to_render_for_your_selectors() -> None:
    alerting = (ROOT / "docs" / "alerting.md").read_text(encoding="utf-8")
    assert [name for name in ALERTS if f"`{name}`" not in alerting] == []
    assert "dict-rate-limit rules render" in alerting
    assert "--exporter-selector" in alerting
    assert "alert_relabel_configs" in alerting


def test_rules_use_only_metric_names_from_the_metrics_contract() -> None:
    contract = set(re.findall(r"`(dict_rate_limit_\w+)`", (ROOT / "docs" / "metrics.md").read_text("utf-8")))
    used: set[str] = set()
    for rule in _rules(RULE_FILES):
        # Queries inside annotation templates count; prose (table names like dict_rate_limit_states) does not.
        templates = re.findall(r"\{\{.*?\}\}", " ".join(rule.get("annotations", {}).values()))
        text = rule["expr"] + " ".join(templates)
        used |= set(re.findall(r"(?<![:\w])(dict_rate_limit_\w+)", text))
    assert used, "no metric name found: the pattern is wrong"
    assert sorted(used - contract) == []


def test_recording_rules_are_named_level_metric_operations() -> None:
    assert RECORDS
    for name in RECORDS:  # level endpoint: per deployment and policy; deployment: per deployment only
        assert re.fullmatch(r"(endpoint|deployment):dict_rate_limit_[a-z0-9_]+:[a-z0-9_]+", name), name
    assert len(RECORDS) == len(set(RECORDS))


def test_every_rule_file_declares_the_same_bundle_version_as_the_changelog() -> None:
    version = bundle_version(RULES)
    assert re.fullmatch(r"\d+\.\d+\.\d+", version)
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert f"rules bundle {version}" in changelog


def test_committed_prometheusrule_manifest_matches_its_source() -> None:
    assert MANIFEST.read_text(encoding="utf-8") == render_prometheusrule(RULES), (
        "deploy/kubernetes/base/prometheusrule.yaml drifted: run `.venv/bin/python -m exporter.rules.render`"
    )


def test_prometheusrule_manifest_holds_every_group_unchanged() -> None:
    manifest = yaml.safe_load(MANIFEST.read_text(encoding="utf-8"))
    assert manifest["kind"] == "PrometheusRule"
    assert manifest["metadata"]["labels"]["app.kubernetes.io/version"] == bundle_version(RULES)
    source_groups = [g for p in RULE_FILES for g in yaml.safe_load(p.read_text(encoding="utf-8"))["groups"]]
    assert manifest["spec"]["groups"] == source_groups


def test_fast_rules_shorten_only_hold_durations_and_stay_valid(tmp_path: Path) -> None:
    written = render_fast_rules(RULES, tmp_path, 0.02)
    assert [p.name for p in written] == [p.name for p in RULE_FILES]
    result = promtool("check", "rules", *map(str, written))
    assert result.returncode == 0, result.stdout + result.stderr
    fast = {rule["alert"]: rule for rule in _rules(written) if "alert" in rule}
    assert hysteresis_window(fast["DICTRateLimitWarning"]) == 12  # 10m -> 12s: fires after 6s below
    assert effective_for(fast["DICTRateLimitWarning"]) == 6
    assert effective_for(fast["DICTRateLimitCritical"]) == 2.5
    assert fast["DICTRateLimitBridgeDown"]["for"] == "3s"
    assert fast["DICTRateLimitWarning"]["keep_firing_for"] == "6s"
    held = ("for", "keep_firing_for", "expr")
    for name, rule in fast.items():
        assert {k: v for k, v in rule.items() if k not in held} == {
            k: v for k, v in ALERTS[name].items() if k not in held
        }
        if hysteresis_window(rule) is None:
            assert rule["expr"] == ALERTS[name]["expr"], name
    fast_records = [rule for rule in _rules(written) if "record" in rule]
    assert fast_records == [rule for rule in _rules(RULE_FILES) if "record" in rule]
    assert bundle_version(tmp_path) == bundle_version(RULES)


def test_fast_rules_by_mapping_set_the_named_alerts_effective_delay_and_keep_the_others(
    tmp_path: Path,
) -> None:
    written = render_fast_rules(
        RULES, tmp_path, {"DICTRateLimitWarning": "4s", "DICTRateLimitBridgeDown": "2s"}
    )
    fast = {rule["alert"]: rule for rule in _rules(written) if "alert" in rule}
    assert effective_for(fast["DICTRateLimitWarning"]) == 4
    assert fast["DICTRateLimitWarning"]["keep_firing_for"] == "4s"
    assert fast["DICTRateLimitBridgeDown"]["for"] == "2s"
    assert fast["DICTRateLimitExhausted"] == ALERTS["DICTRateLimitExhausted"]


def test_fast_warning_fires_within_seconds_and_resolves_within_seconds_in_promtool(tmp_path: Path) -> None:
    """The demo's use: at 0.02 the WARNING fires after 6 s below and resolves 12 s after recovering."""
    render_fast_rules(RULES, tmp_path / "rules", 0.02)
    labels = 'job="j",instance="e:9090",endpoint_id="ENTRIES_WRITE",psp_category="A"'
    series = {
        "dict_rate_limit_available_tokens": "36000x9 5400x20 36000x30",
        "dict_rate_limit_capacity": "36000x60",
    }
    timeline = [("15s", False), ("16s", True), ("35s", True), ("45s", False)]
    case = {
        "rule_files": ["rules/dict-rate-limit.rules.yml"],
        "evaluation_interval": "1s",
        "tests": [
            {
                "interval": "1s",
                "input_series": [
                    {"series": f"{name}{{{labels}}}", "values": v} for name, v in series.items()
                ],
                "alert_rule_test": [
                    {
                        "eval_time": at,
                        "alertname": "DICTRateLimitWarning",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "warning",
                                    "job": "j",
                                    "endpoint_id": "ENTRIES_WRITE",
                                },
                                "exp_annotations": ANY_ANNOTATIONS,
                            }
                        ]
                        if fires
                        else [],
                    }
                    for at, fires in timeline
                ],
            }
        ],
    }
    test_file = tmp_path / "fast.test.yml"
    test_file.write_text(yaml.safe_dump(case), encoding="utf-8")
    result = promtool("test", "rules", str(test_file))
    # exp_annotations must match exactly: compare only what promtool says differs, i.e. the alert set.
    output = result.stdout + result.stderr
    blocks = output.split("alertname: DICTRateLimitWarning, time: ")[1:]
    states = {block.split(",")[0]: "got:[]" not in block.replace(" ", "") for block in blocks}
    assert states == {at: True for at, fires in timeline if fires}, output


def test_recording_rules_queried_by_dashboards_and_runbooks_exist() -> None:
    texts = [(ROOT / "docs" / "runbooks.md").read_text(encoding="utf-8")]
    texts += [p.read_text(encoding="utf-8") for p in sorted((ROOT / "dashboards").glob("*.json"))]
    queried = set(re.findall(r"endpoint:dict_rate_limit_\w+:\w+", " ".join(texts)))
    assert queried, "no recording rule queried: the pattern is wrong"
    assert sorted(queried - set(RECORDS)) == []


def test_rule_files_that_disagree_on_the_bundle_version_are_refused(tmp_path: Path) -> None:
    for name, version in (("a.rules.yml", "1.0.0"), ("b.rules.yml", "1.1.0")):
        (tmp_path / name).write_text(f"# bundle-version: {version}\ngroups: []\n", encoding="utf-8")
    with pytest.raises(RulesBundleError, match="different bundle versions"):
        bundle_version(tmp_path)
    (tmp_path / "b.rules.yml").write_text("groups: []\n", encoding="utf-8")
    with pytest.raises(RulesBundleError, match=r"b\.rules\.yml has no"):
        bundle_version(tmp_path)


@pytest.mark.parametrize(
    ("scale", "message"),
    [
        (0, "for_scale must be in"),
        (1.5, "for_scale must be in"),
        ({"DICTRateLimitWarning": "5 min"}, "5 min"),
    ],
)
def test_fast_rules_refuse_an_unusable_scale_or_duration(tmp_path: Path, scale: Any, message: str) -> None:
    with pytest.raises(RulesBundleError, match=message):
        render_fast_rules(RULES, tmp_path, scale)


def test_durations_parse_and_format_like_prometheus() -> None:
    assert parse_duration("1h30m") == 5400
    assert parse_duration("0s") == 0
    assert format_duration(5400) == "1h30m"
    assert format_duration(1.2) == "2s"
    assert format_duration(0) == "0s"


# --- the rule source (templates) and its renderings


def test_rules_dir_is_the_default_rendering_of_the_templates(tmp_path: Path) -> None:
    written = render_rules(tmp_path)
    assert [p.name for p in written] == [p.name for p in RULE_FILES]
    for path in written:
        assert path.read_text(encoding="utf-8") == (RULES / path.name).read_text(encoding="utf-8"), (
            f"rules/{path.name} drifted from its template: python -m exporter.rules.render --defaults"
        )


SELECTOR_SETS = {
    "job regex": Selectors(exporter='job=~".+"', receiver='job=~".+"', alertmanager='job!=""'),
    "namespace exclusion": Selectors(
        exporter='instance!="elsewhere:1",namespace!~"kube-.*"', receiver='instance!~"nowhere.*"'
    ),
}


def _render_with_tests(selectors: Selectors, directory: Path) -> Path:
    rules = directory / "rules"
    render_rules(rules, selectors)
    (rules / "tests").mkdir()
    for test_file in TEST_FILES:
        (rules / "tests" / test_file.name).write_text(test_file.read_text(encoding="utf-8"), encoding="utf-8")
    return rules


@pytest.mark.parametrize("name", sorted(SELECTOR_SETS))
def test_rendering_with_other_selectors_passes_check_rules_and_the_same_unit_tests(
    name: str, tmp_path: Path
) -> None:
    selectors = SELECTOR_SETS[name]
    rules = _render_with_tests(selectors, tmp_path)
    files = sorted(rules.glob("*.rules.yml"))
    checked = promtool("check", "rules", *map(str, files))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    text = " ".join(path.read_text(encoding="utf-8") for path in files)
    assert text.count(selectors.exporter) > 30, "the exporter selector is not in the expressions"
    assert _go_escaped(selectors.exporter) in text, (
        "the exporter selector is not in the descriptions' queries"
    )
    # The test files at once (promtool runs them one after another): the 24-hour ones take seconds each.
    tests = sorted((rules / "tests").glob("*.test.yml"))
    with ThreadPoolExecutor(max_workers=len(tests)) as pool:
        results = list(pool.map(lambda path: promtool("test", "rules", str(path)), tests))
    for path, result in zip(tests, results, strict=True):
        assert result.returncode == 0, (path.name, result.stdout + result.stderr)


def _go_escaped(selector: str) -> str:
    return selector.replace('"', '\\"')


def test_a_selector_that_matches_no_series_fails_the_unit_tests(tmp_path: Path) -> None:
    """The selector reaches every rule: with one the test series do not match, the tests cannot pass."""
    rules = _render_with_tests(Selectors(exporter='job="not-scraped"'), tmp_path)
    result = promtool("test", "rules", str(rules / "tests" / "buckets.test.yml"))
    assert result.returncode == 1
    assert "FAILED" in result.stdout + result.stderr


def test_every_rule_reading_exporter_series_applies_the_selector(tmp_path: Path) -> None:
    render_rules(tmp_path, Selectors(exporter='job="e"', receiver='job="r"'))
    for rule in _rules(sorted(tmp_path.glob("*.rules.yml"))):
        for metric, selector in re.findall(
            r"(?<![:\w])((?:dict_rate_limit|alertmanager)_\w+)(\{[^}]*\})?", rule["expr"]
        ):
            expected = 'job="r"' if metric in RECEIVER_METRICS else 'job="e"'
            if metric.startswith("alertmanager_"):
                continue
            assert expected in selector, (rule.get("alert") or rule.get("record"), metric)


RECEIVER_METRICS = {
    "dict_rate_limit_receiver_build_info",
    "dict_rate_limit_webhook_requests_total",
    "dict_rate_limit_pulsar_publish_failures_total",
    "dict_rate_limit_outbox_oldest_age_seconds",
    "dict_rate_limit_outbox_set_aside",
}


def test_rules_render_command_writes_the_files_and_the_prometheusrule(tmp_path: Path) -> None:
    from exporter.cli import main

    code = main(
        [
            "rules",
            "render",
            "--exporter-selector",
            '{job="dict-rate-limit", namespace="pix"}',
            "--receiver-selector",
            'job="dict-rate-limit-receiver"',
            "--deployment-labels",
            "namespace,participant,job",
            "--output",
            str(tmp_path),
        ]
    )
    assert code == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([p.name for p in RULE_FILES] + ["prometheusrule.yaml"])
    text = (tmp_path / "dict-rate-limit.rules.yml").read_text(encoding="utf-8")
    assert 'dict_rate_limit_available_tokens{job="dict-rate-limit",namespace="pix"}' in text
    assert "by (namespace, participant, job, endpoint_id)" in text
    assert "cluster" not in text.split("groups:")[1]
    manifest = yaml.safe_load((tmp_path / "prometheusrule.yaml").read_text(encoding="utf-8"))
    assert manifest["spec"]["groups"] == [
        g for p in sorted(tmp_path.glob("*.rules.yml")) for g in yaml.safe_load(p.read_text())["groups"]
    ]
    checked = promtool("check", "rules", *map(str, sorted(tmp_path.glob("*.rules.yml"))))
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--lookup-404-share-max", "7", "--lookup-404-share-max: a share between 0 and 1"),
        ("--lookup-404-share-max", "nan", "--lookup-404-share-max: a share between 0 and 1"),
        ("--lookup-min-answers", "0", "--lookup-min-answers: a whole number of at least 1"),
        ("--lookup-min-answers", "1e3", "--lookup-min-answers: a whole number of at least 1"),
        ("--lookup-policies", "ENTRIES.*", "--lookup-policies: not a DICT policy name"),
        ("--lookup-policies", " , ", "--lookup-policies: at least one policy"),
        ("--exporter-selector", "job=dict", "--exporter-selector: not a list of label matchers"),
        ("--receiver-selector", 'job="a" namespace="b"', "--receiver-selector: matchers must be separated"),
        ("--deployment-labels", "namespace,endpoint_id", "--deployment-labels: endpoint_id identifies"),
        ("--deployment-labels", "name-space", "--deployment-labels: not a label name"),
    ],
)
def test_rules_render_refuses_a_bad_selector_with_one_line_and_exit_2(
    option: str, value: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from exporter.cli import main

    assert main(["rules", "render", option, value, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert message in err[0]
    assert not (tmp_path / "out").exists()


def test_selectors_parse_with_or_without_braces_and_escapes() -> None:
    assert parse_selector('{ job = "a", namespace=~"pix-.*" }', "x") == 'job="a",namespace=~"pix-.*"'
    assert parse_selector("", "x") == ""
    assert parse_selector('a="with \\"quote\\""', "x") == 'a="with \\"quote\\""'


def test_selectors_take_the_single_quoted_and_raw_strings_of_promql() -> None:
    assert parse_selector("{job='dict-rate-limit', namespace=~'pix-.*'}", "x") == (
        'job="dict-rate-limit",namespace=~"pix-.*"'
    )
    assert parse_selector("a='it\\'s \"x\"'", "x") == 'a="it\'s \\"x\\""'
    assert parse_selector("a='tab\\there'", "x") == 'a="tab\\there"'
    assert parse_selector('a=`raw \\d "q"`', "x") == 'a="raw \\\\d \\"q\\""'


def test_templates_and_rules_declare_the_same_bundle_version() -> None:
    assert bundle_version(TEMPLATES_DIR) == bundle_version(RULES)


def test_lookup_figures_are_options_of_rules_render_and_reach_the_rule(tmp_path: Path) -> None:
    """A participant whose BCB figure differs renders its own threshold, volume and lookup policies; the
    default rendering's 7.1 % case then no longer fires (the unit tests of rules/ fail on it)."""
    from exporter.cli import main

    out = tmp_path / "rules"
    arguments = ["--lookup-404-share-max", "0.075", "--lookup-min-answers", "500"]
    policies = ["--lookup-policies", "ENTRIES_READ_PARTICIPANT_ANTISCAN,ENTRIES_READ_PARTICIPANT_ANTISCAN_V2"]
    assert main(["rules", "render", *arguments, *policies, "--output", str(out)]) == 0
    rule = {r["alert"]: r for r in _rules(sorted(out.glob("*.rules.yml"))) if "alert" in r}[
        "DICTRateLimitLookupNotFoundShareHigh"
    ]
    assert "ratio24h > 0.075\n" in rule["expr"]
    assert "increase24h >= 500" in rule["expr"]
    description = rule["annotations"]["description"]
    assert "(threshold 7.5%, DICT manual §13.2; counted once 500 lookups" in description
    text = (out / "dict-rate-limit-responses.rules.yml").read_text(encoding="utf-8")
    assert 'endpoint_id=~"ENTRIES_READ_PARTICIPANT_ANTISCAN|ENTRIES_READ_PARTICIPANT_ANTISCAN_V2"' in text
    (out / "tests").mkdir()
    test_file = RULES / "tests" / "responses.test.yml"
    (out / "tests" / test_file.name).write_text(test_file.read_text(encoding="utf-8"), encoding="utf-8")
    result = promtool("test", "rules", str(out / "tests" / test_file.name))
    assert result.returncode == 1
    assert "7.1 % and 6.9 %" in result.stdout + result.stderr
