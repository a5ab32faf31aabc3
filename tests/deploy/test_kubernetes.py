"""The example Kubernetes manifests agree with the image, the configuration keys, the rules and each other."""

from __future__ import annotations

import re
from typing import Any

import yaml

from exporter import config
from tests.support.env import ROOT

DEPLOY = ROOT / "deploy" / "kubernetes"
HEALTH_PATHS = {
    "startupProbe": "/health/startup",
    "livenessProbe": "/health/live",
    "readinessProbe": "/health/ready",
}


def documents() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name in {"kustomization.yaml", "prometheusrule.yaml"}:
            continue
        docs.extend(doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc)
    return docs


def of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in documents() if doc["kind"] == kind}


def pod_specs() -> dict[str, dict[str, Any]]:
    workloads = {**of_kind("Deployment"), **of_kind("Job")}
    return {name: doc["spec"]["template"]["spec"] for name, doc in workloads.items()}


def ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def test_kustomization_lists_every_manifest_and_the_rendered_rules() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text(encoding="utf-8"))
    files = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files | {"prometheusrule.yaml"}
    assert [image["name"] for image in kustomization["images"]] == ["dict-rate-limit-exporter"]


def test_pods_run_as_the_image_uid_without_privileges() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    uid = int(re.search(r"^USER (\d+):", dockerfile, flags=re.MULTILINE).group(1))  # type: ignore[union-attr]
    for name, spec in pod_specs().items():
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] == uid, name
        for container in spec["containers"]:
            assert container["image"] == "dict-rate-limit-exporter", name
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["capabilities"]["drop"] == ["ALL"], name


def test_servers_have_the_seeds_ports_and_health_probes() -> None:
    defaults = config.Settings()
    expected = {
        "dict-rate-limit-exporter": {"metrics": defaults.metrics_port, "health": defaults.health_check_port},
        "dict-rate-limit-receiver": {
            "webhook": defaults.receiver_port,
            "metrics": defaults.metrics_port,
            "health": defaults.health_check_port,
        },
    }
    assert (defaults.metrics_port, defaults.health_check_port, defaults.receiver_port) == (9090, 8080, 9097)
    specs = pod_specs()
    for name, wanted in expected.items():
        (container,) = specs[name]["containers"]
        assert container["args"] == [name.removeprefix("dict-rate-limit-")]
        assert ports(container) == wanted
        for probe, path in HEALTH_PATHS.items():
            assert container[probe]["httpGet"] == {"path": path, "port": "health"}, (name, probe)


def test_environment_names_are_configuration_keys_with_valid_values() -> None:
    known = {key.env for key in config.KEYS} | {key.env + "_FILE" for key in config.KEYS if key.secret}
    (configmap,) = of_kind("ConfigMap").values()
    assert set(configmap["data"]) <= known
    for name, spec in pod_specs().items():
        for container in spec["containers"]:
            assert {e["name"] for e in container.get("env", [])} <= known, name
    # Every value parses (the receiver command skips the exporter's certificate-file existence checks).
    settings = config.load("receiver", environ=configmap["data"])
    assert settings.poll_interval_seconds == 30.0
    assert settings.pulsar_topic == config.DEFAULT_PULSAR_TOPIC


def test_secret_files_and_volumes_resolve() -> None:
    secrets = of_kind("Secret")
    for name, spec in pod_specs().items():
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            for env in container.get("env", []):
                if env["name"].endswith("_FILE"):
                    directory, _, filename = env["value"].rpartition("/")
                    volume = volumes[mounts[directory]]["secret"]
                    keys = set(secrets[volume["secretName"]]["stringData"])
                    assert filename in keys, (name, env["name"])
                    assert all(item["key"] in keys for item in volume.get("items", [])), name


def test_services_select_the_pods_and_are_named_after_the_rules_jobs() -> None:
    rules_text = "".join(p.read_text(encoding="utf-8") for p in (ROOT / "rules").glob("*.rules.yml"))
    specs = pod_specs()
    deployments = of_kind("Deployment")
    for name, service in of_kind("Service").items():
        assert f'job="{name}"' in rules_text, name
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
        container_ports = ports(specs[name]["containers"][0])
        for port in service["spec"]["ports"]:
            assert port["port"] == container_ports[port["targetPort"]], (name, port["name"])


def test_service_monitors_scrape_at_the_poll_interval() -> None:
    (configmap,) = of_kind("ConfigMap").values()
    interval = f"{int(float(configmap['data']['POLL_INTERVAL_SECONDS']))}s"
    services = of_kind("Service")
    for name, monitor in of_kind("ServiceMonitor").items():
        service = services[name]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        service_ports = {p["name"] for p in service["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in service_ports
            assert endpoint["interval"] == interval


def test_migration_job_runs_migrate_up() -> None:
    (container,) = pod_specs()["dict-rate-limit-migrate"]["containers"]
    assert container["args"] == ["migrate", "up"]


def test_exporter_stays_scrapeable_while_not_ready() -> None:
    # Not ready = Bridge or database unreachable: the moment its metrics matter most.
    assert of_kind("Service")["dict-rate-limit-exporter"]["spec"]["publishNotReadyAddresses"] is True
