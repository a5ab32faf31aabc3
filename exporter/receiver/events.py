"""The Pulsar alert event: its fields (the seeds' names), its JSON body, message key and properties.

One event per alert state change: ``rate_limit.alert.created`` when an alert instance is first recorded
firing, ``rate_limit.alert.resolved`` when it is resolved. The body is described by
``schemas/rate-limit-alert-event.schema.json`` (a test keeps the two in step). ``event_id`` is chosen when the
outbox row is written and never changes, so a consumer deduplicates retries and redeliveries on it.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

#: Major: a field changes meaning or is removed. Minor: a field is added (1.1: ``rule_description``, and
#: ``message`` built from the event's own numbers; 1.2: ``participant``).
SCHEMA_VERSION = "1.2"
CREATED = "rate_limit.alert.created"
RESOLVED = "rate_limit.alert.resolved"
EVENT_TYPES = (CREATED, RESOLVED)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def event_id_for(fingerprint: str, starts_at: datetime, event_type: str) -> uuid.UUID:
    """The id ``sql/0003`` gives the event: md5 of fingerprint, startsAt (µs since the epoch) and type."""
    micros = (starts_at - _EPOCH) // timedelta(microseconds=1)
    digest = hashlib.md5(f"{fingerprint}|{micros}|{event_type}".encode(), usedforsecurity=False).hexdigest()
    return uuid.UUID(digest)


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """An unsent outbox row joined with its alert: what the relay reads (column names = field names).

    The bucket values are the outbox row's own (``sql/0007``): those of the change the event publishes,
    not the alert row's current ones.
    """

    id: int
    event_id: uuid.UUID
    event_type: str
    alert_name: str
    fingerprint: str
    severity: str
    endpoint_id: str | None
    psp_category: str | None
    status: str
    starts_at: datetime
    ends_at: datetime | None
    resolved_at: datetime | None
    resolved_by: str | None
    available_tokens: int | None
    capacity: int | None
    utilization_percent: float | None
    recovery_eta_seconds: float | None
    exhaustion_projection_seconds: float | None
    summary: str | None
    description: str | None
    #: The alert's ``participant`` label (a multi-participant exporter's series carry it); None without.
    participant: str | None = None


@dataclass(frozen=True, slots=True)
class AlertEvent:
    """The body of one Pulsar message (field order = JSON order)."""

    event_id: str
    event_type: str
    timestamp: str
    endpoint_id: str | None
    severity: str
    available_tokens: int | None
    capacity: int | None
    utilization_percent: float | None
    recovery_eta_seconds: float | None
    exhaustion_projection_seconds: float | None
    psp_category: str | None
    message: str
    schema_version: str
    alert_name: str
    fingerprint: str
    starts_at: str
    ends_at: str | None
    resolved_by: str | None
    rule_description: str | None
    participant: str | None

    @classmethod
    def from_row(cls, row: OutboxRow) -> AlertEvent:
        resolved = row.event_type == RESOLVED
        # The time of the change itself, so a redelivered event carries the same timestamp.
        when = (row.ends_at or row.resolved_at or row.starts_at) if resolved else row.starts_at
        return cls(
            event_id=str(row.event_id),
            event_type=row.event_type,
            timestamp=_rfc3339(when),
            endpoint_id=row.endpoint_id,
            severity=row.severity,
            available_tokens=row.available_tokens,
            capacity=row.capacity,
            utilization_percent=row.utilization_percent,
            recovery_eta_seconds=row.recovery_eta_seconds,
            exhaustion_projection_seconds=row.exhaustion_projection_seconds,
            psp_category=row.psp_category,
            message=_message(row, resolved),
            schema_version=SCHEMA_VERSION,
            alert_name=row.alert_name,
            fingerprint=row.fingerprint,
            starts_at=_rfc3339(row.starts_at),
            ends_at=_rfc3339(when) if resolved else None,
            resolved_by=row.resolved_by if resolved else None,
            rule_description=_one_line(row.description),
            participant=row.participant or None,
        )

    def to_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it deep-copies every value, the relay's hottest line.
        return {name: getattr(self, name) for name in self.__slots__}

    def body(self) -> bytes:
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":")).encode()

    @property
    def key(self) -> str:
        """Message key: the policy, so a keyed subscription keeps each policy's events in order.

        Health alerts have no policy; their alert name keeps each one's created/resolved pair together.
        """
        return self.endpoint_id or self.alert_name

    def properties(self) -> dict[str, str]:
        properties = {
            "event_type": self.event_type,
            "severity": self.severity,
            "psp_category": self.psp_category or "",
            "schema_version": self.schema_version,
            "event_id": self.event_id,
        }
        if self.participant:  # only when there is one: a single-participant event's properties are as before
            properties["participant"] = self.participant
        return properties


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


_RESOLUTION_CAUSES = {
    "data_lost": " (data lost, recovery not seen)",
    "reconciled": " (no longer active in Alertmanager)",
}


def _one_line(text: str | None) -> str | None:
    joined = " ".join((text or "").split())
    return joined or None


def _message(row: OutboxRow, resolved: bool) -> str:
    """The human summary of the event, its numbers taken from the event's own fields.

    The rules' description is rendered by Prometheus at its evaluation from its own projection (and a
    resolved notification repeats the last firing one), so its numbers disagree with the event's: it
    travels apart, as ``rule_description``. Health alerts carry no bucket values: their description is
    the message, as before.
    """
    headline = _one_line(row.summary) or row.alert_name
    if row.endpoint_id is None:
        text = _one_line(row.description) or headline
    else:
        text = f"{headline} {bucket_values(row)}"
    if not resolved:
        return text
    # A resolution is not always a recovery: say so, consumers must not read "the bucket is fine".
    cause = _RESOLUTION_CAUSES.get(row.resolved_by or "", "")
    return f"Resolved{cause}: {text}"


def bucket_values(row: OutboxRow) -> str:
    """``ENTRIES_WRITE: 3628 of 36000 tokens left, 89.92 % used; empty in 34s; full again in 27m 52s.``"""
    if row.available_tokens is None or row.capacity is None:
        return f"{row.endpoint_id}: bucket values unknown."
    parts = [f"{row.endpoint_id}: {row.available_tokens} of {row.capacity} tokens left"]
    if row.utilization_percent is not None:
        parts[0] += f", {row.utilization_percent:.2f} % used"
    if row.exhaustion_projection_seconds is None:
        parts.append("not draining")
    else:
        parts.append(f"empty in {duration(row.exhaustion_projection_seconds)} at the current rate")
    if row.recovery_eta_seconds is not None:
        parts.append(f"full again in {duration(row.recovery_eta_seconds)} if traffic stops")
    return "; ".join(parts) + "."


def duration(seconds: float) -> str:
    """Whole seconds as ``1d 2h 3m 4s`` (zero parts left out; ``0s`` for nothing left)."""
    left = max(0, round(seconds))
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, left = divmod(left, size)
        if count:
            parts.append(f"{count}{unit}")
    return " ".join(parts) or "0s"
