"""The rules bundle (rules/): promtool-clean, every alert unit-tested, annotated, versioned, linked to a
runbook, written against the metrics contract, and its PrometheusRule manifest in step with its source."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter.rules.render import (
    MANIFEST,
    RulesBundleError,
    bundle_version,
    format_duration,
    parse_duration,
    render_fast_rules,
    render_prometheusrule,
    rule_files,
)
from tests.support.env import ROOT, require_binary

RULES = ROOT / "rules"
RULE_FILES = rule_files(RULES)
TEST_FILES = sorted((RULES / "tests").glob("*.test.yml"))
RUNBOOK_URL = (
    "https://github.com/dict-rate-limit-exporter/dict-rate-limit-exporter/blob/main/docs/runbooks.md#"
)
SEVERITIES = {"critical", "warning", "info"}

#: Bundle major version 1: alert -> (severity, labels taken from the series besides job). Changing a name
#: or a label set here is a breaking change and needs a new major version in every rule file's header.
ALERTS_V1: dict[str, tuple[str, frozenset[str]]] = {
    "DICTRateLimitWarning": ("warning", frozenset({"endpoint_id", "psp_category"})),
    "DICTRateLimitCritical": ("critical", frozenset({"endpoint_id", "psp_category"})),
    "DICTRateLimitExhaustionSoon": ("warning", frozenset({"endpoint_id", "psp_category"})),
    "DICTRateLimitExhausted": ("critical", frozenset({"endpoint_id", "psp_category"})),
    "DICTRateLimitBurstExhaustion": ("warning", frozenset({"endpoint_id", "psp_category"})),
    "DICTRateLimitPoliciesListLow": ("warning", frozenset({"endpoint_id", "psp_category"})),
    "DICTRateLimitCategoryChanged": ("warning", frozenset()),
    "DICTRateLimitExporterAbsent": ("critical", frozenset()),
    "DICTRateLimitBridgeDown": ("critical", frozenset()),
    "DICTRateLimitPollsFailing": ("warning", frozenset()),
    "DICTRateLimitDataStale": ("critical", frozenset()),
    "DICTRateLimitHistoryWriteFailing": ("warning", frozenset()),
    "DICTRateLimitHistoryDropping": ("warning", frozenset()),
    "DICTRateLimitReceiverDown": ("warning", frozenset()),
    "DICTRateLimitPulsarPublishFailing": ("warning", frozenset()),
    "DICTRateLimitOutboxBacklog": ("warning", frozenset()),
    # Added in 1.x (a new alert, no label of an existing one changed): issue 17.
    "DICTRateLimitOutboxEventSetAside": ("warning", frozenset()),
}


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
    assert sorted(set(ALERTS) - silent) == [], "alerts without a promtool case where they stay silent"


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


def test_every_alert_is_tested_just_before_its_for_elapses_and_after_it_resolves() -> None:
    incomplete = {n: sorted({"just before", "resolved"} - s) for n, s in _lifecycles().items() if len(s) < 2}
    assert incomplete == {}


def test_every_firing_case_asserts_exact_labels_and_all_annotations() -> None:
    for case in _alert_cases():
        for expected in case.get("exp_alerts") or []:
            rule = ALERTS[case["alertname"]]
            assert expected["exp_labels"]["severity"] == rule["labels"]["severity"], case["alertname"]
            assert set(expected["exp_annotations"]) == set(rule["annotations"]), case["alertname"]


def test_alert_names_severities_and_series_labels_are_those_of_major_version_1() -> None:
    assert bundle_version(RULES).split(".")[0] == "1"
    assert set(ALERTS) == set(ALERTS_V1)
    for case in _alert_cases():
        for expected in case.get("exp_alerts") or []:
            severity, series_labels = ALERTS_V1[case["alertname"]]
            labels = set(expected["exp_labels"]) - {"severity", "job"}
            assert expected["exp_labels"]["severity"] == severity
            assert labels == series_labels, case["alertname"]


@pytest.mark.parametrize("name", sorted(ALERTS))
def test_alert_has_severity_static_summary_templated_description_and_runbook(name: str) -> None:
    rule = ALERTS[name]
    assert name.startswith("DICTRateLimit")
    assert rule["labels"]["severity"] in SEVERITIES
    assert parse_duration(rule["for"]) > 0, "every alert holds its condition for a while before firing"
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


def test_docs_list_every_alert_and_the_expected_job_names() -> None:
    alerting = (ROOT / "docs" / "alerting.md").read_text(encoding="utf-8")
    assert [name for name in ALERTS if f"`{name}`" not in alerting] == []
    assert "`dict-rate-limit-exporter`" in alerting
    assert "`dict-rate-limit-receiver`" in alerting


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
    for name in RECORDS:
        assert re.fullmatch(r"endpoint:dict_rate_limit_[a-z_]+:[a-z0-9_]+", name), name


def test_every_rule_file_declares_the_same_bundle_version_as_the_changelog() -> None:
    version = bundle_version(RULES)
    assert re.fullmatch(r"\d+\.\d+\.\d+", version)
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert f"rules bundle {version}" in changelog


def test_committed_prometheusrule_manifest_matches_its_source() -> None:
    assert MANIFEST.read_text(encoding="utf-8") == render_prometheusrule(RULES), (
        "deploy/kubernetes/prometheusrule.yaml drifted: run `.venv/bin/python -m exporter.rules.render`"
    )


def test_prometheusrule_manifest_holds_every_group_unchanged() -> None:
    manifest = yaml.safe_load(MANIFEST.read_text(encoding="utf-8"))
    assert manifest["kind"] == "PrometheusRule"
    assert manifest["metadata"]["labels"]["app.kubernetes.io/version"] == bundle_version(RULES)
    source_groups = [g for p in RULE_FILES for g in yaml.safe_load(p.read_text(encoding="utf-8"))["groups"]]
    assert manifest["spec"]["groups"] == source_groups


def test_fast_rules_shorten_only_for_durations_and_stay_valid(tmp_path: Path) -> None:
    written = render_fast_rules(RULES, tmp_path, 0.02)
    assert [p.name for p in written] == [p.name for p in RULE_FILES]
    result = promtool("check", "rules", *map(str, written))
    assert result.returncode == 0, result.stdout + result.stderr
    fast = {rule["alert"]: rule for rule in _rules(written) if "alert" in rule}
    assert fast["DICTRateLimitWarning"]["for"] == "6s"
    assert fast["DICTRateLimitCritical"]["for"] == "3s"
    assert fast["DICTRateLimitExhausted"]["for"] == "2s"
    for name, rule in fast.items():
        assert {k: v for k, v in rule.items() if k != "for"} == {
            k: v for k, v in ALERTS[name].items() if k != "for"
        }
    assert bundle_version(tmp_path) == bundle_version(RULES)


def test_fast_rules_by_mapping_set_the_named_alerts_and_keep_the_others(tmp_path: Path) -> None:
    written = render_fast_rules(
        RULES, tmp_path, {"DICTRateLimitWarning": "4s", "DICTRateLimitCritical": "2s"}
    )
    fast = {rule["alert"]: rule for rule in _rules(written) if "alert" in rule}
    assert fast["DICTRateLimitWarning"]["for"] == "4s"
    assert fast["DICTRateLimitCritical"]["for"] == "2s"
    assert fast["DICTRateLimitExhausted"]["for"] == ALERTS["DICTRateLimitExhausted"]["for"]


def test_fast_warning_fires_within_seconds_in_promtool(tmp_path: Path) -> None:
    """The demo's use: at 0.02 the 5-minute WARNING hold becomes 6 s, so a 1 s evaluation fires it at 6 s."""
    render_fast_rules(RULES, tmp_path / "rules", 0.02)
    labels = 'job="dict-rate-limit-exporter",instance="e:9090",endpoint_id="ENTRIES_WRITE",psp_category="A"'
    series = {
        "dict_rate_limit_remaining_ratio": "0.15x20",
        "dict_rate_limit_available_tokens": "5400x20",
        "dict_rate_limit_capacity": "36000x20",
        "dict_rate_limit_recovery_eta_seconds": "1530x20",
    }
    warning = {
        "exp_labels": {
            "severity": "warning",
            "job": "dict-rate-limit-exporter",
            "endpoint_id": "ENTRIES_WRITE",
            "psp_category": "A",
        },
        "exp_annotations": {
            "summary": ALERTS["DICTRateLimitWarning"]["annotations"]["summary"],
            "description": "ENTRIES_WRITE (category A) has 5400 of 36000 tokens left (15%; WARNING at or "
            "below 20%). Not draining; full again in 25m 30s if traffic stops.",
            "runbook_url": RUNBOOK_URL + "dictratelimitwarning",
        },
    }
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
                    {"eval_time": "5s", "alertname": "DICTRateLimitWarning", "exp_alerts": []},
                    {"eval_time": "6s", "alertname": "DICTRateLimitWarning", "exp_alerts": [warning]},
                ],
            }
        ],
    }
    test_file = tmp_path / "fast.test.yml"
    test_file.write_text(yaml.safe_dump(case), encoding="utf-8")
    result = promtool("test", "rules", str(test_file))
    assert result.returncode == 0, result.stdout + result.stderr


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
