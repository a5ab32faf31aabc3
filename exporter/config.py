"""Configuration: one table of keys, read from defaults < YAML file < environment < command-line flags.

Every key has one canonical name (the YAML key), one environment variable (the seeds' names where they
exist) and one flag. Secrets may come from a file: for a secret key ``X`` the variable ``X_FILE`` (or the
YAML key ``x_file``) names a file whose content is the value, the way Kubernetes and secret managers mount
them. Any invalid value raises :class:`ConfigError`, which the CLI prints as one line and exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from exporter import dsn

DEFAULT_PULSAR_TOPIC = "persistent://lb-conn/dict/rate-limit-alerts"


class ConfigError(Exception):
    """An invalid configuration value; ``str()`` is the one line shown to the user."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


@dataclass(frozen=True, slots=True)
class PolicyThreshold:
    """Remaining-ratio thresholds of one policy: WARNING at or below ``warning``, CRITICAL at ``critical``."""

    warning: float
    critical: float


# --- parsers: each takes the raw value (str from env/flags, anything from YAML) and returns the typed one


def _str(raw: Any) -> str:
    if not isinstance(raw, str | int | float):
        raise ValueError(f"must be a string (got {type(raw).__name__})")
    return str(raw).strip()


def _opt_str(raw: Any) -> str | None:
    value = _str(raw)
    return value or None


def _bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = _str(raw).lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"must be true or false (got {raw!r})")


def _number(
    kind: Callable[[Any], float | int], minimum: float, maximum: float | None = None
) -> Callable[[Any], Any]:
    def parse(raw: Any) -> float | int:
        if isinstance(raw, bool):
            raise ValueError(f"must be a number (got {raw!r})")
        try:
            value = kind(raw.strip() if isinstance(raw, str) else raw)
        except (TypeError, ValueError):
            raise ValueError(f"must be a number (got {raw!r})") from None
        if value < minimum or (maximum is not None and value > maximum):
            upper = f" and <= {maximum}" if maximum is not None else ""
            raise ValueError(f"must be >= {minimum}{upper} (got {raw!r})")
        return value

    return parse


def _choice(*options: str) -> Callable[[Any], str]:
    def parse(raw: Any) -> str:
        value = _str(raw).lower()
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)} (got {raw!r})")
        return value

    return parse


def _host_port(raw: Any) -> str:
    value = _str(raw)
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"must be HOST:PORT (got {raw!r})")
    return value


def _category(raw: Any) -> str:
    value = _str(raw).upper()
    if len(value) != 1 or value not in "ABCDEFGH":
        raise ValueError(f"must be one DICT category letter A-H (got {raw!r})")
    return value


def _ratio(raw: Any) -> float:
    return float(_number(float, 0.0, 1.0)(raw))


def parse_policy_thresholds(raw: Any) -> dict[str, PolicyThreshold]:
    """Per-policy overrides: YAML ``{NAME: {warning: 0.3, critical: 0.15}}`` or env ``NAME=0.3/0.15,...``."""
    if raw is None or raw == "":
        return {}
    items: Iterable[tuple[str, Any]]
    if isinstance(raw, Mapping):
        items = raw.items()
    elif isinstance(raw, str):
        pairs = []
        for part in filter(None, (p.strip() for p in raw.split(","))):
            name, sep, values = part.partition("=")
            warning, slash, critical = values.partition("/")
            if not sep or not slash:
                raise ValueError(f"entries must look like NAME=WARNING/CRITICAL (got {part!r})")
            pairs.append((name.strip(), {"warning": warning, "critical": critical}))
        items = pairs
    else:
        raise ValueError("must be a mapping of policy name to {warning, critical}")
    result: dict[str, PolicyThreshold] = {}
    for name, spec in items:
        if not isinstance(spec, Mapping) or set(spec) != {"warning", "critical"}:
            raise ValueError(f"{name}: needs exactly 'warning' and 'critical' remaining ratios")
        warn_ratio, crit_ratio = _ratio(spec["warning"]), _ratio(spec["critical"])
        if not crit_ratio < warn_ratio:
            raise ValueError(f"{name}: critical ({crit_ratio}) must be below warning ({warn_ratio})")
        result[str(name)] = PolicyThreshold(warning=warn_ratio, critical=crit_ratio)
    return result


@dataclass(frozen=True, slots=True)
class Key:
    """One configuration key: where it comes from and how it is checked."""

    name: str
    env: str
    parse: Callable[[Any], Any]
    help: str
    commands: frozenset[str]
    secret: bool = False
    flag: str | None = None

    @property
    def flag_name(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


EXPORTER = frozenset({"exporter", "all-in-one"})
HISTORY = frozenset({"exporter", "migrate", "outbox", "receiver", "all-in-one"})
RECEIVER = frozenset({"receiver", "all-in-one"})
SIMULATOR = frozenset({"simulator"})
EVERY = frozenset({"exporter", "migrate", "outbox", "receiver", "simulator", "all-in-one"})

# A table reads better one key per entry than one argument per line.
# fmt: off
KEYS: tuple[Key, ...] = (
    # --- common
    Key("log_level", "LOG_LEVEL", _choice("debug", "info", "warning", "error"), "Log level.", EVERY),
    Key("log_format", "LOG_FORMAT", _choice("json", "human", "auto"),
        "json (one object per line), human, or auto (human on a terminal, json otherwise).", EVERY),
    Key("listen_host", "LISTEN_HOST", _str,
        "Address the HTTP servers bind (all interfaces by default, as in a container).", EXPORTER | RECEIVER),
    # --- the Bridge
    Key("bridge_address", "BRIDGE_ADDRESS", _host_port, "Bridge gRPC address, HOST:PORT.", EXPORTER),
    Key("bridge_tls", "BRIDGE_TLS", _bool,
        "Use TLS to the Bridge (implied when a CA or client certificate is given).", EXPORTER),
    Key("bridge_tls_ca_file", "BRIDGE_TLS_CA_FILE", _opt_str,
        "PEM file of the CA that signed the Bridge's certificate.", EXPORTER),
    Key("bridge_tls_cert_file", "BRIDGE_TLS_CERT_FILE", _opt_str,
        "PEM client certificate for mTLS.", EXPORTER),
    Key("bridge_tls_key_file", "BRIDGE_TLS_KEY_FILE", _opt_str, "PEM client private key for mTLS.", EXPORTER),
    Key("bridge_tls_server_name", "BRIDGE_TLS_SERVER_NAME", _opt_str,
        "Override of the name checked in the Bridge's certificate.", EXPORTER),
    Key("bridge_timeout_seconds", "BRIDGE_TIMEOUT_SECONDS", _number(float, 0.01),
        "Deadline of one Bridge call; retries of a poll never overrun the poll interval.", EXPORTER),
    # --- polling and metrics
    Key("poll_interval_seconds", "POLL_INTERVAL_SECONDS", _number(float, 0.05),
        "Seconds between Bridge list calls; match Prometheus' scrape_interval.", EXPORTER),
    Key("poll_lead_seconds", "POLL_LEAD_SECONDS", _number(float, 0.0),
        "Poll this many seconds before each wall-clock multiple of the interval (the scrape boundary).",
        EXPORTER),
    Key("poll_budget_override", "POLL_BUDGET_OVERRIDE", _bool,
        "Allow polling faster than 2 list calls/min (simulators and benchmarks only above 6/min).", EXPORTER),
    Key("stale_after_intervals", "STALE_AFTER_INTERVALS", _number(int, 1),
        "Withdraw bucket series after this many intervals without a successful poll.", EXPORTER),
    Key("metrics_port", "METRICS_PORT", _number(int, 0, 65535),
        "Port of /metrics, / and /api/v1/policies.", EXPORTER | RECEIVER),
    Key("health_check_port", "HEALTH_CHECK_PORT", _number(int, 0, 65535),
        "Port of /health/live, /health/ready, /health/startup (may equal METRICS_PORT).",
        EXPORTER | RECEIVER),
    Key("warning_remaining_ratio", "WARNING_REMAINING_RATIO", _ratio,
        "Default WARNING threshold: remaining tokens / capacity at or below this.", EXPORTER),
    Key("critical_remaining_ratio", "CRITICAL_REMAINING_RATIO", _ratio,
        "Default CRITICAL threshold: remaining tokens / capacity at or below this.", EXPORTER),
    Key("policy_thresholds", "POLICY_THRESHOLDS", parse_policy_thresholds,
        "Per-policy overrides, NAME=WARNING/CRITICAL,... (YAML: NAME: {warning:, critical:}).", EXPORTER),
    # --- PostgreSQL history
    Key("database_url", "DATABASE_URL", _opt_str,
        "PostgreSQL URL. Without it the exporter keeps no history (visibly).", HISTORY, secret=True),
    Key("database_max_connections", "DATABASE_MAX_CONNECTIONS", _number(int, 1),
        "Connection pool size.", HISTORY),
    Key("history_queue_size", "HISTORY_QUEUE_SIZE", _number(int, 1),
        "Snapshots kept in memory while PostgreSQL is unreachable (2880 = 24 h at 30 s).", EXPORTER),
    Key("rate_limit_retention_months", "RATE_LIMIT_RETENTION_MONTHS", _number(int, 1),
        "Months of bucket history kept (whole monthly partitions are dropped).", HISTORY),
    Key("maintenance_interval_seconds", "MAINTENANCE_INTERVAL_SECONDS", _number(float, 1.0),
        "Seconds between partition maintenance runs.", EXPORTER),
    # --- receiver and Pulsar
    Key("receiver_port", "RECEIVER_PORT", _number(int, 0, 65535),
        "Port of the Alertmanager webhook (POST /alerts).", RECEIVER),
    Key("webhook_bearer_token", "WEBHOOK_BEARER_TOKEN", _opt_str,
        "Bearer token Alertmanager must send (prefer WEBHOOK_BEARER_TOKEN_FILE).", RECEIVER, secret=True),
    Key("webhook_allow_unauthenticated", "WEBHOOK_ALLOW_UNAUTHENTICATED", _bool,
        "Run the webhook without a token (local experiments only).", RECEIVER),
    Key("webhook_max_body_bytes", "WEBHOOK_MAX_BODY_BYTES", _number(int, 1024),
        "Largest accepted webhook body; larger gets 413.", RECEIVER),
    Key("http_header_timeout_seconds", "HTTP_HEADER_TIMEOUT_SECONDS", _number(float, 0.1),
        "A connection without a complete request head this long after connecting is closed.",
        EXPORTER | RECEIVER),
    Key("http_body_timeout_seconds", "HTTP_BODY_TIMEOUT_SECONDS", _number(float, 0.1),
        "Longest time to receive a request body (a slower one gets 408).", RECEIVER),
    Key("http_idle_timeout_seconds", "HTTP_IDLE_TIMEOUT_SECONDS", _number(float, 0.1),
        "An idle keep-alive connection is closed after this long.", EXPORTER | RECEIVER),
    Key("http_max_connections", "HTTP_MAX_CONNECTIONS", _number(int, 0),
        "Open connections per HTTP port; beyond it new ones are closed at once. 0: the file-descriptor"
        " limit minus 128 (at most 4096).", EXPORTER | RECEIVER),
    Key("receiver_tls_cert_file", "RECEIVER_TLS_CERT_FILE", _opt_str,
        "PEM certificate to serve the webhook over TLS.", RECEIVER),
    Key("receiver_tls_key_file", "RECEIVER_TLS_KEY_FILE", _opt_str,
        "PEM private key to serve the webhook over TLS.", RECEIVER),
    Key("pulsar_url", "PULSAR_URL", _str, "Pulsar service URL.", RECEIVER),
    Key("pulsar_topic", "PULSAR_TOPIC", _str, "Topic alert events are published to.", RECEIVER),
    Key("pulsar_auth_token", "PULSAR_AUTH_TOKEN", _opt_str,
        "Pulsar JWT token, if the broker requires one.", RECEIVER, secret=True),
    # --- simulator
    Key("simulator_listen", "SIMULATOR_LISTEN", _host_port,
        "Address the Bridge simulator serves gRPC on.", SIMULATOR, flag="--listen"),
    Key("simulator_category", "SIMULATOR_CATEGORY", _category,
        "Participant category the simulator starts with (A-H).", SIMULATOR, flag="--category"),
    Key("simulator_scenario", "SIMULATOR_SCENARIO", _opt_str,
        "Scenario YAML file; 'default' or empty runs the built-in scenario.", SIMULATOR, flag="--scenario"),
    Key("simulator_seed", "SIMULATOR_SEED", _number(int, 0),
        "Random seed: the same seed and scenario give the same run.", SIMULATOR, flag="--seed"),
    Key("simulator_refill", "SIMULATOR_REFILL", _choice("continuous", "period"),
        "Refill continuously or in steps of RefillPeriodSec.", SIMULATOR, flag="--refill"),
    Key("simulator_tls_cert_file", "SIMULATOR_TLS_CERT_FILE", _opt_str,
        "PEM server certificate (enables TLS).", SIMULATOR, flag="--tls-cert-file"),
    Key("simulator_tls_key_file", "SIMULATOR_TLS_KEY_FILE", _opt_str,
        "PEM server private key.", SIMULATOR, flag="--tls-key-file"),
    Key("simulator_tls_client_ca_file", "SIMULATOR_TLS_CLIENT_CA_FILE", _opt_str,
        "PEM CA for client certificates (enables mTLS: clients without a certificate are refused).",
        SIMULATOR, flag="--tls-client-ca-file"),
)
# fmt: on

KEYS_BY_NAME = {key.name: key for key in KEYS}


@dataclass(frozen=True, slots=True)
class Settings:
    """The effective configuration. Field names are the keys' canonical names."""

    log_level: str = "info"
    log_format: str = "auto"
    listen_host: str = "0.0.0.0"
    bridge_address: str = "127.0.0.1:50051"
    bridge_tls: bool = False
    bridge_tls_ca_file: str | None = None
    bridge_tls_cert_file: str | None = None
    bridge_tls_key_file: str | None = None
    bridge_tls_server_name: str | None = None
    bridge_timeout_seconds: float = 5.0
    poll_interval_seconds: float = 30.0
    poll_lead_seconds: float = 2.0
    poll_budget_override: bool = False
    stale_after_intervals: int = 3
    metrics_port: int = 9090
    health_check_port: int = 8080
    warning_remaining_ratio: float = 0.20
    critical_remaining_ratio: float = 0.10
    policy_thresholds: dict[str, PolicyThreshold] = field(default_factory=dict)
    database_url: str | None = None
    database_max_connections: int = 4
    history_queue_size: int = 2880
    rate_limit_retention_months: int = 13
    maintenance_interval_seconds: float = 86400.0
    receiver_port: int = 9097
    webhook_bearer_token: str | None = None
    webhook_allow_unauthenticated: bool = False
    webhook_max_body_bytes: int = 1048576
    http_header_timeout_seconds: float = 10.0
    http_body_timeout_seconds: float = 30.0
    http_idle_timeout_seconds: float = 30.0
    http_max_connections: int = 0
    receiver_tls_cert_file: str | None = None
    receiver_tls_key_file: str | None = None
    pulsar_url: str = "pulsar://127.0.0.1:6650"
    pulsar_topic: str = DEFAULT_PULSAR_TOPIC
    pulsar_auth_token: str | None = None
    simulator_listen: str = "127.0.0.1:50051"
    simulator_category: str = "A"
    simulator_scenario: str | None = None
    simulator_seed: int = 0
    simulator_refill: str = "continuous"
    simulator_tls_cert_file: str | None = None
    simulator_tls_key_file: str | None = None
    simulator_tls_client_ca_file: str | None = None

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def threshold_for(self, policy: str) -> PolicyThreshold:
        return self.policy_thresholds.get(
            policy, PolicyThreshold(self.warning_remaining_ratio, self.critical_remaining_ratio)
        )


def add_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """Adds ``--config.file`` and one flag per key the command uses (flags win over everything)."""
    parser.add_argument(
        "--config.file",
        dest="config_file",
        metavar="FILE",
        help="YAML file of keys (lower-case key names); env CONFIG_FILE.",
    )
    for key in KEYS:
        # check-config validates any command's configuration, so it accepts every flag.
        if command in key.commands or command == "check-config":
            parser.add_argument(
                key.flag_name,
                dest=f"cfg_{key.name}",
                metavar=key.env,
                help=f"{key.help} [env {key.env}; default {_default_text(key)}]",
            )


def _default_text(key: Key) -> str:
    """The default shown in --help, read from Settings so it has one source."""
    field_ = Settings.__dataclass_fields__[key.name]
    if field_.default_factory is not dataclasses.MISSING:
        return "none"
    return "none" if field_.default is None else str(field_.default)


def _read_secret_file(source: str, path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(source, f"cannot read secret file {path!r}: {exc.strerror}") from None


def _yaml_values(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError("CONFIG_FILE", f"cannot read {path!r}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError("CONFIG_FILE", f"{path!r} is not valid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError("CONFIG_FILE", f"{path!r} must hold a mapping of key: value")
    values: dict[str, Any] = {}
    for name, value in loaded.items():
        base = name[:-5] if isinstance(name, str) and name.endswith("_file") else name
        key = KEYS_BY_NAME.get(base)
        if key is None or (base != name and not key.secret):
            raise ConfigError(str(name), f"unknown key in {path!r}")
        values[key.name] = _read_secret_file(str(name), str(value)) if base != name else value
    return values


def load(
    command: str,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Builds the settings of ``command``: defaults < YAML file < environment < flags."""
    env = os.environ if environ is None else environ
    flags = dict(flags or {})
    raw: dict[str, tuple[str, Any]] = {}  # key name -> (source shown in errors, raw value)
    config_file = flags.pop("config_file", None) or env.get("CONFIG_FILE")
    for name, value in _yaml_values(config_file).items():
        raw[name] = (name, value)
    for key in KEYS:
        if key.secret and env.get(key.env + "_FILE"):
            raw[key.name] = (key.env + "_FILE", _read_secret_file(key.env + "_FILE", env[key.env + "_FILE"]))
        if key.env in env:
            raw[key.name] = (key.env, env[key.env])
        flag_value = flags.get(f"cfg_{key.name}")
        if flag_value is not None:
            raw[key.name] = (key.flag_name, flag_value)
    values: dict[str, Any] = {}
    for name, (source, value) in raw.items():
        key = KEYS_BY_NAME[name]
        try:
            values[name] = key.parse(value)
        except ValueError as exc:
            raise ConfigError(source, str(exc)) from None
    settings = Settings(**values)
    _check_consistency(settings, command)
    return settings


def _check_consistency(settings: Settings, command: str) -> None:
    # A connection string libpq refuses would otherwise fail later, on every retry, quoting the password.
    if settings.database_url and (reason := dsn.problem(settings.database_url)):
        raise ConfigError("DATABASE_URL", f"not a valid connection string: {reason}")
    if settings.critical_remaining_ratio >= settings.warning_remaining_ratio:
        raise ConfigError("CRITICAL_REMAINING_RATIO", "must be below WARNING_REMAINING_RATIO")
    if bool(settings.bridge_tls_cert_file) != bool(settings.bridge_tls_key_file):
        raise ConfigError(
            "BRIDGE_TLS_CERT_FILE", "mTLS needs both BRIDGE_TLS_CERT_FILE and BRIDGE_TLS_KEY_FILE"
        )
    if bool(settings.simulator_tls_cert_file) != bool(settings.simulator_tls_key_file):
        raise ConfigError("SIMULATOR_TLS_CERT_FILE", "TLS needs both a certificate and a key file")
    if settings.simulator_tls_client_ca_file and not settings.simulator_tls_cert_file:
        raise ConfigError("SIMULATOR_TLS_CLIENT_CA_FILE", "mTLS needs the server certificate and key too")
    if bool(settings.receiver_tls_cert_file) != bool(settings.receiver_tls_key_file):
        raise ConfigError(
            "RECEIVER_TLS_CERT_FILE", "TLS needs both RECEIVER_TLS_CERT_FILE and RECEIVER_TLS_KEY_FILE"
        )
    for name in (
        "bridge_tls_ca_file",
        "bridge_tls_cert_file",
        "bridge_tls_key_file",
        "simulator_tls_cert_file",
        "simulator_tls_key_file",
        "simulator_tls_client_ca_file",
        "receiver_tls_cert_file",
        "receiver_tls_key_file",
    ):
        path = getattr(settings, name)
        if path and command in KEYS_BY_NAME[name].commands and not Path(path).is_file():
            raise ConfigError(KEYS_BY_NAME[name].env, f"file {path!r} does not exist")


def effective(settings: Settings, command: str) -> dict[str, Any]:
    """The keys ``command`` uses with their values, secrets masked: what ``check-config`` prints."""
    shown: dict[str, Any] = {}
    for key in KEYS:
        if command not in key.commands:
            continue
        value = getattr(settings, key.name)
        if key.secret and value:
            value = _mask(key.name, value)
        elif isinstance(value, dict):
            value = {name: {"warning": t.warning, "critical": t.critical} for name, t in value.items()}
        shown[key.env] = value
    return shown


def _mask(name: str, value: str) -> str:
    """Hides passwords in connection strings (parsed as libpq does) and every other secret entirely."""
    return dsn.mask_dsn(value) if name == "database_url" else "***"
