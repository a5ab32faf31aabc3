"""Configuration: one settings type per command, read from defaults < YAML file < environment < flags.

Each key is declared once, as a field of a group dataclass (``BridgeKeys``, ``PollKeys``...) whose metadata
holds its parser, help and sources: the field name is the YAML key, its upper case the environment variable
(the seeds' names), and it has a flag (``--poll-interval-seconds``, plus the Prometheus-style spelling where
the ecosystem has one, e.g. ``--log.level``). A command's settings type (``ExporterSettings``...) inherits the
groups it uses, so it knows exactly its keys and its checks: ``check-config <command>`` fails where the
command would. Secrets never come from flags (they show in ``ps``): from the environment, or from a file named
by ``X_FILE`` (or the YAML key ``x_file``), the way Kubernetes and secret managers mount them. Any invalid
value raises :class:`ConfigError`, which the CLI prints as one line and exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
import math
import os
import re
import ssl
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from exporter import dsn

log = logging.getLogger(__name__)

DEFAULT_PULSAR_TOPIC = "persistent://lb-conn/dict/rate-limit-alerts"
#: DICT's POLICIES_LIST bucket: refill 6 tokens/min, capacity 20, shared by everything that lists policies.
DICT_LIST_REFILL_PER_MINUTE = 6.0
#: What the exporter may spend without POLL_BUDGET_OVERRIDE: a third of the refill, leaving room for others.
SAFE_LIST_CALLS_PER_MINUTE = 2.0


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


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def _seconds(minimum: float, maximum: float) -> Callable[[Any], float]:
    """Seconds, as a number or a Go-style duration (``30s``, ``500ms``, ``1m``: the seeds' form)."""

    def parse(raw: Any) -> float:
        match = None if isinstance(raw, bool) else _DURATION.fullmatch(_str(raw))
        if match is None:
            raise ValueError(f"must be seconds or a duration such as 30s or 500ms (got {raw!r})")
        value = float(match[1]) * _DURATION_UNITS[match[2]]
        if not minimum <= value <= maximum:
            raise ValueError(f"must be between {minimum:g} s and {maximum:g} s (got {raw!r})")
        return value

    return parse


def _choice(*options: str) -> Callable[[Any], str]:
    def parse(raw: Any) -> str:
        value = _str(raw).lower()
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)} (got {raw!r})")
        return value

    return parse


def _log_level(raw: Any) -> str:
    """debug, info, warning or error; ``warn`` too, the Prometheus exporters' spelling of --log.level."""
    value = _str(raw).lower()
    return _choice("debug", "info", "warning", "error")("warning" if value == "warn" else raw)


def _host_port(raw: Any) -> str:
    value = _str(raw)
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"must be HOST:PORT (got {raw!r})")
    return value


_HOST_LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOST_NAME = re.compile(rf"(?=.{{1,253}}$){_HOST_LABEL}(\.{_HOST_LABEL})*\.?")


def _listen_host(raw: Any) -> str:
    """An address to bind: an IP literal or a host name; empty means every interface."""
    value = _str(raw)
    if value:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            if not _HOST_NAME.fullmatch(value):
                raise ValueError(
                    f"must be an IP address or a host name, without a port (got {raw!r})"
                ) from None
    return value


def _category(raw: Any) -> str:
    value = _str(raw).upper()
    if len(value) != 1 or value not in "ABCDEFGH":
        raise ValueError(f"must be one DICT category letter A-H (got {raw!r})")
    return value


_ISPB = re.compile(r"[0-9]{8}")


def _opt_ispb(raw: Any) -> str | None:
    """A participant's ISPB: exactly 8 digits, leading zeros kept (Banco do Brasil's is 00000000)."""
    if not isinstance(raw, str):
        # YAML reads an unquoted 00038166 as the number 38166: only a string keeps the ISPB intact.
        raise ValueError(f"must be a quoted string of exactly 8 digits (got {raw!r})")
    value = raw.strip()
    if value and not _ISPB.fullmatch(value):
        raise ValueError(f"must be exactly 8 digits, the participant's ISPB (got {raw!r})")
    return value or None


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


def _path(raw: Any) -> str:
    value = _str(raw)
    if not value.startswith("/"):
        raise ValueError(f"must be an absolute URL path starting with / (got {raw!r})")
    return value


# --- keys: declared once, as fields of the groups below


@dataclass(frozen=True, slots=True)
class Key:
    """One configuration key as the sources see it (derived from a field's metadata)."""

    name: str
    env: str
    parse: Callable[[Any], Any]
    help: str
    secret: bool
    flags: tuple[str, ...]

    @property
    def flag_name(self) -> str:
        """The first flag (errors name it when the value came from the command line)."""
        return self.flags[0] if self.flags else self.env


def key(
    default: Any,
    parse: Callable[[Any], Any],
    help: str,
    *,
    secret: bool = False,
    flags: tuple[str, ...] = (),
) -> Any:
    """A settings field. ``flags`` adds spellings to the default ``--name-with-dashes`` (secrets get none)."""
    meta = {"parse": parse, "help": help, "secret": secret, "flags": flags}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


def keys_of(settings_type: type[Any] | Any) -> tuple[Key, ...]:
    """Every key of a settings type (or instance), in declaration order of its groups."""
    found: list[Key] = []
    for f in dataclasses.fields(settings_type):
        if "parse" not in f.metadata:
            continue
        meta = f.metadata
        default_flag = "--" + f.name.replace("_", "-")
        flags = () if meta["secret"] else (*meta["flags"], default_flag)
        found.append(Key(f.name, f.name.upper(), meta["parse"], meta["help"], meta["secret"], flags))
    return tuple(found)


class _Keys:
    """Base of the key groups: :meth:`validate` runs every group's ``_check`` (cross-key rules)."""

    def validate(self) -> None:
        for klass in reversed(type(self).__mro__):
            check = klass.__dict__.get("_check")
            if check is not None:
                check(self)

    def replace(self: _S, **changes: Any) -> _S:
        replaced: _S = dataclasses.replace(self, **changes)  # type: ignore[type-var]
        return replaced


_S = TypeVar("_S", bound=_Keys)


def _require_pair(settings: Any, first: str, second: str, message: str) -> None:
    if bool(getattr(settings, first)) != bool(getattr(settings, second)):
        raise ConfigError(first.upper(), message)


def _require_files(settings: Any, *names: str) -> None:
    """Each named PEM file exists and holds what its key says: a private key (``*_key_file``) or
    certificates; grpc would only say "Failed to bind" or log "Could not load any root certificate"."""
    for name in names:
        path = getattr(settings, name)
        if not path:
            continue
        if not Path(path).is_file():
            raise ConfigError(name.upper(), f"file {path!r} does not exist")
        try:
            content = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(name.upper(), f"cannot read {path!r}: {exc.strerror}") from None
        wanted = (
            rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----"
            if name.endswith("_key_file")
            else rb"-----BEGIN CERTIFICATE-----"
        )
        if not re.search(wanted, content):
            kind = "PEM private key" if name.endswith("_key_file") else "PEM certificate"
            raise ConfigError(name.upper(), f"file {path!r} holds no {kind}")


def _require_tls_chain(key_name: str, cert_file: str | None, key_file: str | None) -> None:
    """A server certificate and key that load together, or a ConfigError naming ``key_name``: the servers
    would otherwise fail later with a message about binding the port (gRPC) or exit as a start-up failure."""
    if not (cert_file and key_file):
        return
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(key_name, f"cannot load the certificate and key: {exc}") from None


def _require_ca(key_name: str, ca_file: str | None) -> None:
    """A CA bundle that loads, or a ConfigError naming ``key_name`` (the same check for every CA key)."""
    if not ca_file:
        return
    try:
        ssl.create_default_context(cafile=ca_file)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(key_name, f"cannot load the CA: {exc}") from None


_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def _label_names(raw: Any) -> tuple[str, ...]:
    """Prometheus label names, comma-separated (env) or a YAML list; may be empty."""
    items = raw if isinstance(raw, list | tuple) else _str(raw).split(",")
    names = tuple(_str(item) for item in items if _str(item))
    for name in names:
        if not _LABEL_NAME.fullmatch(name):
            raise ValueError(f"not a label name: {name!r}")
    return names


def _opt_urls(raw: Any) -> str | None:
    value = _opt_str(raw)
    if value is not None and value.lower() == "off":
        return "off"
    for url in (value or "").split(","):
        if url.strip() and not re.match(r"^https?://[^/\s]+", url.strip()):
            raise ValueError(f"must be http(s)://HOST:PORT URLs, comma-separated (got {url.strip()!r})")
    return value


def _pulsar_url(raw: Any) -> str:
    """A Pulsar service URL the client takes: pulsar://, pulsar+ssl://, http(s)://; one or more hosts."""
    value = _str(raw)
    if not re.fullmatch(r"(pulsar|pulsar\+ssl|https?)://[^/\s,]+(,[^/\s,]+)*/?", value):
        raise ValueError(
            f"must be pulsar://HOST:PORT (or pulsar+ssl://, http(s)://; hosts comma-separated) (got {raw!r})"
        )
    return value


def _pulsar_topic(raw: Any) -> str:
    """A topic Pulsar accepts: persistent://tenant/namespace/topic, non-persistent://..., or a short name."""
    value = _str(raw)
    domain, sep, rest = value.rpartition("://")
    parts = (rest if sep else value).split("/")
    complete = domain in {"persistent", "non-persistent"} and len(parts) in (3, 4)
    short = not sep and len(parts) in (1, 3)
    if not (complete or short) or not all(parts) or any(c.isspace() for c in value):
        raise ValueError(f"must be persistent://TENANT/NAMESPACE/TOPIC (got {raw!r})")
    return value


def _listen_address_or_none(raw: Any) -> str | None:
    """HOST:PORT, or :PORT for every interface (what Prometheus exporters' --web.listen-address takes)."""
    value = _str(raw)
    if not value:
        return None
    try:
        _host_port(f"0.0.0.0{value}" if value.startswith(":") else value)
    except ValueError:
        raise ValueError(f"must be HOST:PORT or :PORT (got {raw!r})") from None
    return value


@dataclass(frozen=True)
class LogKeys(_Keys):
    log_level: str = key(
        "info", _log_level, "Log level: debug, info, warning (or warn), error.", flags=("--log.level",)
    )
    log_format: str = key(
        "auto",
        _choice("json", "human", "auto", "logfmt"),
        "json (one object per line), human, logfmt (key=value, as Prometheus), or auto (human on a "
        "terminal, json otherwise).",
        flags=("--log.format",),
    )


@dataclass(frozen=True)
class HttpKeys(_Keys):
    listen_host: str = key(
        "0.0.0.0",
        _listen_host,
        "Address the HTTP servers bind (all interfaces by default, as in a container).",
    )
    metrics_port: int = key(9090, _number(int, 0, 65535), "Port of /metrics (and /, /api/v1/policies).")
    health_check_port: int = key(
        8080,
        _number(int, 0, 65535),
        "Port of /health/live, /health/ready, /health/startup (may equal METRICS_PORT).",
    )
    web_listen_address: str | None = key(
        None,
        _listen_address_or_none,
        "HOST:PORT of the metrics server (:PORT: every interface); overrides LISTEN_HOST and METRICS_PORT "
        "for it (the Prometheus exporters' flag).",
        flags=("--web.listen-address",),
    )
    web_telemetry_path: str = key(
        "/metrics", _path, "URL path of the metrics exposition.", flags=("--web.telemetry-path",)
    )
    web_config_file: str | None = key(
        None,
        _opt_str,
        "exporter-toolkit web configuration (TLS, basic auth) of the metrics server.",
        flags=("--web.config.file",),
    )

    http_header_timeout_seconds: float = key(
        10.0,
        _number(float, 0.1),
        "A connection without a complete request head this long after connecting is closed.",
    )
    http_idle_timeout_seconds: float = key(
        30.0, _number(float, 0.1), "An idle keep-alive connection is closed after this long."
    )
    http_max_connections: int = key(
        0,
        _number(int, 0),
        "Open connections per HTTP port; beyond it new ones are closed at once. 0: the file-descriptor"
        " limit minus 128 (at most 4096).",
    )

    @property
    def metrics_listen(self) -> tuple[str, int]:
        """(host, port) the metrics server binds: WEB_LISTEN_ADDRESS, else LISTEN_HOST and METRICS_PORT."""
        if self.web_listen_address:
            host, _, port = self.web_listen_address.rpartition(":")
            return host.strip("[]") or "0.0.0.0", int(port)
        return self.listen_host, self.metrics_port

    def _check(self) -> None:
        if not self.web_config_file:
            return
        from exporter.web import webconfig  # imports this module: loaded only when a file is given

        web = webconfig.load(self.web_config_file)
        receiver_port = getattr(self, "receiver_port", None)  # the receiver's and all-in-one's webhook
        webconfig.check_ports(web, self.metrics_listen[1], self.health_check_port, receiver_port)


@dataclass(frozen=True)
class BridgeKeys(_Keys):
    bridge_address: str = key("127.0.0.1:50051", _host_port, "Bridge gRPC address, HOST:PORT.")
    bridge_tls: bool = key(
        False, _bool, "Use TLS to the Bridge (implied when a CA or client certificate is given)."
    )
    bridge_tls_ca_file: str | None = key(
        None, _opt_str, "PEM file of the CA that signed the Bridge's certificate."
    )
    bridge_tls_cert_file: str | None = key(None, _opt_str, "PEM client certificate for mTLS.")
    bridge_tls_key_file: str | None = key(None, _opt_str, "PEM client private key for mTLS.")
    bridge_tls_server_name: str | None = key(
        None, _opt_str, "Override of the name checked in the Bridge's certificate."
    )
    bridge_timeout_seconds: float = key(
        5.0,
        _number(float, 0.01),
        "Deadline of one Bridge call; retries of a poll never overrun the interval.",
    )
    bridge_max_calls_per_minute: float = key(
        2.0,
        _number(float, 1.0),
        "Hard ceiling of Bridge list calls (retries included) in any 60 s window; each costs a DICT token.",
    )
    bridge_max_clock_skew_seconds: float = key(
        300.0,
        _number(float, 1.0),
        "Reject answers whose ResponseTime is further than this from the local clock.",
    )
    participant_ispb: str | None = key(
        None,
        _opt_ispb,
        "ISPB (8 digits) of the participant to ask the Bridge about (DICT's PI-RequestingParticipant); "
        "answers about another participant are refused. Unset: the Bridge's own participant.",
        flags=("--bridge.participant-ispb",),
    )

    def _check(self) -> None:
        _require_pair(
            self,
            "bridge_tls_cert_file",
            "bridge_tls_key_file",
            "mTLS needs both BRIDGE_TLS_CERT_FILE and BRIDGE_TLS_KEY_FILE",
        )
        _require_files(self, "bridge_tls_ca_file", "bridge_tls_cert_file", "bridge_tls_key_file")
        # Files that exist but do not load would fail every poll for ever (the exporter keeps running):
        # the same fault as a missing file, so the same exit 2, here and from check-config.
        _require_tls_chain("BRIDGE_TLS_CERT_FILE", self.bridge_tls_cert_file, self.bridge_tls_key_file)
        _require_ca("BRIDGE_TLS_CA_FILE", self.bridge_tls_ca_file)


@dataclass(frozen=True)
class PollKeys(_Keys):
    poll_interval_seconds: float = key(
        30.0, _number(float, 0.05), "Seconds between Bridge list calls; match Prometheus' scrape_interval."
    )
    poll_lead_seconds: float = key(
        2.0, _number(float, 0.0), "Poll this many seconds before each wall-clock multiple of the interval."
    )
    poll_budget_override: bool = key(
        False, _bool, "Allow polling faster than 2 list calls/min (simulators and benchmarks)."
    )
    poller_group: str = key(
        "default",
        _str,
        "Replicas with the same DATABASE_URL and POLLER_GROUP elect one poller of the Bridge.",
    )
    poller_lease_seconds: float = key(
        10.0,
        _number(float, 0.3),
        "Poller lease length: a dead or frozen leader is replaced within 4/3 of it.",
    )
    stale_after_intervals: int = key(
        3, _number(int, 1), "Withdraw bucket series after this many intervals without a successful poll."
    )
    error_404_window_seconds: float = key(
        300.0,
        _number(float, 1.0, 86400.0),
        "Window of dict_rate_limit_error_404_rate: the share of 404s among the DICT answers the Bridge "
        "counted over about this many seconds (at least one poll interval).",
    )

    def _check(self) -> None:
        check_budget(self.poll_interval_seconds, self.poll_budget_override)
        if self.error_404_window_seconds < self.poll_interval_seconds:
            raise ConfigError(
                "ERROR_404_WINDOW_SECONDS",
                f"{self.error_404_window_seconds:g} s is shorter than POLL_INTERVAL_SECONDS "
                f"({self.poll_interval_seconds:g} s): a share needs two snapshots inside the window",
            )


@dataclass(frozen=True)
class ThresholdKeys(_Keys):
    warning_remaining_ratio: float = key(
        0.20, _ratio, "Default WARNING threshold: remaining tokens / capacity at or below this."
    )
    critical_remaining_ratio: float = key(
        0.10, _ratio, "Default CRITICAL threshold: remaining tokens / capacity at or below this."
    )
    policy_thresholds: dict[str, PolicyThreshold] = key(
        {},
        parse_policy_thresholds,
        "Per-policy overrides, NAME=WARNING/CRITICAL,... (YAML: NAME: {warning:, critical:}).",
    )

    def threshold_for(self, policy: str) -> PolicyThreshold:
        return self.policy_thresholds.get(
            policy, PolicyThreshold(self.warning_remaining_ratio, self.critical_remaining_ratio)
        )

    def _check(self) -> None:
        if self.critical_remaining_ratio >= self.warning_remaining_ratio:
            raise ConfigError("CRITICAL_REMAINING_RATIO", "must be below WARNING_REMAINING_RATIO")


@dataclass(frozen=True)
class DatabaseKeys(_Keys):
    database_url: str | None = key(
        None, _opt_str, "PostgreSQL URL. Without it the exporter keeps no history (visibly).", secret=True
    )
    database_max_connections: int = key(
        10, _number(int, 1), "Connection pool size (receiver: concurrent notifications being committed)."
    )
    database_min_connections: int = key(
        1,
        _number(int, 0),
        "Connections the receiver's and the history writer's pools keep open when idle (at most "
        "DATABASE_MAX_CONNECTIONS).",
    )
    database_connection_timeout: float = key(
        5.0,
        _seconds(1, 300),
        "How long a connection of those pools may take to connect, and a receiver request waits for a "
        "pooled one (then 503, Alertmanager retries); seconds or a duration such as 30s. The poller "
        "lease keeps its own, shorter bound (its failover time depends on it).",
    )
    rate_limit_retention_months: int = key(
        13, _number(int, 1), "Months of bucket history kept (whole monthly partitions are dropped)."
    )

    def _check(self) -> None:
        # A connection string libpq refuses would otherwise fail later, on every retry, quoting the password.
        if self.database_url and (reason := dsn.problem(self.database_url)):
            raise ConfigError("DATABASE_URL", f"not a valid connection string: {reason}")
        if self.database_min_connections > self.database_max_connections:
            raise ConfigError("DATABASE_MIN_CONNECTIONS", "must not be above DATABASE_MAX_CONNECTIONS")


@dataclass(frozen=True)
class HistoryKeys(_Keys):
    history_queue_size: int = key(
        2880,
        _number(int, 1),
        "Snapshots kept in memory while PostgreSQL is unreachable (2880 = 24 h at 30 s).",
    )
    maintenance_interval_seconds: float = key(
        86400.0, _number(float, 1.0), "Seconds between partition maintenance runs."
    )


@dataclass(frozen=True)
class ReceiverKeys(_Keys):
    receiver_port: int = key(9097, _number(int, 0, 65535), "Port of the Alertmanager webhook (POST /alerts).")
    webhook_bearer_token: str | None = key(
        None, _opt_str, "Bearer token Alertmanager must send (prefer WEBHOOK_BEARER_TOKEN_FILE).", secret=True
    )
    webhook_allow_unauthenticated: bool = key(
        False, _bool, "Run the webhook without a token (local experiments only)."
    )
    webhook_max_body_bytes: int = key(
        1048576, _number(int, 1024), "Largest accepted webhook body; larger gets 413."
    )
    receiver_tls_cert_file: str | None = key(None, _opt_str, "PEM certificate to serve the webhook over TLS.")
    alert_replica_labels: tuple[str, ...] = key(
        ("prometheus_replica", "replica", "__replica__"),
        _label_names,
        "Labels that tell Prometheus HA replicas apart, ignored when identifying an alert.",
    )
    alert_start_tolerance_seconds: float = key(
        300.0,
        _number(float, 0.0),
        "How far apart two Prometheus replicas may start one alert and still be one audit row.",
    )
    alertmanager_url: str | None = key(
        None,
        _opt_urls,
        "Alertmanager(s) feeding this receiver, comma-separated: firing rows gone from all of them are "
        "resolved (reconciled), e.g. an inhibited resolution. Unset: the Alertmanagers that send "
        "notifications (their externalURL); off: no reconciliation.",
    )
    reconcile_interval_seconds: float = key(
        60.0, _number(float, 0.1), "Seconds between two reconciliations with Alertmanager."
    )
    reconcile_grace_seconds: float = key(
        180.0,
        _number(float, 0.0),
        "How long Alertmanager must have forgotten a firing alert before the receiver resolves it.",
    )
    http_body_timeout_seconds: float = key(
        30.0, _number(float, 0.1), "Longest time to receive a request body (a slower one gets 408)."
    )
    receiver_tls_key_file: str | None = key(None, _opt_str, "PEM private key to serve the webhook over TLS.")

    def _check(self) -> None:
        if not getattr(self, "database_url", None):
            raise ConfigError("DATABASE_URL", "the receiver records alerts in PostgreSQL; set DATABASE_URL")
        if not self.webhook_bearer_token and not self.webhook_allow_unauthenticated:
            raise ConfigError(
                "WEBHOOK_BEARER_TOKEN_FILE",
                "no webhook token: set WEBHOOK_BEARER_TOKEN_FILE"
                " (or WEBHOOK_ALLOW_UNAUTHENTICATED=true, for local experiments only)",
            )
        _require_pair(
            self,
            "receiver_tls_cert_file",
            "receiver_tls_key_file",
            "TLS needs both RECEIVER_TLS_CERT_FILE and RECEIVER_TLS_KEY_FILE",
        )
        _require_files(self, "receiver_tls_cert_file", "receiver_tls_key_file")
        _require_tls_chain("RECEIVER_TLS_CERT_FILE", self.receiver_tls_cert_file, self.receiver_tls_key_file)


@dataclass(frozen=True)
class PulsarKeys(_Keys):
    pulsar_url: str = key("pulsar://127.0.0.1:6650", _pulsar_url, "Pulsar service URL.")
    pulsar_topic: str = key(DEFAULT_PULSAR_TOPIC, _pulsar_topic, "Topic alert events are published to.")
    pulsar_auth_token: str | None = key(
        None, _opt_str, "Pulsar JWT token, if the broker requires one.", secret=True
    )


@dataclass(frozen=True)
class SimulatorKeys(_Keys):
    simulator_listen: str = key(
        "127.0.0.1:50051", _host_port, "Address the Bridge simulator serves gRPC on.", flags=("--listen",)
    )
    simulator_category: str = key(
        "A", _category, "Participant category the simulator starts with (A-H).", flags=("--category",)
    )
    simulator_scenario: str | None = key(
        None,
        _opt_str,
        "Scenario YAML file; 'default' or empty runs the built-in scenario.",
        flags=("--scenario",),
    )
    simulator_seed: int = key(
        0, _number(int, 0), "Random seed: the same seed and scenario give the same run.", flags=("--seed",)
    )
    simulator_refill: str = key(
        "continuous",
        _choice("continuous", "period"),
        "Refill continuously or in steps of RefillPeriodSec.",
        flags=("--refill",),
    )
    simulator_tls_cert_file: str | None = key(
        None, _opt_str, "PEM server certificate (enables TLS).", flags=("--tls-cert-file",)
    )
    simulator_tls_key_file: str | None = key(
        None, _opt_str, "PEM server private key.", flags=("--tls-key-file",)
    )
    simulator_tls_client_ca_file: str | None = key(
        None,
        _opt_str,
        "PEM CA for client certificates (enables mTLS: clients without a certificate are refused).",
        flags=("--tls-client-ca-file",),
    )

    def _check(self) -> None:
        _require_pair(
            self,
            "simulator_tls_cert_file",
            "simulator_tls_key_file",
            "TLS needs both a certificate and a key file",
        )
        if self.simulator_tls_client_ca_file and not self.simulator_tls_cert_file:
            raise ConfigError("SIMULATOR_TLS_CLIENT_CA_FILE", "mTLS needs the server certificate and key too")
        _require_files(
            self, "simulator_tls_cert_file", "simulator_tls_key_file", "simulator_tls_client_ca_file"
        )
        _require_tls_chain(
            "SIMULATOR_TLS_CERT_FILE", self.simulator_tls_cert_file, self.simulator_tls_key_file
        )
        _require_ca("SIMULATOR_TLS_CLIENT_CA_FILE", self.simulator_tls_client_ca_file)
        # The scenario is read at start-up: a missing or invalid file must fail check-config the same way.
        from exporter.simulator.scenario import ScenarioError, resolve_scenario  # only for the simulator

        try:
            resolve_scenario(self.simulator_scenario)
        except ScenarioError as exc:
            raise ConfigError("SIMULATOR_SCENARIO", str(exc)) from None


# --- one settings type per command

#: The file key of the list of participants (docs/exporter.md, "Several participants").
PARTICIPANTS_KEY = "participants"
#: The key groups a participant entry may set: its own Bridge, polling budget and thresholds.
PARTICIPANT_GROUPS: tuple[type[_Keys], ...] = (BridgeKeys, PollKeys, ThresholdKeys)
#: A participant name is a label value, part of the poller lease key and of log lines: kept plain.
_PARTICIPANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


@dataclass(frozen=True)
class Participant:
    """One participant of a multi-participant exporter: its name and its whole exporter settings (the
    top-level values with the entry's keys)."""

    name: str
    settings: ExporterSettings


@dataclass(frozen=True)
class ExporterSettings(HistoryKeys, DatabaseKeys, ThresholdKeys, PollKeys, BridgeKeys, HttpKeys, LogKeys):
    """``dict-rate-limit exporter``.

    ``participants`` comes from the file's ``participants:`` list only (no environment variable, no flag):
    empty, the exporter watches one participant with the keys above and exports no ``participant`` label.
    """

    participants: tuple[Participant, ...] = ()

    def _check(self) -> None:
        call_ceiling(self.poll_interval_seconds, self.bridge_max_calls_per_minute, self.poll_budget_override)


@dataclass(frozen=True)
class ReceiverSettings(PulsarKeys, ReceiverKeys, DatabaseKeys, HttpKeys, LogKeys):
    """``dict-rate-limit receiver``."""


@dataclass(frozen=True)
class AllInOneSettings(ReceiverSettings, ExporterSettings):
    """``dict-rate-limit all-in-one``: the exporter's and the receiver's keys and checks."""


@dataclass(frozen=True)
class MigrateSettings(DatabaseKeys, LogKeys):
    """``dict-rate-limit migrate``."""

    def _check(self) -> None:
        if not self.database_url:
            raise ConfigError("DATABASE_URL", "migrations need a database; set DATABASE_URL")


@dataclass(frozen=True)
class OutboxSettings(PulsarKeys, DatabaseKeys, LogKeys):
    """``dict-rate-limit outbox list|replay``: the set-aside events, republished to Pulsar."""

    def _check(self) -> None:
        if not self.database_url:
            raise ConfigError("DATABASE_URL", "the outbox is in PostgreSQL; set DATABASE_URL")


@dataclass(frozen=True)
class ReportSettings(DatabaseKeys, LogKeys):
    """``dict-rate-limit report``: reads the history; the poll interval says how long a snapshot counts."""

    poll_interval_seconds: float = key(
        30.0,
        _number(float, 0.05),
        "The exporter's poll interval: a snapshot counts until the next one, "
        "for at most twice this (longer silences are history gaps).",
    )

    def _check(self) -> None:
        if not self.database_url:
            raise ConfigError("DATABASE_URL", "the report reads the history in PostgreSQL; set DATABASE_URL")


@dataclass(frozen=True)
class SimulatorSettings(SimulatorKeys, LogKeys):
    """``dict-rate-limit simulator``."""


COMMAND_SETTINGS: dict[str, type[_Keys]] = {
    "exporter": ExporterSettings,
    "receiver": ReceiverSettings,
    "all-in-one": AllInOneSettings,
    "migrate": MigrateSettings,
    "outbox": OutboxSettings,
    "report": ReportSettings,
    "simulator": SimulatorSettings,
}


def all_keys() -> tuple[Key, ...]:
    """Every key of every command, once (for tools that must know the whole vocabulary)."""
    seen: dict[str, Key] = {}
    for settings_type in COMMAND_SETTINGS.values():
        for k in keys_of(settings_type):
            seen.setdefault(k.name, k)
    return tuple(seen.values())


def check_budget(interval: float, override: bool) -> float:
    """List calls per minute of ``interval``; refuses more than the safe budget unless overridden."""
    per_minute = 60.0 / interval
    if per_minute > SAFE_LIST_CALLS_PER_MINUTE + 1e-9 and not override:
        raise ConfigError(
            "POLL_INTERVAL_SECONDS",
            f"{interval:g} s means {per_minute:.3g} Bridge list calls per minute; each costs 1 token of "
            "DICT's POLICIES_LIST bucket (refill 6/min, capacity 20), shared by everything of this "
            "participant that lists policies. The safe budget is 2 calls/min (30 s, matching a 30 s "
            "scrape_interval); use an interval >= 30 s, or POLL_BUDGET_OVERRIDE=true if you really mean it",
        )
    return per_minute


def call_ceiling(interval: float, configured: float, override: bool) -> float:
    """List calls allowed in any 60 s, retries included: the configured ceiling, never below the polls.

    Above the safe 2/min it needs POLL_BUDGET_OVERRIDE, like the interval itself.
    """
    if configured > SAFE_LIST_CALLS_PER_MINUTE + 1e-9 and not override:
        raise ConfigError(
            "BRIDGE_MAX_CALLS_PER_MINUTE",
            f"{configured:g} list calls per minute is above the safe 2/min budget of DICT's POLICIES_LIST "
            "(refill 6/min); set POLL_BUDGET_OVERRIDE=true if you really mean it",
        )
    return max(configured, math.ceil(60.0 / interval - 1e-9))


def warn_about_budget(interval: float) -> None:
    """Says loudly, once at start-up, that an overridden budget is being spent."""
    per_minute = 60.0 / interval
    if per_minute > DICT_LIST_REFILL_PER_MINUTE + 1e-9:
        log.warning(
            "POLL_BUDGET_OVERRIDE: polling %.3g times per minute exceeds DICT's POLICIES_LIST refill (6/min) "
            "and would drain it against a real DICT; only for simulators and benchmarks",
            per_minute,
            extra={"ctx": {"poll_interval_seconds": interval, "list_calls_per_minute": per_minute}},
        )
    elif per_minute > SAFE_LIST_CALLS_PER_MINUTE + 1e-9:
        log.warning(
            "POLL_BUDGET_OVERRIDE: polling %.3g times per minute, above the safe 2/min budget",
            per_minute,
            extra={"ctx": {"poll_interval_seconds": interval}},
        )


# --- sources


def add_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """Adds ``--config.file`` and the flags of the command's keys (flags win over everything)."""
    parser.add_argument(
        "--config.file",
        dest="config_file",
        metavar="FILE",
        help="YAML file of keys (lower-case key names; the exporter also takes a participants: list, "
        "docs/exporter.md); env CONFIG_FILE.",
    )
    keys = all_keys() if command == "check-config" else keys_of(COMMAND_SETTINGS[command])
    defaults = {f.name: f for f in dataclasses.fields(AllInOneSettings)} | {
        f.name: f for f in dataclasses.fields(SimulatorSettings)
    }
    secrets = [k for k in keys if k.secret]
    if secrets:
        # Secrets have no flag (they would show in ps); --help still names where they come from.
        parser.epilog = "Secrets, from the environment only (or a file named by the _FILE variable): " + (
            "; ".join(f"{k.env} (or {k.env}_FILE): {k.help.rstrip('.')}" for k in secrets) + "."
        )
    for k in keys:
        if not k.flags:
            continue
        parser.add_argument(
            *k.flags,
            dest=f"cfg_{k.name}",
            metavar=k.env,
            help=f"{k.help} [env {k.env}; default {_default_text(defaults[k.name])}]",
        )


def _default_text(field_: dataclasses.Field[Any]) -> str:
    if field_.default_factory is not dataclasses.MISSING:
        return "none"
    return "none" if field_.default is None else str(field_.default)


def _read_secret_file(source: str, path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(source, f"cannot read secret file {path!r}: {exc.strerror}") from None


def _yaml_document(path: str | None) -> dict[Any, Any]:
    """The configuration file as a mapping ({} without a file)."""
    if not path:
        return {}
    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError("CONFIG_FILE", f"cannot read {path!r}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        # One line, as every configuration error: the line number and PyYAML's short "problem".
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ConfigError("CONFIG_FILE", f"{path!r} is not valid YAML{where}: {problem}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError("CONFIG_FILE", f"{path!r} must hold a mapping of key: value")
    return loaded


def _yaml_values(document: Mapping[Any, Any], path: str | None, keys: Mapping[str, Key]) -> dict[str, Any]:
    """The file's top-level keys (``participants`` is read by :func:`participants_of`)."""
    values: dict[str, Any] = {}
    for name, value in document.items():
        if name == PARTICIPANTS_KEY:
            continue
        base = name[:-5] if isinstance(name, str) and name.endswith("_file") and name[:-5] in keys else name
        found = keys.get(base) if isinstance(base, str) else None
        if found is None or (base != name and not found.secret):
            raise ConfigError(str(name), f"unknown key in {path!r}")
        values[found.name] = _read_secret_file(str(name), str(value)) if base != name else value
    return values


def participant_keys() -> dict[str, Key]:
    """The keys a ``participants:`` entry may set: every key of the Bridge, poll and threshold groups."""
    return {k.name: k for group in PARTICIPANT_GROUPS for k in keys_of(group)}


def participants_of(raw: Any, base: ExporterSettings) -> tuple[Participant, ...]:
    """The ``participants:`` list: each entry is ``base`` with the entry's keys; errors name the path
    (``participants[1].bridge_address: ...``)."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError(PARTICIPANTS_KEY, "must be a non-empty list of {name: ..., bridge_address: ...}")
    allowed = participant_keys()
    seen: dict[str, int] = {}
    found = []
    for index, entry in enumerate(raw):
        path = f"{PARTICIPANTS_KEY}[{index}]"
        participant = _participant(entry, path, base, allowed)
        if participant.name in seen:
            raise ConfigError(
                f"{path}.name",
                f"{participant.name!r} is already the name of {PARTICIPANTS_KEY}[{seen[participant.name]}]",
            )
        seen[participant.name] = index
        found.append(participant)
    return tuple(found)


def _participant(entry: Any, path: str, base: ExporterSettings, allowed: Mapping[str, Key]) -> Participant:
    if not isinstance(entry, Mapping):
        raise ConfigError(path, "must be a mapping with at least a name")
    name = _participant_name(entry.get("name"), f"{path}.name")
    values: dict[str, Any] = {}
    for raw_key, value in entry.items():
        if raw_key == "name":
            continue
        found = allowed.get(raw_key) if isinstance(raw_key, str) else None
        if found is None:
            raise ConfigError(
                f"{path}.{raw_key}", "unknown key for a participant (Bridge, poll and threshold keys only)"
            )
        try:
            values[found.name] = found.parse(value)
        except ValueError as exc:
            raise ConfigError(f"{path}.{found.name}", str(exc)) from None
    settings = base.replace(participants=(), **values)
    try:
        settings.validate()
    except ConfigError as exc:
        # The group checks name keys by their environment variable; here the key lives in the entry.
        raise ConfigError(f"{path}.{exc.key.lower()}", exc.reason) from None
    return Participant(name, settings)


def _participant_name(raw: Any, path: str) -> str:
    if raw is None:
        raise ConfigError(path, "required (the value of the participant label)")
    if not isinstance(raw, str | int) or isinstance(raw, bool):
        raise ConfigError(path, f"must be a string (got {type(raw).__name__})")
    name = str(raw)
    if not _PARTICIPANT_NAME.fullmatch(name):
        raise ConfigError(
            path,
            f"{name!r} is not a participant name: 1-63 characters, letters, digits, '_', '.' or '-', "
            "starting with a letter or digit",
        )
    return name


def load(
    command: str,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Any:
    """Builds and validates the settings of ``command``: defaults < YAML file < environment < flags.

    Returns the command's settings type (``ExporterSettings`` for ``exporter``...); a YAML file may hold
    keys of other commands (one file for a whole installation), which this command ignores."""
    settings_type = COMMAND_SETTINGS[command]
    env = os.environ if environ is None else environ
    flags = dict(flags or {})
    everything = {k.name: k for k in all_keys()}
    mine = {k.name for k in keys_of(settings_type)}
    raw: dict[str, tuple[str, Any]] = {}  # key name -> (source shown in errors, raw value)
    config_file = flags.pop("config_file", None) or env.get("CONFIG_FILE")
    document = _yaml_document(config_file)
    for name, value in _yaml_values(document, config_file, everything).items():
        raw[name] = (name, value)
    for k in everything.values():
        if k.secret and env.get(k.env + "_FILE"):
            if env.get(k.env):  # two sources of one secret: which one is meant cannot be guessed
                raise ConfigError(k.env + "_FILE", f"set {k.env} or {k.env}_FILE, not both")
            raw[k.name] = (k.env + "_FILE", _read_secret_file(k.env + "_FILE", env[k.env + "_FILE"]))
        elif k.env in env:  # beside a _FILE, an empty variable is no value (a declared, unset entry)
            raw[k.name] = (k.env, env[k.env])
        flag_value = flags.get(f"cfg_{k.name}")
        if flag_value is not None:
            raw[k.name] = (k.flag_name, flag_value)
    values: dict[str, Any] = {}
    for name, (source, value) in raw.items():
        if name not in mine:
            continue
        try:
            values[name] = everything[name].parse(value)
        except ValueError as exc:
            raise ConfigError(source, str(exc)) from None
    settings = settings_type(**values)
    settings.validate()
    if PARTICIPANTS_KEY in document and isinstance(settings, ExporterSettings):
        settings = settings.replace(participants=participants_of(document[PARTICIPANTS_KEY], settings))
    return settings


def effective(settings: Any, command: str | None = None) -> dict[str, Any]:
    """The settings' keys with their values, secrets masked: what ``check-config`` prints (with a
    multi-participant configuration also ``PARTICIPANTS``: each name and the keys it sets differently)."""
    shown = _key_values(settings)
    for participant in getattr(settings, "participants", ()):
        own = _key_values(participant.settings)
        differs = {name.lower(): value for name, value in own.items() if shown.get(name) != value}
        shown.setdefault(PARTICIPANTS_KEY.upper(), []).append({"name": participant.name, **differs})
    return shown


def _key_values(settings: Any) -> dict[str, Any]:
    shown: dict[str, Any] = {}
    for k in keys_of(settings):
        value = getattr(settings, k.name)
        if k.secret and value:
            value = _mask(k.name, value)
        elif isinstance(value, dict):
            value = {name: {"warning": t.warning, "critical": t.critical} for name, t in value.items()}
        shown[k.env] = value
    return shown


def _mask(name: str, value: str) -> str:
    """Hides passwords in connection strings (parsed as libpq does) and every other secret entirely."""
    return dsn.mask_dsn(value) if name == "database_url" else "***"
