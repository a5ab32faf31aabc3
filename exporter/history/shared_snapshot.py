"""The derived snapshot a poller leader shares with its followers: JSON codec and the SQL that moves it.

The leader stores its latest :class:`DerivedSnapshot` in ``dict_rate_limit_shared_snapshot`` after each
successful poll; followers read it back and serve it as if they had polled, so every replica exports the
same values, ResponseTime and gross-consumption counters, and a new leader derives its first snapshot
against the previous leader's last one (the counters carry on). The codec walks the dataclass fields, so
a field added to PolicyState or PolicyReading travels without a change here.
"""

from __future__ import annotations

import dataclasses
import math
from datetime import datetime
from typing import Any

from exporter.service.derivation import DerivedSnapshot, PolicyState
from exporter.snapshot import PolicyReading, Snapshot

#: Bump when the JSON shape changes incompatibly; a follower ignores a snapshot of another version.
FORMAT_VERSION = 1

# Published by the leader: only while the lease row still names it with its term (fencing). The
# conditional upsert runs in one statement, so a replaced leader's late snapshot is dropped atomically.
PUBLISH = """
WITH leader AS (
    SELECT 1 FROM dict_rate_limit_poller_lease
     WHERE poller_group = %(group)s AND holder = %(holder)s AND term = %(term)s
       FOR UPDATE)
INSERT INTO dict_rate_limit_shared_snapshot AS s (poller_group, term, response_time, published_at, snapshot)
SELECT %(group)s, %(term)s, %(response_time)s, clock_timestamp(), %(snapshot)s FROM leader
ON CONFLICT (poller_group) DO UPDATE
   SET term = EXCLUDED.term, response_time = EXCLUDED.response_time,
       published_at = EXCLUDED.published_at, snapshot = EXCLUDED.snapshot
 WHERE s.response_time <= EXCLUDED.response_time
RETURNING 1
"""
# The age is computed on the database's clock, the one published_at was taken with. Only a snapshot newer
# than the one the follower has comes back: followers ask every second or so, the document is sent once.
READ = """
SELECT term, response_time, extract(epoch FROM clock_timestamp() - published_at)::float8, snapshot
  FROM dict_rate_limit_shared_snapshot
 WHERE poller_group = %(group)s AND (%(seen)s::timestamptz IS NULL OR response_time > %(seen)s)
"""


class SnapshotFormatError(ValueError):
    """A shared snapshot this release cannot read (another version, a damaged row)."""


def _number(value: float | None) -> Any:
    # JSON (and jsonb) have no infinity: a bucket that never refills has an infinite recovery ETA.
    if value is not None and not math.isfinite(value):
        return str(value)
    return value


def _plain(instance: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        out[field.name] = _number(value) if isinstance(value, float) else value
    return out


def encode(derived: DerivedSnapshot) -> dict[str, Any]:
    """The JSON document of a derived snapshot (see :func:`decode`)."""
    snapshot = derived.snapshot
    return {
        "version": FORMAT_VERSION,
        "response_time": snapshot.response_time.isoformat(),
        "correlation_id": snapshot.correlation_id,
        "category": snapshot.category,
        "participant_ispb": snapshot.participant_ispb,
        "category_changed": derived.category_changed,
        "states": [{**_plain(state), "reading": _plain(state.reading)} for state in derived.states],
        "missing": list(derived.missing),
    }


def _restore(cls: type[Any], document: dict[str, Any]) -> Any:
    values = {}
    for field in dataclasses.fields(cls):
        if field.name not in document:
            continue  # a field with a default this release knows and the writer did not send
        value = document[field.name]
        if isinstance(value, str) and field.type in _FLOAT_TYPES:
            value = float(value)
        elif isinstance(value, list):  # JSON has no tuples: the rate window's (time, total) points
            value = tuple(tuple(item) if isinstance(item, list) else item for item in value)
        values[field.name] = value
    return cls(**values)


_FLOAT_TYPES = frozenset({"float", "float | None"})


def decode(document: dict[str, Any]) -> DerivedSnapshot:
    """Rebuilds the derived snapshot :func:`encode` stored; SnapshotFormatError if it cannot."""
    if document.get("version") != FORMAT_VERSION:
        raise SnapshotFormatError(f"shared snapshot format {document.get('version')!r}, not {FORMAT_VERSION}")
    try:
        states = tuple(
            _restore(PolicyState, {**state, "reading": _restore(PolicyReading, state["reading"])})
            for state in document["states"]
        )
        snapshot = Snapshot(
            response_time=datetime.fromisoformat(document["response_time"]),
            correlation_id=document["correlation_id"],
            category=document["category"],
            policies=tuple(state.reading for state in states),
            participant_ispb=str(document.get("participant_ispb", "")),
        )
        changed = bool(document["category_changed"])
        missing = tuple(str(name) for name in document.get("missing", ()))
        return DerivedSnapshot(snapshot=snapshot, states=states, category_changed=changed, missing=missing)
    except (KeyError, TypeError, ValueError) as exc:
        raise SnapshotFormatError(f"damaged shared snapshot: {exc}") from exc
