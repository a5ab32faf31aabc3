"""Alertmanager webhook payloads (version 4): validation of untrusted JSON into typed, frozen dataclasses.

Every rejection is a :class:`PayloadError` naming the offending field (``alerts[3].startsAt: not an RFC 3339
time``), which the receiver answers with 400: Alertmanager never retries a 4xx, so a reason must be
precise enough for an operator to fix the rule or template that produced it. Unknown fields are ignored
(Alertmanager adds fields over time). Strings must be storable in PostgreSQL (no NUL characters).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from exporter.receiver.identity import DEFAULT_REPLICA_LABELS, label_fingerprint, without_replica_labels

SEVERITIES = ("critical", "warning", "info")
ALERT_STATUSES = ("firing", "resolved")
#: Alertmanager's "no end time" while an alert fires (Go's zero time.Time).
ZERO_TIME_YEAR = 1
#: Annotations (or labels) the rules may carry with the bucket values of the moment the alert fired.
NUMERIC_FIELDS = (
    "available_tokens",
    "capacity",
    "utilization_percent",
    "recovery_eta_seconds",
    "exhaustion_projection_seconds",
)
_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(?:([Zz])|([+-])(\d{2}):(\d{2}))$"
)
_BIGINT = 2**63
#: JSON nesting allowed anywhere in a notification. Alertmanager's own objects are 3 levels deep; a
#: deeper body is hostile and would cost recursion in the validator and in PostgreSQL's jsonb parser.
MAX_DEPTH = 32
#: Labels copied into every alert event (and its message key): bounded so an event always stays far below
#: the broker's message limit (summary and description are cut by the relay, exporter/outbox.py).
IDENTITY_LABELS = ("alertname", "severity", "endpoint_id", "psp_category")
MAX_IDENTITY_CHARS = 256
#: truncatedAlerts is counted in a float counter: above 2^53 it is neither exact nor plausible
#: (Alertmanager truncates to max_alerts, a few thousand at most).
MAX_TRUNCATED = 2**53
#: Alert times outside [EARLIEST_TIME, now + MAX_FUTURE] are refused (reason implausible_time): year 0001
#: is only Alertmanager's "no end" value, 9999 or a time days ahead a broken clock or a forged alert.
EARLIEST_TIME = datetime(2000, 1, 1, tzinfo=UTC)
MAX_FUTURE = timedelta(days=1)


class PayloadError(ValueError):
    """A payload Alertmanager should not send: ``str()`` names the field, ``reason`` is the metric label."""

    def __init__(self, field: str, message: str, reason: str = "invalid_field") -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.reason = reason


@dataclass(frozen=True, slots=True)
class AlertNotification:
    """One alert of a notification, as Alertmanager saw it."""

    status: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    starts_at: datetime
    ends_at: datetime | None
    generator_url: str
    fingerprint: str
    raw: Mapping[str, Any]

    @property
    def alert_name(self) -> str:
        return self.labels["alertname"]

    @property
    def severity(self) -> str:
        return self.labels["severity"].lower()  # the seeds wrote WARNING/CRITICAL

    @property
    def endpoint_id(self) -> str | None:
        return self.labels.get("endpoint_id") or None

    @property
    def psp_category(self) -> str | None:
        # Bundle 2 keeps the category out of the labels (BCB changes it; identity must survive) and in
        # an annotation; the seeds' rules and bundle 1 have it as a label.
        category = self.labels.get("psp_category") or self.annotations.get("psp_category") or ""
        return category if category and category != "unknown" else None

    @property
    def data_lost(self) -> bool:
        """The rules' last evaluation held the alert on its last known state (no fresh bucket data)."""
        return self.annotations.get("data_state") == "missing"

    def number(self, name: str) -> float | None:
        """A numeric annotation (or label) such as ``available_tokens``; None when absent or not a number."""
        return parse_number(self.annotations.get(name, self.labels.get(name)))


@dataclass(frozen=True, slots=True)
class WebhookPayload:
    """A whole notification: one Alertmanager group."""

    version: str
    group_key: str
    status: str
    receiver: str
    truncated_alerts: int
    alerts: tuple[AlertNotification, ...]
    #: The sending Alertmanager's external URL: where the receiver asks which alerts are still active.
    external_url: str = ""


def parse_number(text: str | None) -> float | None:
    """A finite number from an annotation, else None: a missing or odd annotation never rejects an alert."""
    if text is None:
        return None
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def to_bigint(value: float | None) -> int | None:
    """Rounds to a PostgreSQL bigint, or None when it does not fit (it would fail the whole transaction)."""
    if value is None or not -_BIGINT < value < _BIGINT - 1024:
        return None
    return round(value)


def parse_time(text: Any, field: str) -> datetime:
    """An RFC 3339 time (nanoseconds truncated to microseconds, PostgreSQL's precision), in UTC."""
    if not isinstance(text, str):
        raise PayloadError(field, "not an RFC 3339 time (must be a string)")
    match = _RFC3339.match(text)
    if match is None:
        raise PayloadError(field, "not an RFC 3339 time")
    year, month, day, hour, minute, second = (int(match[i]) for i in range(1, 7))
    micros = int((match[7] or "0").ljust(6, "0")[:6])
    offset = timedelta(0)
    if match[9]:
        offset = timedelta(hours=int(match[10]), minutes=int(match[11]))
        if offset >= timedelta(hours=24):
            raise PayloadError(field, "not an RFC 3339 time (offset out of range)")
        offset = offset if match[9] == "+" else -offset
    try:
        # A leap second (60) is valid RFC 3339 but not a Python time: keep it inside the minute.
        second = 59 if second == 60 else second
        local = datetime(year, month, day, hour, minute, second, micros, timezone(offset))
        return local.astimezone(UTC)
    except (ValueError, OverflowError):
        raise PayloadError(field, "not an RFC 3339 time (out of range)") from None


def _text(value: Any, field: str, *, required: bool = True) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise PayloadError(field, f"must be a string (got {_kind(value)})")
    if "\x00" in value:
        raise PayloadError(field, "contains a NUL character")
    return value


def _string_map(value: Any, field: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PayloadError(field, f"must be an object of strings (got {_kind(value)})")
    result: dict[str, str] = {}
    for key, item in value.items():
        if "\x00" in key:
            raise PayloadError(field, "a key contains a NUL character")
        result[key] = _text(item, f"{field}.{key}")
    return result


def _storable(value: Any, field: str, escaped: bool = True) -> None:
    """Rejects what PostgreSQL's jsonb cannot hold anywhere in an alert, unknown fields included.

    Iterative, with a depth bound: a hostile body nested hundreds deep is a 400, never a RecursionError.
    ``escaped=False`` (parse_payload: the body has no escape that could produce such a string) skips it.
    """
    if not escaped:
        return
    stack: list[tuple[Any, str, int]] = [(value, field, 0)]
    while stack:
        item, where, depth = stack.pop()
        if isinstance(item, str):
            _storable_text(item, where)
            continue
        if not isinstance(item, dict | list):
            continue
        if depth >= MAX_DEPTH:
            raise PayloadError(where, f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(item, dict):
            for key, child in item.items():
                _storable_text(key, where)
                stack.append((child, f"{where}.{key}", depth + 1))
        else:
            stack.extend((child, f"{where}[{index}]", depth + 1) for index, child in enumerate(item))


def _storable_text(value: str, field: str) -> None:
    if "\x00" in value:
        raise PayloadError(field, "contains a NUL character")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise PayloadError(field, "contains an unpaired surrogate") from None


def _reject_constant(name: str) -> Any:
    raise PayloadError("", f"body is not JSON ({name} is not a JSON number)", "not_json")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise PayloadError("", f"body is not JSON ({text} is out of range)", "not_json")
    return value


def _kind(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean"}
    return "null" if value is None else names.get(type(value), "number")


def _plausible(moment: datetime, field: str, now: datetime) -> datetime:
    if not EARLIEST_TIME <= moment <= now + MAX_FUTURE:
        raise PayloadError(
            field,
            f"implausible time {moment.isoformat()} (accepted: {EARLIEST_TIME.year} to now + {MAX_FUTURE})",
            "implausible_time",
        )
    return moment


def _alert(
    raw: Any, field: str, replica_labels: tuple[str, ...], now: datetime, escaped: bool = True
) -> AlertNotification:
    if not isinstance(raw, dict):
        raise PayloadError(field, f"must be an object (got {_kind(raw)})")
    _storable(raw, field, escaped)
    status = _text(raw.get("status"), f"{field}.status")
    if status not in ALERT_STATUSES:
        raise PayloadError(f"{field}.status", "must be firing or resolved")
    labels = _string_map(raw.get("labels"), f"{field}.labels")
    for name in IDENTITY_LABELS:
        if len(labels.get(name, "")) > MAX_IDENTITY_CHARS:
            raise PayloadError(f"{field}.labels.{name}", f"longer than {MAX_IDENTITY_CHARS} characters")
    if not labels.get("alertname"):
        raise PayloadError(f"{field}.labels.alertname", "missing")
    if labels.get("severity", "").lower() not in SEVERITIES:
        raise PayloadError(f"{field}.labels.severity", "must be critical, warning or info")
    fingerprint = _text(raw.get("fingerprint"), f"{field}.fingerprint")
    if not fingerprint or len(fingerprint) > 128:
        raise PayloadError(f"{field}.fingerprint", "must be 1 to 128 characters")
    identity = without_replica_labels(labels, replica_labels)
    if identity != labels:  # a Prometheus replica's copy: identified as the alert without its replica label
        labels, fingerprint = identity, label_fingerprint(identity)
    starts_at = _plausible(parse_time(raw.get("startsAt"), f"{field}.startsAt"), f"{field}.startsAt", now)
    ends_raw = raw.get("endsAt")
    ends_at = None if ends_raw in (None, "") else parse_time(ends_raw, f"{field}.endsAt")
    if ends_at is not None and ends_at.year <= ZERO_TIME_YEAR:
        ends_at = None
    if ends_at is not None:
        _plausible(ends_at, f"{field}.endsAt", now)
        if ends_at < starts_at:
            raise PayloadError(f"{field}.endsAt", "before startsAt", "implausible_time")
    if status == "resolved" and ends_at is None:
        raise PayloadError(f"{field}.endsAt", "a resolved alert needs an end time")
    return AlertNotification(
        status=status,
        labels=labels,
        annotations=_string_map(raw.get("annotations"), f"{field}.annotations"),
        starts_at=starts_at,
        ends_at=ends_at,
        generator_url=_text(raw.get("generatorURL"), f"{field}.generatorURL", required=False),
        fingerprint=fingerprint,
        raw=raw,
    )


def _shallow(document: Any) -> None:
    """Refuses a document nested deeper than MAX_DEPTH (a hostile body: it would cost recursion in the
    validator and in PostgreSQL's jsonb parser).

    A walk over the containers only, after parsing: an alert is three of them, so this costs a few
    microseconds where scanning the body's bytes cost a tenth of a request. A body too deep for the
    parser itself (json.loads stops at the interpreter's recursion limit) is refused the same way.
    """
    stack: list[tuple[Any, int]] = [(document, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise PayloadError("", f"body is nested deeper than {MAX_DEPTH} levels", "invalid_field")
        # json.loads makes exact dicts and lists: `type() is` is a third of isinstance's cost here.
        for child in item.values() if type(item) is dict else item:
            if type(child) is dict or type(child) is list:
                stack.append((child, depth + 1))


def parse_payload(
    body: bytes, replica_labels: tuple[str, ...] = DEFAULT_REPLICA_LABELS, now: datetime | None = None
) -> WebhookPayload:
    """Validates a webhook body; raises :class:`PayloadError` (never anything else) when it is not one.

    ``replica_labels`` are dropped from each alert's labels (and its fingerprint recomputed without them);
    ``now`` (default: the clock) bounds plausible alert times.
    """
    now = now or datetime.now(UTC)
    # In a UTF-8 body a NUL or a lone surrogate can only come from a \\u escape (the parser refuses raw
    # control characters and undecodable bytes), and _shallow bounds the depth: without one, _storable has
    # nothing to find and its walk over every string (a tenth of a request) is skipped. A NUL byte: maybe
    # UTF-16 or UTF-32 (json.loads detects them), whose escapes this search would not see.
    escaped = b"\\u" in body or b"\x00" in body
    try:
        document = json.loads(body, parse_constant=_reject_constant, parse_float=_finite_float)
    except PayloadError:
        raise
    except RecursionError:
        raise PayloadError("", f"body is nested deeper than {MAX_DEPTH} levels", "invalid_field") from None
    except (UnicodeDecodeError, ValueError):
        raise PayloadError("", "body is not JSON", "not_json") from None
    if isinstance(document, dict | list):
        _shallow(document)
    if not isinstance(document, dict):
        raise PayloadError("", "body must be a JSON object", "invalid_field")
    version = document.get("version")
    if version != "4":
        raise PayloadError(
            "version", f"unsupported webhook version {version!r} (need '4')", "unsupported_version"
        )
    alerts = document.get("alerts")
    if not isinstance(alerts, list):
        raise PayloadError("alerts", f"must be an array (got {_kind(alerts)})")
    truncated = document.get("truncatedAlerts", 0)
    if truncated is None:
        truncated = 0
    if isinstance(truncated, bool) or not isinstance(truncated, int) or truncated < 0:
        raise PayloadError("truncatedAlerts", "must be a non-negative integer")
    if truncated > MAX_TRUNCATED:
        raise PayloadError("truncatedAlerts", f"implausibly large (above 2^53 = {MAX_TRUNCATED})")
    return WebhookPayload(
        version=version,
        group_key=_text(document.get("groupKey"), "groupKey", required=False),
        status=_text(document.get("status"), "status", required=False),
        receiver=_text(document.get("receiver"), "receiver", required=False),
        truncated_alerts=truncated,
        alerts=tuple(
            _alert(item, f"alerts[{index}]", replica_labels, now, escaped)
            for index, item in enumerate(alerts)
        ),
        external_url=_text(document.get("externalURL"), "externalURL", required=False),
    )
