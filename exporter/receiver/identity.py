"""The identity of an alert whichever Prometheus replica sent it.

Two Prometheus replicas (an HA pair) evaluate the same rules and send the same alert with their own
external label (``prometheus_replica``, ``replica``...): Alertmanager sees two alerts with two fingerprints.
The standard setup drops that label in ``alert_relabel_configs`` (docs/alerting.md); the receiver also
drops the configured replica labels before it identifies an alert, so the audit row and the Pulsar
``event_id`` are the same whichever replica's copy arrives first.

The fingerprint is computed exactly as Prometheus and Alertmanager compute a label set's (FNV-1a 64 over
the sorted names and values, each followed by the 0xff separator), so an alert without replica labels
keeps Alertmanager's own fingerprint.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

_FNV_OFFSET = 14695981039346656037
_FNV_PRIME = 1099511628211
_MASK = (1 << 64) - 1
_SEPARATOR = 0xFF
#: Labels HA Prometheus setups commonly put on each replica (Prometheus Operator, Thanos, Cortex/Mimir).
DEFAULT_REPLICA_LABELS = ("prometheus_replica", "replica", "__replica__")


def _add(state: int, data: bytes) -> int:
    for byte in data:
        state = ((state ^ byte) * _FNV_PRIME) & _MASK
    return state


def label_fingerprint(labels: Mapping[str, str]) -> str:
    """Alertmanager's fingerprint of a label set: 16 lower-case hex digits."""
    state = _FNV_OFFSET
    for name in sorted(labels):
        state = _add(state, name.encode())
        state = _add(state, bytes([_SEPARATOR]))
        state = _add(state, labels[name].encode())
        state = _add(state, bytes([_SEPARATOR]))
    return f"{state:016x}"


def without_replica_labels(labels: Mapping[str, str], replica_labels: Iterable[str]) -> dict[str, str]:
    """The labels that identify the alert: all but the replica labels."""
    drop = set(replica_labels)
    return {name: value for name, value in labels.items() if name not in drop}
