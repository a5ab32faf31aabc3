"""The seed's three alert rules (tests/rules/seed_rules.yml, verbatim from seed 000) still load and still work
against the exporter's metric names and semantics, and ours keep their names and meaning."""

from __future__ import annotations

import hashlib
import re
import subprocess

import yaml

from tests.support.env import ROOT, require_binary

SEED_RULES = ROOT / "tests" / "rules" / "seed_rules.yml"
SEED_DOCUMENT = ROOT.parent / "shared" / "seeds" / "000_6cfa93ee3b7daa3d.txt"
#: SHA-256 of the YAML block under "### Prometheus Alerts" in seed 000, taken when the copy was made.
SEED_SHA256 = "7c570bcd344a503432fad54485a88a410c88c2ac9e7c606ef493c4747bfeb586"


def _seed_block(document: str) -> str:
    section = document.split("### Prometheus Alerts", 1)[1]
    match = re.search(r"```yaml\n(.*?)```", section, flags=re.DOTALL)
    assert match is not None, "seed 000 has no YAML block under 'Prometheus Alerts'"
    return match.group(1)


def test_seed_rules_are_the_seed_yaml_verbatim() -> None:
    copy = SEED_RULES.read_text(encoding="utf-8")
    assert hashlib.sha256(copy.encode()).hexdigest() == SEED_SHA256
    # Where the seeds travel with the tree (shared/ beside the clone, as in CI), compare with the source too.
    if SEED_DOCUMENT.exists():
        assert copy == _seed_block(SEED_DOCUMENT.read_text(encoding="utf-8"))


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_binary("promtool"), *args], capture_output=True, text=True, check=False)


def test_seed_rules_pass_promtool_check_rules() -> None:
    result = promtool("check", "rules", str(SEED_RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 3 rules found" in result.stdout


def test_seed_rules_fire_on_the_exporters_metrics_in_promtool() -> None:
    result = promtool("test", "rules", str(ROOT / "tests" / "rules" / "seed_rules.test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_seed_alert_names_keep_their_severity_and_for_in_the_bundle() -> None:
    seed = {
        r["alert"]: r for g in yaml.safe_load(SEED_RULES.read_text("utf-8"))["groups"] for r in g["rules"]
    }
    ours = {
        r["alert"]: r
        for path in sorted((ROOT / "rules").glob("*.rules.yml"))
        for g in yaml.safe_load(path.read_text("utf-8"))["groups"]
        for r in g["rules"]
        if "alert" in r
    }
    for name, rule in seed.items():
        assert name in ours
        assert ours[name]["labels"]["severity"] == rule["labels"]["severity"]
        assert ours[name]["for"] == rule["for"]


def test_seed_rules_use_only_names_the_exporter_exports() -> None:
    contract = set(re.findall(r"`(dict_rate_limit_\w+)`", (ROOT / "docs" / "metrics.md").read_text("utf-8")))
    used = set(re.findall(r"dict_rate_limit_\w+", "".join(r["expr"] for r in _seed_rules())))
    assert used == {"dict_rate_limit_utilization_percent", "dict_rate_limit_exhaustion_projection_seconds"}
    assert used <= contract


def _seed_rules() -> list[dict[str, str]]:
    return [r for g in yaml.safe_load(SEED_RULES.read_text("utf-8"))["groups"] for r in g["rules"]]
