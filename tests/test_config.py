"""Configuration: precedence, validation with one clear line naming the key, secrets from files, masking."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from exporter import config
from exporter.config import ConfigError, PolicyThreshold, check_budget, warn_about_budget
from tests.support.certs import make_pki

RECEIVER_ENV = {"DATABASE_URL": "postgresql:///x", "WEBHOOK_BEARER_TOKEN": "t"}


def test_defaults_match_the_seeds_and_the_dict_budget() -> None:
    settings = config.load("exporter", environ={})
    assert settings.metrics_port == 9090
    assert settings.health_check_port == 8080
    assert settings.rate_limit_retention_months == 13
    assert settings.poll_interval_seconds == 30.0
    assert settings.threshold_for("ENTRIES_WRITE") == PolicyThreshold(warning=0.20, critical=0.10)
    receiver = config.load(
        "receiver", environ={"DATABASE_URL": "postgresql:///x", "WEBHOOK_BEARER_TOKEN": "t"}
    )
    assert receiver.pulsar_topic == "persistent://lb-conn/dict/rate-limit-alerts"


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
        ({"PARTICIPANT_ISPB": "1234567"}, "PARTICIPANT_ISPB", "exactly 8 digits"),
        ({"PARTICIPANT_ISPB": "123456789"}, "PARTICIPANT_ISPB", "exactly 8 digits"),
        ({"PARTICIPANT_ISPB": "1234567a"}, "PARTICIPANT_ISPB", "exactly 8 digits"),
        ({"ERROR_404_WINDOW_SECONDS": "0"}, "ERROR_404_WINDOW_SECONDS", "must be >= 1.0"),
        (
            {"ERROR_404_WINDOW_SECONDS": "20"},
            "ERROR_404_WINDOW_SECONDS",
            "shorter than POLL_INTERVAL_SECONDS",
        ),
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


def test_a_config_file_that_is_not_yaml_exits_2_with_one_line_and_its_line_number(tmp_path: Path) -> None:
    file = tmp_path / "config.yaml"
    file.write_text("poll_interval_seconds: 60\nmetrics_port: [9090\n")
    done = _cli("check-config", "exporter", "--config.file", str(file))
    assert done.returncode == 2
    # PyYAML's own message spans several lines (context, a caret): it used to be printed as it is.
    assert done.stderr.strip().splitlines() == [
        f"dict-rate-limit check-config: invalid configuration: CONFIG_FILE: '{file}' is not valid YAML "
        "(line 3): expected ',' or ']', but got '<stream end>'"
    ]


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


_RECEIVER = {"DATABASE_URL": "postgresql:///x", "WEBHOOK_BEARER_TOKEN": "t"}


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("PULSAR_URL", "pulsar-broker:6650"),
        ("PULSAR_URL", "ftp://broker:6650"),
        ("PULSAR_URL", ""),
        ("PULSAR_TOPIC", ""),
        ("PULSAR_TOPIC", "persistent://lb-conn/rate-limit-alerts"),
        ("PULSAR_TOPIC", "kafka://lb-conn/dict/rate-limit-alerts"),
    ],
)
def test_a_malformed_pulsar_url_or_topic_exits_2_naming_the_key(key: str, value: str) -> None:
    # These used to start the receiver, which then logged "Pulsar unavailable" forever.
    done = _cli("check-config", "receiver", env={**_RECEIVER, key: value})
    assert done.returncode == 2, done.stdout
    assert done.stderr.startswith(f"dict-rate-limit check-config: invalid configuration: {key}: must be ")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("PULSAR_URL", "pulsar+ssl://a:6651,b:6651"),
        ("PULSAR_URL", "http://pulsar-broker:8080"),
        ("PULSAR_TOPIC", "non-persistent://lb-conn/dict/rate-limit-alerts"),
        ("PULSAR_TOPIC", "rate-limit-alerts"),
    ],
)
def test_every_pulsar_url_and_topic_form_the_client_takes_is_accepted(key: str, value: str) -> None:
    done = _cli("check-config", "receiver", env={**_RECEIVER, key: value})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)[key] == value


def test_check_config_refuses_an_interval_that_would_drain_policies_list() -> None:
    done = _cli("check-config", "exporter", env={"POLL_INTERVAL_SECONDS": "10"})
    assert done.returncode == 2
    assert done.stderr.startswith(
        "dict-rate-limit check-config: invalid configuration: POLL_INTERVAL_SECONDS: 10 s"
    )
    assert "POLICIES_LIST" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_budget_allows_two_calls_per_minute_and_refuses_more() -> None:
    assert check_budget(30.0, override=False) == 2.0
    assert check_budget(60.0, override=False) == 1.0
    with pytest.raises(ConfigError) as refused:
        check_budget(10.0, override=False)
    assert refused.value.key == "POLL_INTERVAL_SECONDS"
    assert "POLICIES_LIST" in refused.value.reason
    assert "refill 6/min, capacity 20" in refused.value.reason
    assert "POLL_BUDGET_OVERRIDE" in refused.value.reason


def test_an_override_above_dict_refill_warns_loudly(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="exporter.config"):
        warn_about_budget(1.0)
    assert "only for simulators and benchmarks" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="exporter.config"):
        warn_about_budget(15.0)  # 4/min: above the safe budget, below DICT's refill
    assert "above the safe 2/min budget" in caplog.text
    assert "only for simulators" not in caplog.text


def test_each_command_has_its_own_settings_type_with_exactly_its_keys() -> None:
    exporter = {k.env for k in config.keys_of(config.ExporterSettings)}
    receiver = {k.env for k in config.keys_of(config.ReceiverSettings)}
    simulator = {k.env for k in config.keys_of(config.SimulatorSettings)}
    assert {"BRIDGE_ADDRESS", "POLL_INTERVAL_SECONDS", "DATABASE_URL", "HISTORY_QUEUE_SIZE"} <= exporter
    assert not exporter & {"PULSAR_URL", "WEBHOOK_BEARER_TOKEN", "RECEIVER_PORT", "SIMULATOR_LISTEN"}
    assert {"PULSAR_URL", "WEBHOOK_BEARER_TOKEN", "DATABASE_URL"} <= receiver
    assert not receiver & {"BRIDGE_ADDRESS", "POLL_INTERVAL_SECONDS"}
    assert {k.env for k in config.keys_of(config.AllInOneSettings)} == exporter | receiver
    assert simulator == {"LOG_LEVEL", "LOG_FORMAT"} | {e for e in simulator if e.startswith("SIMULATOR_")}
    # Every key is spelled once: the field name is the YAML key, its upper case the variable.
    assert all(k.env == k.name.upper() for k in config.all_keys())


def test_a_yaml_file_may_hold_other_commands_keys_which_a_command_ignores(tmp_path: Path) -> None:
    file = tmp_path / "config.yaml"
    file.write_text("pulsar_topic: persistent://t/n/x\npoll_interval_seconds: 60\n")
    settings = config.load("exporter", flags={"config_file": str(file)}, environ={})
    assert settings.poll_interval_seconds == 60.0
    assert not hasattr(settings, "pulsar_topic")


@pytest.mark.parametrize(
    ("command", "environ", "key"),
    [
        ("receiver", {}, "DATABASE_URL"),
        ("receiver", {"DATABASE_URL": "postgresql:///x"}, "WEBHOOK_BEARER_TOKEN_FILE"),
        (
            "all-in-one",
            {"DATABASE_URL": "postgresql:///x", "WEBHOOK_BEARER_TOKEN": "t", "POLL_INTERVAL_SECONDS": "5"},
            "POLL_INTERVAL_SECONDS",
        ),
        ("migrate", {}, "DATABASE_URL"),
        ("simulator", {"SIMULATOR_TLS_CERT_FILE": "/x.pem"}, "SIMULATOR_TLS_CERT_FILE"),
        ("simulator", {"SIMULATOR_SCENARIO": "/nonexistent/incident.yaml"}, "SIMULATOR_SCENARIO"),
        ("simulator", {"SIMULATOR_SCENARIO": "no-such-built-in"}, "SIMULATOR_SCENARIO"),
    ],
)
def test_check_config_fails_exactly_where_the_command_would(
    command: str, environ: dict[str, str], key: str
) -> None:
    checked = _cli("check-config", command, env=environ)
    assert checked.returncode == 2
    line = f"dict-rate-limit check-config: invalid configuration: {key}: "
    assert checked.stderr.startswith(line), checked.stderr
    started = _cli(command, env=environ)
    assert started.returncode == 2
    assert started.stderr.startswith(line.replace("check-config", command)), started.stderr


def test_check_config_accepts_what_the_command_accepts() -> None:
    done = _cli(
        "check-config", "receiver", env={"DATABASE_URL": "postgresql:///x", "WEBHOOK_BEARER_TOKEN": "t"}
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["WEBHOOK_BEARER_TOKEN"] == "***"


@pytest.mark.parametrize("flag", ["--database-url", "--webhook-bearer-token", "--pulsar-auth-token"])
def test_secrets_have_no_command_line_flag(flag: str) -> None:
    done = _cli("check-config", "all-in-one", flag, "postgresql://u:s3cret@h/db")
    assert done.returncode == 2
    assert "unrecognized arguments" in done.stderr
    assert "s3cret" not in done.stdout


def test_prometheus_style_flags_sit_beside_the_seed_variables_and_win_over_them() -> None:
    done = _cli(
        "check-config",
        "exporter",
        "--log.level",
        "debug",
        "--web.listen-address",
        "127.0.0.1:9555",
        "--web.telemetry-path",
        "/probe",
        env={"LOG_LEVEL": "error", "METRICS_PORT": "9100"},
    )
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["LOG_LEVEL"] == "debug"
    assert shown["WEB_LISTEN_ADDRESS"] == "127.0.0.1:9555"
    assert shown["WEB_TELEMETRY_PATH"] == "/probe"
    settings = config.load("exporter", flags={"cfg_web_listen_address": "127.0.0.1:9555"}, environ={})
    assert settings.metrics_listen == ("127.0.0.1", 9555)
    assert config.load("exporter", environ={"METRICS_PORT": "9100"}).metrics_listen == ("0.0.0.0", 9100)


def test_web_listen_address_takes_the_exporters_colon_port_form_for_every_interface() -> None:
    # `--web.listen-address=:9100` is how every Prometheus exporter is started; it used to exit 2.
    done = _cli("check-config", "exporter", "--web.listen-address=:9100")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["WEB_LISTEN_ADDRESS"] == ":9100"
    settings = config.load("exporter", environ={"WEB_LISTEN_ADDRESS": ":9100", "LISTEN_HOST": "127.0.0.1"})
    assert settings.metrics_listen == ("0.0.0.0", 9100)
    assert settings.listen_host == "127.0.0.1"  # the health port keeps LISTEN_HOST
    for bad in (":", ":http", "9100"):
        with pytest.raises(ConfigError) as caught:
            config.load("exporter", environ={"WEB_LISTEN_ADDRESS": bad})
        assert caught.value.key == "WEB_LISTEN_ADDRESS"
        assert caught.value.reason == f"must be HOST:PORT or :PORT (got {bad!r})"
    # The flag form, and its error naming the flag.
    settings = config.load("exporter", flags={"cfg_web_listen_address": ":9555"}, environ={})
    assert settings.metrics_listen == ("0.0.0.0", 9555)
    refused = _cli("check-config", "exporter", "--web.listen-address", ":http")
    assert refused.returncode == 2
    assert "--web.listen-address: must be HOST:PORT or :PORT" in refused.stderr


@pytest.mark.parametrize("value", ["127.0.0.1:9090", "not a host", "[::1]", "-bad", "a..b"])
def test_a_listen_host_that_cannot_be_bound_exits_2_naming_the_key(value: str) -> None:
    # It used to pass, and the command then exited 1 with "cannot start: [Errno -2] Name or service not
    # known", naming no key (`exporter --listen 127.0.0.1:0`, argparse's abbreviation of --listen-host, too).
    done = _cli("check-config", "exporter", env={"LISTEN_HOST": value})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "dict-rate-limit check-config: invalid configuration: LISTEN_HOST: must be an IP address or a host "
        f"name, without a port (got {value!r})"
    ]


@pytest.mark.parametrize(
    "value", ["", "0.0.0.0", "127.0.0.1", "::", "::1", "localhost", "exporter.lb-conn.svc"]
)
def test_every_bindable_listen_host_is_accepted(value: str) -> None:
    assert config.load("exporter", environ={"LISTEN_HOST": value}).listen_host == value


@pytest.mark.parametrize(
    ("command", "environ", "key", "kind"),
    [
        ("exporter", {"BRIDGE_TLS_CA_FILE": "{junk}"}, "BRIDGE_TLS_CA_FILE", "PEM certificate"),
        (
            "exporter",
            # The server's pair: the real-file step below swaps in the server key, which must match.
            {"BRIDGE_TLS_CERT_FILE": "{pki.server_cert}", "BRIDGE_TLS_KEY_FILE": "{pki.server_cert}"},
            "BRIDGE_TLS_KEY_FILE",
            "PEM private key",
        ),
        (
            "simulator",
            {"SIMULATOR_TLS_CERT_FILE": "{junk}", "SIMULATOR_TLS_KEY_FILE": "{pki.server_key}"},
            "SIMULATOR_TLS_CERT_FILE",
            "PEM certificate",
        ),
        (
            "receiver",
            {
                "DATABASE_URL": "postgresql:///x",
                "WEBHOOK_BEARER_TOKEN": "t",
                "RECEIVER_TLS_CERT_FILE": "{pki.server_cert}",
                "RECEIVER_TLS_KEY_FILE": "{junk}",
            },
            "RECEIVER_TLS_KEY_FILE",
            "PEM private key",
        ),
    ],
)
def test_a_tls_file_that_is_not_the_pem_it_should_be_exits_2_naming_the_key(
    tmp_path: Path, command: str, environ: dict[str, str], key: str, kind: str
) -> None:
    # It used to pass: the exporter then polled for ever with grpc's "Could not load any root certificate"
    # on stderr, and the simulator exited 1 with "cannot listen on ...: Failed to bind".
    pki = make_pki(tmp_path)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    env = {name: value.format(pki=pki, junk=junk) for name, value in environ.items()}
    done = _cli("check-config", command, env=env)
    assert done.returncode == 2
    path = env[key]
    assert done.stderr.strip().splitlines() == [
        f"dict-rate-limit check-config: invalid configuration: {key}: file {path!r} holds no {kind}"
    ]
    env[key] = pki.server_key if kind == "PEM private key" else pki.server_cert  # the real file passes
    assert _cli("check-config", command, env=env).returncode == 0


@pytest.mark.parametrize("name", ["DATABASE_URL", "WEBHOOK_BEARER_TOKEN", "PULSAR_AUTH_TOKEN"])
def test_a_secret_set_both_directly_and_from_a_file_is_refused_naming_both(tmp_path: Path, name: str) -> None:
    from_file = "postgresql:///from-the-file" if name == "DATABASE_URL" else "from-the-file"
    secret = tmp_path / "secret"
    secret.write_text(from_file + "\n")
    environ = {"DATABASE_URL": "postgresql:///x", "WEBHOOK_BEARER_TOKEN": "t", name: "direct"}
    with pytest.raises(ConfigError, match=f"{name}_FILE: set {name} or {name}_FILE, not both"):
        config.load("receiver", environ={**environ, f"{name}_FILE": str(secret)})
    # An empty variable beside the file is no second value (an unset-but-declared env entry).
    loaded = config.load("receiver", environ={**environ, name: "", f"{name}_FILE": str(secret)})
    assert getattr(loaded, name.lower()) == from_file


@pytest.mark.parametrize(
    ("command", "key"), [("exporter", "BRIDGE_TLS_CA_FILE"), ("simulator", "SIMULATOR_TLS_CLIENT_CA_FILE")]
)
def test_a_ca_file_that_looks_like_pem_but_does_not_load_is_refused_naming_the_key(
    tmp_path: Path, command: str, key: str
) -> None:
    # Past the PEM check (the markers are there), refused by loading it, as grpc would at the first call.
    broken = tmp_path / "broken-ca.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
    environ = {key: str(broken)}
    if command == "simulator":
        pki = make_pki(tmp_path)
        environ |= {"SIMULATOR_TLS_CERT_FILE": pki.server_cert, "SIMULATOR_TLS_KEY_FILE": pki.server_key}
    with pytest.raises(ConfigError, match=f"{key}: cannot load the CA"):
        config.load(command, environ=environ)


def test_help_lists_both_spellings_with_the_variable_and_default() -> None:
    done = _cli("exporter", "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    for pair in (
        "--log.level LOG_LEVEL, --log-level LOG_LEVEL",
        "--web.listen-address WEB_LISTEN_ADDRESS",
        "--web.config.file WEB_CONFIG_FILE",
        "--log.format LOG_FORMAT, --log-format LOG_FORMAT",
    ):
        assert pair in text
    assert "[env POLL_INTERVAL_SECONDS; default 30.0]" in text
    assert "--database-url" not in text


def test_the_participant_ispb_keeps_its_leading_zeros_and_is_quoted_in_yaml(tmp_path: Path) -> None:
    assert config.load("exporter", environ={}).participant_ispb is None  # the Bridge's own participant
    assert config.load("exporter", environ={"PARTICIPANT_ISPB": " 00000000 "}).participant_ispb == "00000000"
    flagged = config.load("exporter", flags={"cfg_participant_ispb": "00038166"}, environ={})
    assert flagged.participant_ispb == "00038166"
    quoted = tmp_path / "quoted.yaml"
    quoted.write_text('participant_ispb: "00038166"\n')
    assert (
        config.load("exporter", flags={"config_file": str(quoted)}, environ={}).participant_ispb == "00038166"
    )
    bare = tmp_path / "bare.yaml"
    bare.write_text("participant_ispb: 00012345\n")  # YAML 1.1 reads the octal number 5349
    with pytest.raises(ConfigError) as caught:
        config.load("exporter", flags={"config_file": str(bare)}, environ={})
    assert caught.value.key == "participant_ispb"
    assert "quoted string" in caught.value.reason


def test_the_404_window_defaults_to_five_minutes_and_has_its_flags() -> None:
    assert config.load("exporter", environ={}).error_404_window_seconds == 300.0
    done = _cli("exporter", "--help")
    text = " ".join(done.stdout.split())
    assert "--bridge.participant-ispb PARTICIPANT_ISPB, --participant-ispb PARTICIPANT_ISPB" in text
    assert "[env ERROR_404_WINDOW_SECONDS; default 300.0]" in text


def test_log_level_takes_the_prometheus_exporters_warn() -> None:
    assert config.load("exporter", flags={"cfg_log_level": "warn"}, environ={}).log_level == "warning"
    assert config.load("exporter", environ={"LOG_LEVEL": "WARN"}).log_level == "warning"
    with pytest.raises(ConfigError, match="LOG_LEVEL: must be one of debug, info, warning, error"):
        config.load("exporter", environ={"LOG_LEVEL": "loud"})


def test_help_names_the_secrets_that_have_no_flag() -> None:
    # README: --help lists every key with its environment variable; secrets have no flag, but must be named.
    done = _cli("receiver", "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "DATABASE_URL (or DATABASE_URL_FILE)" in text
    assert "WEBHOOK_BEARER_TOKEN (or WEBHOOK_BEARER_TOKEN_FILE)" in text
    assert "--webhook-bearer-token" not in text
    assert "WEBHOOK_BEARER_TOKEN" not in " ".join(_cli("simulator", "--help").stdout.split())


def test_a_simulator_tls_file_that_is_not_pem_fails_naming_it(tmp_path: Path) -> None:
    garbage = tmp_path / "server.pem"
    garbage.write_text("not a certificate\n")
    environ = {
        "SIMULATOR_TLS_CERT_FILE": str(garbage),
        "SIMULATOR_TLS_KEY_FILE": str(garbage),
        "SIMULATOR_LISTEN": "127.0.0.1:0",
    }
    for command in (("check-config", "simulator"), ("simulator",)):
        done = _cli(*command, env=environ)
        assert done.returncode == 2, done.stderr
        line = f"dict-rate-limit {command[0]}: invalid configuration: SIMULATOR_TLS_CERT_FILE: file"
        assert done.stderr.strip().splitlines()[-1].startswith(line), done.stderr
        assert "holds no PEM certificate" in done.stderr


def test_a_receiver_key_not_matching_its_certificate_is_a_configuration_error(tmp_path: Path) -> None:
    # The same failure as in the web configuration file (exit 2 there): one runtime, one exit code.
    pki = make_pki(tmp_path)
    environ = {
        **RECEIVER_ENV,
        "RECEIVER_TLS_CERT_FILE": pki.server_cert,
        "RECEIVER_TLS_KEY_FILE": pki.client_key,
    }
    for command in (("check-config", "receiver"), ("receiver",)):
        done = _cli(*command, env=environ)
        assert done.returncode == 2, done.stderr
        line = f"dict-rate-limit {command[0]}: invalid configuration: RECEIVER_TLS_CERT_FILE: cannot load"
        assert done.stderr.strip().splitlines()[-1].startswith(line), done.stderr
    matching = {**environ, "RECEIVER_TLS_KEY_FILE": pki.server_key}
    assert _cli("check-config", "receiver", env=matching).returncode == 0


def test_bridge_tls_files_that_do_not_load_are_configuration_errors(tmp_path: Path) -> None:
    # A missing file already was (exit 2); one that exists but does not load failed every poll for ever.
    pki = make_pki(tmp_path)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    # Not PEM at all is refused by the PEM check first; PEM that does not load, by the load check below.
    with pytest.raises(ConfigError, match=r"BRIDGE_TLS_CA_FILE: file .* holds no PEM certificate"):
        config.load("exporter", environ={"BRIDGE_TLS_CA_FILE": str(garbage)})
    mismatched = {"BRIDGE_TLS_CERT_FILE": pki.client_cert, "BRIDGE_TLS_KEY_FILE": pki.server_key}
    with pytest.raises(ConfigError, match="BRIDGE_TLS_CERT_FILE: cannot load the certificate and key"):
        config.load("exporter", environ=mismatched)
    good = {
        "BRIDGE_TLS_CA_FILE": pki.ca,
        "BRIDGE_TLS_CERT_FILE": pki.client_cert,
        "BRIDGE_TLS_KEY_FILE": pki.client_key,
    }
    assert config.load("exporter", environ=good).bridge_tls_ca_file == pki.ca
    entry = tmp_path / "participants.yaml"
    entry.write_text(f"participants:\n  - name: bank-a\n    bridge_tls_ca_file: {garbage}\n")
    participant = r"participants\[0\]\.bridge_tls_ca_file: file .* holds no PEM certificate"
    with pytest.raises(ConfigError, match=participant):
        config.load("exporter", flags={"config_file": str(entry)}, environ={})
