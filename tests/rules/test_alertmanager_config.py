"""alertmanager/alertmanager.yml: valid for amtool, every alert of rules/ routed as intended, inhibitions
working in a real Alertmanager, and the rendered copy used by the demo and the end-to-end tests."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from devstack.alertmanager_config import SOURCE, render_alertmanager_config
from tests.support.env import ROOT, require_binary
from tests.support.receiver import alertmanager, am_alert

WEBHOOK = "dict-rate-limit-receiver"
PAGER = "dict-rate-limit-pager"
CHAT = "dict-rate-limit-chat"
WATCHDOG = "dict-rate-limit-watchdog"

#: Where each alert of the bundle must go. A new alert in rules/ without a line here fails the suite.
ROUTING_CASES: dict[str, list[str]] = {
    "DICTRateLimitCritical": [WEBHOOK, PAGER],
    "DICTRateLimitExhausted": [WEBHOOK, PAGER],
    "DICTRateLimitWarning": [WEBHOOK, CHAT],
    "DICTRateLimitExhaustionSoon": [WEBHOOK, CHAT],
    "DICTRateLimitBurstExhaustion": [WEBHOOK, CHAT],
    "DICTRateLimitPoliciesListLow": [WEBHOOK, CHAT],
    "DICTRateLimitCategoryChanged": [WEBHOOK, CHAT],
    "DICTRateLimitExporterAbsent": [WEBHOOK, PAGER],
    "DICTRateLimitBridgeDown": [WEBHOOK, PAGER],
    "DICTRateLimitDataStale": [WEBHOOK, PAGER],
    "DICTRateLimitPollsFailing": [WEBHOOK, CHAT],
    "DICTRateLimitHistoryWriteFailing": [WEBHOOK, CHAT],
    "DICTRateLimitHistoryDropping": [WEBHOOK, CHAT],
    "DICTRateLimitReceiverDown": [WEBHOOK, CHAT],
    "DICTRateLimitPulsarPublishFailing": [WEBHOOK, CHAT],
    "DICTRateLimitOutboxBacklog": [WEBHOOK, CHAT],
    "DICTRateLimitOutboxEventSetAside": [WEBHOOK, CHAT],
    "DICTRateLimitPolicyMissing": [WEBHOOK, CHAT],
    "DICTRateLimitReceiverFailing": [WEBHOOK, CHAT],
    "DICTRateLimitAlertDeliveryFailing": [WEBHOOK, CHAT],
    "DICTRateLimitLookupNotFoundShareHigh": [WEBHOOK, CHAT],
    "DICTRateLimitRequestsRefused": [WEBHOOK, CHAT],
    "DICTRateLimitWatchdog": [WATCHDOG],
}


def bundle_alerts() -> dict[str, dict[str, Any]]:
    """Every alerting rule of rules/*.yml by name."""
    alerts: dict[str, dict[str, Any]] = {}
    for path in sorted((ROOT / "rules").glob("*.yml")):
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for group in document.get("groups", []):
            for rule in group.get("rules", []):
                if "alert" in rule:
                    alerts[rule["alert"]] = rule
    return alerts


def _labels(rule: dict[str, Any]) -> list[str]:
    """The labels the alert carries at Alertmanager: its static labels, plus the policy for bucket alerts."""
    labels = {"alertname": rule["alert"], **{k: str(v) for k, v in rule.get("labels", {}).items()}}
    if "endpoint:" in rule["expr"] or "endpoint_id" in rule["expr"]:
        labels.setdefault("endpoint_id", "ENTRIES_WRITE")
    labels.setdefault("job", "dict-rate-limit")
    return [f"{key}={value}" for key, value in sorted(labels.items())]


def amtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_binary("amtool"), *args], check=False, capture_output=True, text=True)


def test_reference_config_passes_amtool_check_config() -> None:
    result = amtool("check-config", str(SOURCE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 inhibit rules" in result.stdout
    for rule in yaml.safe_load(SOURCE.read_text(encoding="utf-8"))["inhibit_rules"]:
        assert {"cluster", "namespace", "participant", "job"} <= set(rule["equal"]), rule


def test_every_alert_of_the_rules_bundle_has_a_routing_case() -> None:
    alerts = bundle_alerts()
    assert alerts, "rules/ holds no alerting rule"
    missing = sorted(set(alerts) - set(ROUTING_CASES))
    assert not missing, f"alerts of rules/ without a routing case in ROUTING_CASES: {missing}"
    assert all(name.startswith("DICTRateLimit") for name in alerts)


@pytest.mark.parametrize("name", sorted(ROUTING_CASES))
def test_alert_reaches_the_webhook_and_its_on_call_receiver(name: str) -> None:
    rules = bundle_alerts()
    if name not in rules:
        pytest.fail(f"{name} has a routing case but is no longer in rules/: remove it from ROUTING_CASES")
    expected = ROUTING_CASES[name]
    severity = rules[name]["labels"]["severity"]
    assert (PAGER in expected) == (severity == "critical"), f"{name} is {severity}: routing case disagrees"
    assert (WEBHOOK in expected) == (severity != "none"), "the Watchdog goes to its own receiver only"
    result = amtool(
        "config",
        "routes",
        "test",
        f"--config.file={SOURCE}",
        f"--verify.receivers={','.join(expected)}",
        *_labels(rules[name]),
    )
    assert result.returncode == 0, f"{name}: {result.stdout} {result.stderr}"


@pytest.mark.parametrize(("severity", "on_call"), [("CRITICAL", PAGER), ("Warning", CHAT)])
def test_severities_are_matched_in_any_case(severity: str, on_call: str) -> None:
    result = amtool(
        "config",
        "routes",
        "test",
        f"--config.file={SOURCE}",
        f"--verify.receivers={WEBHOOK},{on_call}",
        "alertname=DICTRateLimitCritical",
        f"severity={severity}",
        "endpoint_id=ENTRIES_WRITE",
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_of_other_bundles_do_not_reach_the_webhook() -> None:
    result = amtool(
        "config",
        "routes",
        "test",
        f"--config.file={SOURCE}",
        "--verify.receivers=default",
        "alertname=NodeDown",
        "severity=critical",
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_rendered_config_points_at_the_given_webhook_and_token_file(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    out = render_alertmanager_config(
        "http://127.0.0.1:1234/alerts", token, tmp_path / "am" / "am.yml", fast=True
    )
    result = amtool("check-config", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(out.read_text())
    webhook = next(r for r in config["receivers"] if r["name"] == WEBHOOK)["webhook_configs"][0]
    assert webhook["url"] == "http://127.0.0.1:1234/alerts"
    assert webhook["send_resolved"] is True
    assert webhook["http_config"]["authorization"]["credentials_file"] == str(token)
    assert config["route"]["group_wait"] == "1s"
    assert all(route["group_interval"] == "1s" for route in config["route"]["routes"])
    assert all(Path(pattern).is_absolute() for pattern in config["templates"])


def _state(manager: Any, name: str, endpoint: str | None) -> str:
    for item in manager.alerts():
        labels = item["labels"]
        if labels["alertname"] == name and labels.get("endpoint_id") == endpoint:
            return str(item["status"]["state"])
    return "absent"


def _wait_for_state(manager: Any, name: str, endpoint: str, state: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _state(manager, name, endpoint) != state:
        time.sleep(0.2)


def _deployment_alerts(namespace: str) -> list[dict[str, Any]]:
    base = {"job": "dict-rate-limit-exporter", "namespace": namespace}
    return [
        am_alert(
            {"alertname": "DICTRateLimitExhausted", "severity": "critical", "endpoint_id": "E1", **base}
        ),
        am_alert({"alertname": "DICTRateLimitCritical", "severity": "critical", "endpoint_id": "E1", **base}),
        am_alert({"alertname": "DICTRateLimitWarning", "severity": "warning", "endpoint_id": "E1", **base}),
        am_alert({"alertname": "DICTRateLimitBridgeDown", "severity": "critical", **base}),
        am_alert({"alertname": "DICTRateLimitDataStale", "severity": "critical", **base}),
    ]


def _states(manager: Any) -> dict[tuple[str, str | None, str | None], str]:
    return {
        (a["labels"]["alertname"], a["labels"].get("namespace"), a["labels"].get("endpoint_id")): a["status"][
            "state"
        ]
        for a in manager.alerts()
    }


def test_inhibitions_never_cross_deployments_and_one_condition_pages_once(tmp_path: Path) -> None:
    """Namespace a has every condition; namespace b only the ones the inhibitions would wrongly hide."""
    binary = require_binary("prometheus-alertmanager")
    config = render_alertmanager_config(
        "http://127.0.0.1:9/alerts", tmp_path / "token", tmp_path / "am.yml", fast=True
    )
    with alertmanager(binary, config, tmp_path) as manager:
        b = {"job": "dict-rate-limit-exporter", "namespace": "b"}
        manager.post(
            *_deployment_alerts("a"),
            am_alert(
                {"alertname": "DICTRateLimitCritical", "severity": "critical", "endpoint_id": "E1", **b}
            ),
            am_alert({"alertname": "DICTRateLimitWarning", "severity": "warning", "endpoint_id": "E2", **b}),
            am_alert({"alertname": "DICTRateLimitDataStale", "severity": "critical", **b}),
        )
        expected = {
            ("DICTRateLimitExhausted", "a", "E1"): "active",
            ("DICTRateLimitCritical", "a", "E1"): "suppressed",  # the empty bucket pages once
            ("DICTRateLimitWarning", "a", "E1"): "suppressed",
            ("DICTRateLimitBridgeDown", "a", None): "active",
            ("DICTRateLimitDataStale", "a", None): "suppressed",  # one Bridge outage pages once
            ("DICTRateLimitCritical", "b", "E1"): "active",  # a's Exhausted on E1 does not reach b
            ("DICTRateLimitWarning", "b", "E2"): "active",
            ("DICTRateLimitDataStale", "b", None): "active",  # a's BridgeDown does not reach b
        }
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and _states(manager) != expected:
            time.sleep(0.2)
        assert _states(manager) == expected


def test_a_critical_silences_the_warning_of_its_own_policy_and_deployment_only(
    tmp_path: Path,
) -> None:
    binary = require_binary("prometheus-alertmanager")
    config = render_alertmanager_config(
        "http://127.0.0.1:9/alerts", tmp_path / "token", tmp_path / "am.yml", fast=True
    )
    job = {"job": "dict-rate-limit-exporter"}
    with alertmanager(binary, config, tmp_path) as manager:
        manager.post(
            am_alert(
                {
                    "alertname": "DICTRateLimitCritical",
                    "severity": "CRITICAL",
                    "endpoint_id": "ENTRIES_WRITE",
                    **job,
                }
            ),
            am_alert(
                {
                    "alertname": "DICTRateLimitWarning",
                    "severity": "warning",
                    "endpoint_id": "ENTRIES_WRITE",
                    **job,
                }
            ),
            am_alert(
                {
                    "alertname": "DICTRateLimitWarning",
                    "severity": "warning",
                    "endpoint_id": "CLAIMS_READ",
                    **job,
                }
            ),
            am_alert(
                {
                    "alertname": "DICTRateLimitWarning",
                    "severity": "warning",
                    "endpoint_id": "ENTRIES_WRITE",
                    "job": "dict-rate-limit-exporter",
                    "cluster": "c2",
                }
            ),
            am_alert({"alertname": "DICTRateLimitPollsFailing", "severity": "warning", **job}),
        )
        _wait_for_state(manager, "DICTRateLimitWarning", "ENTRIES_WRITE", "suppressed")
        states = {
            (a["labels"]["alertname"], a["labels"].get("endpoint_id"), a["labels"].get("cluster")): a[
                "status"
            ]["state"]
            for a in manager.alerts()
        }
        assert states == {
            ("DICTRateLimitCritical", "ENTRIES_WRITE", None): "active",
            ("DICTRateLimitWarning", "ENTRIES_WRITE", None): "suppressed",  # upper-case CRITICAL matches too
            ("DICTRateLimitWarning", "CLAIMS_READ", None): "active",
            ("DICTRateLimitWarning", "ENTRIES_WRITE", "c2"): "active",  # cluster c1's Critical, c2's Warning
            ("DICTRateLimitPollsFailing", None, None): "active",
        }


def test_answer_alerts_are_silenced_only_by_a_bucket_page_of_their_own_participant_and_policy(
    tmp_path: Path,
) -> None:
    """Participant 1's empty ENTRIES_WRITE bucket explains its 429s there, not participant 2's, nor 1's
    429s on another policy, nor its 404 share (not a per-policy alert)."""
    binary = require_binary("prometheus-alertmanager")
    config = render_alertmanager_config(
        "http://127.0.0.1:9/alerts", tmp_path / "token", tmp_path / "am.yml", fast=True
    )
    one = {"job": "dict-rate-limit", "participant": "11111111"}
    two = {"job": "dict-rate-limit", "participant": "22222222"}
    refused = {"alertname": "DICTRateLimitRequestsRefused", "severity": "warning"}
    exhausted = {"alertname": "DICTRateLimitExhausted", "severity": "critical"}
    with alertmanager(binary, config, tmp_path) as manager:
        manager.post(
            am_alert(exhausted | {"endpoint_id": "ENTRIES_WRITE"} | one),
            am_alert(refused | {"endpoint_id": "ENTRIES_WRITE"} | one),
            am_alert(refused | {"endpoint_id": "CLAIMS_READ"} | one),
            am_alert(refused | {"endpoint_id": "ENTRIES_WRITE"} | two),
            am_alert({"alertname": "DICTRateLimitLookupNotFoundShareHigh", "severity": "warning"} | one),
        )
        _wait_for_state(manager, "DICTRateLimitRequestsRefused", "ENTRIES_WRITE", "suppressed")
        states = {
            (labels["alertname"], labels.get("endpoint_id"), labels["participant"]): a["status"]["state"]
            for a in manager.alerts()
            for labels in [a["labels"]]
        }
        assert states == {
            ("DICTRateLimitExhausted", "ENTRIES_WRITE", "11111111"): "active",
            ("DICTRateLimitRequestsRefused", "ENTRIES_WRITE", "11111111"): "suppressed",
            ("DICTRateLimitRequestsRefused", "CLAIMS_READ", "11111111"): "active",
            ("DICTRateLimitRequestsRefused", "ENTRIES_WRITE", "22222222"): "active",
            ("DICTRateLimitLookupNotFoundShareHigh", None, "11111111"): "active",
        }
