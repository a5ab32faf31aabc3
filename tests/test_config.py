"""Configuration: precedence, validation with one clear line naming the key, secrets from files, masking."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from exporter import config
from exporter.config import ConfigError, PolicyThreshold


def test_defaults_match_the_seeds_and_the_dict_budget() -> None:
    settings = config.load("exporter", environ={})
    assert settings.metrics_port == 9090
    assert settings.health_check_port == 8080
    assert settings.rate_limit_retention_months == 13
    assert settings.poll_interval_seconds == 30.0
    assert settings.pulsar_topic == "persistent://lb-conn/dict/rate-limit-alerts"
    assert settings.threshold_for("ENTRIES_WRITE") == PolicyThreshold(warning=0.20, critical=0.10)


def test_flags_beat_environment_which_beats_the_yaml_file(tmp_path: Path) -> None:
    file = tmp_path / "config.yaml"
    file.write_text("poll_interval_seconds: 60\nmetrics_port: 9100\nlog_level: debug\n")
    settings = config.load(
        "exporter",
        flags={"config_file": str(file), "cfg_metrics_port": "9200"},
        environ={"POLL_INTERVAL_SECONDS": "45", "METRICS_PORT": "9150"},
    )
    assert settings.log_level == "debug"  # only in the file
    assert settings.poll_interval_seconds == 45.0  # env over file
    assert settings.metrics_port == 9200  # flag over env


@pytest.mark.parametrize(
    ("environ", "key", "reason"),
    [
        ({"POLL_INTERVAL_SECONDS": "soon"}, "POLL_INTERVAL_SECONDS", "must be a number"),
        ({"METRICS_PORT": "70000"}, "METRICS_PORT", "must be >= 0 and <= 65535"),
        ({"BRIDGE_ADDRESS": "bridge"}, "BRIDGE_ADDRESS", "must be HOST:PORT"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL", "must be one of"),
        ({"BRIDGE_TLS": "maybe"}, "BRIDGE_TLS", "must be true or false"),
        ({"WARNING_REMAINING_RATIO": "1.5"}, "WARNING_REMAINING_RATIO", "<= 1.0"),
        ({"CRITICAL_REMAINING_RATIO": "0.3"}, "CRITICAL_REMAINING_RATIO", "must be below"),
        ({"POLICY_THRESHOLDS": "KEYS_CHECK=0.1/0.2"}, "POLICY_THRESHOLDS", "critical (0.2) must be below"),
        ({"POLICY_THRESHOLDS": "KEYS_CHECK"}, "POLICY_THRESHOLDS", "NAME=WARNING/CRITICAL"),
        ({"BRIDGE_TLS_CERT_FILE": "/nope.pem"}, "BRIDGE_TLS_CERT_FILE", "needs both"),
        ({"BRIDGE_TLS_CA_FILE": "/nope.pem"}, "BRIDGE_TLS_CA_FILE", "does not exist"),
        ({"DATABASE_URL_FILE": "/nonexistent/secret"}, "DATABASE_URL_FILE", "cannot read secret file"),
    ],
)
def test_an_invalid_value_names_its_key_and_the_reason(
    environ: dict[str, str], key: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        config.load("exporter", environ=environ)
    assert caught.value.key == key
    assert reason in caught.value.reason


def test_an_unknown_yaml_key_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "config.yaml"
    file.write_text("poll_interval: 30\n")
    with pytest.raises(ConfigError, match=r"^poll_interval: unknown key"):
        config.load("exporter", flags={"config_file": str(file)}, environ={})


def test_secrets_come_from_files_and_are_masked(tmp_path: Path) -> None:
    secret = tmp_path / "db"
    secret.write_text("postgresql://dict:s3cret@db.internal:5432/dict\n")
    token = tmp_path / "token"
    token.write_text("abc123\n")
    settings = config.load(
        "all-in-one", environ={"DATABASE_URL_FILE": str(secret), "WEBHOOK_BEARER_TOKEN_FILE": str(token)}
    )
    assert settings.database_url == "postgresql://dict:s3cret@db.internal:5432/dict"
    assert settings.webhook_bearer_token == "abc123"
    shown = config.effective(settings, "all-in-one")
    assert shown["DATABASE_URL"] == "postgresql://dict:***@db.internal:5432/dict"
    assert shown["WEBHOOK_BEARER_TOKEN"] == "***"
    assert "s3cret" not in json.dumps(shown)


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://u:pw@h/db", "postgresql://u:***@h/db"),
        (
            "postgresql://h/db?user=u&password=pw&sslmode=require",
            "postgresql://h/db?user=u&password=***&sslmode=require",
        ),
        ("host=h dbname=db password=pw", "host=h dbname=db password=***"),
        ("postgresql:///db?host=/tmp", "postgresql:///db?host=/tmp"),
    ],
)
def test_database_url_passwords_are_masked_in_every_form(url: str, masked: str) -> None:
    settings = config.load("exporter", environ={"DATABASE_URL": url})
    assert config.effective(settings, "exporter")["DATABASE_URL"] == masked


def test_per_policy_thresholds_from_yaml_and_env(tmp_path: Path) -> None:
    file = tmp_path / "config.yaml"
    file.write_text("policy_thresholds:\n  KEYS_CHECK: {warning: 0.5, critical: 0.25}\n")
    from_yaml = config.load("exporter", flags={"config_file": str(file)}, environ={})
    from_env = config.load("exporter", environ={"POLICY_THRESHOLDS": "KEYS_CHECK=0.5/0.25"})
    assert from_yaml.threshold_for("KEYS_CHECK") == PolicyThreshold(0.5, 0.25)
    assert from_env.threshold_for("KEYS_CHECK") == PolicyThreshold(0.5, 0.25)
    assert from_env.threshold_for("ENTRIES_WRITE") == PolicyThreshold(0.20, 0.10)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporter.cli", *args],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        timeout=60,
        check=False,
    )


def test_check_config_prints_the_effective_configuration_as_json() -> None:
    done = _cli(
        "check-config",
        "exporter",
        "--poll-interval-seconds",
        "60",
        env={"DATABASE_URL": "postgresql://u:pw@h/db"},
    )
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["POLL_INTERVAL_SECONDS"] == 60.0
    assert shown["DATABASE_URL"] == "postgresql://u:***@h/db"
    assert "SIMULATOR_LISTEN" not in shown  # only the exporter's keys


def test_check_config_exits_2_with_one_line_naming_the_key() -> None:
    done = _cli("check-config", "exporter", env={"HEALTH_CHECK_PORT": "http"})
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert lines == [
        "dict-rate-limit check-config: invalid configuration: "
        "HEALTH_CHECK_PORT: must be a number (got 'http')"
    ]


def test_check_config_refuses_an_interval_that_would_drain_policies_list() -> None:
    done = _cli("check-config", "exporter", env={"POLL_INTERVAL_SECONDS": "10"})
    assert done.returncode == 2
    assert done.stderr.startswith(
        "dict-rate-limit check-config: invalid configuration: POLL_INTERVAL_SECONDS: 10 s"
    )
    assert "POLICIES_LIST" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
