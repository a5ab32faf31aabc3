"""The exporter's own health metrics: Bridge reachability, poll outcomes and durations, rejected policies.

Unlike the bucket series these are never withdrawn. They live in a private registry (no module globals) and
change only through the methods below, each of which bumps a generation number, so a scrape re-renders them
only when something changed since the previous scrape.
"""

from __future__ import annotations

import platform
import threading
from collections.abc import Iterable, Iterator

from prometheus_client import Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from exporter import __version__
from exporter.telemetry import DURATION_BUCKETS, new_registry

#: Reasons a Bridge response (or one policy of it) is rejected; created at start-up so the series exist.
INVALID_REASONS = (
    "missing_field",
    "capacity_not_positive",
    "refill_period_not_positive",
    "refill_tokens_negative",
    "unknown_category",
    "duplicate_name",
    # Field by field (issue 12/17): the policy or the snapshot is kept, the field cleaned or dropped.
    "invalid_name",
    "value_out_of_range",
    "invalid_correlation_id",
    "category_normalized",
    # A policy's response_counts (issue 15): dropped whole, the bucket values kept.
    "invalid_response_code",
    "duplicate_response_code",
    "response_count_out_of_range",
    # Whole answers that cannot be served: the poll fails.
    "no_usable_policy",
    "no_usable_category",
    "implausible_response_time",
    "response_time_backwards",
    "participant_mismatch",
)
#: Operations of dict_rate_limit_monitoring_duration_seconds timed inside the exporter.
OPERATIONS = ("poll", "bridge_call", "history_write", "maintenance")
#: The operations of one participant's poller (the others belong to the process).
POLL_OPERATIONS = ("poll", "bridge_call")
#: A poll takes one loopback call (~1 ms) up to the Bridge timeout with retries (seconds).


class _StateCollector(Collector):
    """Gauges that describe the poller's state; values are read from :class:`SelfMetrics` at render time."""

    def __init__(self, owner: SelfMetrics) -> None:
        self._owner = owner

    def describe(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        return self._families(with_samples=False)

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        return self._families(with_samples=True)

    def _families(self, *, with_samples: bool) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        o = self._owner
        specs: tuple[tuple[str, str, float], ...] = (
            (
                "dict_rate_limit_bridge_up",
                "1 when the last poll of the Bridge succeeded, 0 when it failed.",
                o.up,
            ),
            (
                "dict_rate_limit_last_success_timestamp_seconds",
                "Unix time (local clock) of the last successful poll of the Bridge; 0 before the first.",
                o.last_success_timestamp,
            ),
            (
                "dict_rate_limit_poll_interval_seconds",
                "Configured seconds between Bridge list calls (POLL_INTERVAL_SECONDS).",
                o.poll_interval,
            ),
            (
                "dict_rate_limit_stale",
                "1 while the bucket series are withdrawn because the last successful poll is older than "
                "STALE_AFTER_INTERVALS intervals.",
                1.0 if o.stale else 0.0,
            ),
        )
        for name, help_text, value in specs:
            gauge = GaugeMetricFamily(name, help_text)
            if with_samples:
                gauge.add_metric([], value)
            yield gauge
        changes = CounterMetricFamily(
            "dict_rate_limit_category_changes",
            "Times the PSP category DICT reported differed from the previous snapshot's (BCB changed it).",
        )
        build = GaugeMetricFamily(
            "dict_rate_limit_exporter_build_info",
            "Build information of the exporter (value 1).",
            labels=["version", "python_version"],
        )
        unmatched = GaugeMetricFamily(
            "dict_rate_limit_threshold_policy_unmatched",
            "1 for each policy named in POLICY_THRESHOLDS that the last successful poll of the Bridge did "
            "not return (renamed or removed by DICT: the override applies to nothing).",
            labels=["endpoint_id"],
        )
        if with_samples:
            changes.add_metric([], o.category_changes)
            build.add_metric([__version__, platform.python_version()], 1)
            for name in sorted(o.unmatched_thresholds):
                unmatched.add_metric([name], 1)
        yield changes
        if o.process:
            yield build
        yield unmatched


class SelfMetrics:
    """Counters, histograms and state gauges of the exporter's own health, rendered on demand.

    ``process=False`` gives one participant's part of a multi-participant exporter: no ``process_*``
    series, no build information and only the poll operations (those are the process's, see
    :class:`ProcessMetrics`).
    """

    def __init__(self, poll_interval: float, *, process: bool = True) -> None:
        self.process = process
        self.registry = new_registry(process=process)
        self.poll_interval = poll_interval
        self.up = 0.0
        self.last_success_timestamp = 0.0
        self.stale = False
        self.category_changes = 0
        self.unmatched_thresholds: frozenset[str] = frozenset()
        self._generation = 0
        self._cache_key: tuple[int, bool] | None = None
        self._cache = b""
        self._lock = threading.Lock()
        r = self.registry
        self.polls = Counter(
            "dict_rate_limit_polls",
            "Polls of the Bridge by result: success, failure, or skipped (no call made: the ceiling of list "
            "calls per minute was spent, or the Bridge passed a Retry-After).",
            ["result"],
            registry=r,
        )
        self.bridge_requests = Counter(
            "dict_rate_limit_bridge_requests",
            "Calls to the Bridge (retries included), by gRPC status code.",
            ["code"],
            registry=r,
        )
        self.poll_duration = Histogram(
            "dict_rate_limit_poll_duration_seconds",
            "Wall time of one poll of the Bridge, retries included.",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.invalid_policies = Counter(
            "dict_rate_limit_invalid_policies",
            "Policies, fields or whole answers of the Bridge rejected or cleaned, by reason (see "
            "docs/bridge-contract.md: which reasons drop a field, a policy, or fail the poll).",
            ["reason"],
            registry=r,
        )
        self.monitoring_duration = Histogram(
            "dict_rate_limit_monitoring_duration_seconds",
            "Time of the product's operations, by operation.",
            ["operation"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        r.register(_StateCollector(self))
        # Label values created up front so every series exists from the first scrape.
        for result in ("success", "failure", "skipped"):
            self.polls.labels(result)
        for reason in INVALID_REASONS:
            self.invalid_policies.labels(reason)
        for operation in OPERATIONS if process else POLL_OPERATIONS:
            self.monitoring_duration.labels(operation)
        self.bridge_requests.labels("OK")

    def _changed(self) -> None:
        with self._lock:
            self._generation += 1

    def record_bridge_request(self, code: str) -> None:
        """The Bridge client's ``on_attempt`` hook: one call per gRPC attempt, by status name."""
        self.bridge_requests.labels(code).inc()
        self._changed()

    def record_invalid(self, reason: str, count: int = 1) -> None:
        self.invalid_policies.labels(reason).inc(count)
        self._changed()

    def record_skip(self) -> None:
        self.polls.labels("skipped").inc()
        self._changed()

    def set_unmatched_thresholds(self, names: frozenset[str]) -> None:
        if names != self.unmatched_thresholds:
            self.unmatched_thresholds = names
            self._changed()

    def observe(self, operation: str, seconds: float) -> None:
        """Times one operation (also the history writer's ``observe`` hook)."""
        self.monitoring_duration.labels(operation).observe(seconds)
        self._changed()

    def record_poll(self, *, success: bool, seconds: float, wall_time: float, category_changed: bool) -> None:
        self.polls.labels("success" if success else "failure").inc()
        self.poll_duration.observe(seconds)
        self.monitoring_duration.labels("poll").observe(seconds)
        self.up = 1.0 if success else 0.0
        if success:
            self.last_success_timestamp = wall_time
        if category_changed:
            self.category_changes += 1
        self._changed()

    def render(self, *, stale: bool) -> bytes:
        """The health part of the exposition; re-rendered only when a value changed since the last call."""
        with self._lock:
            key = (self._generation, stale)
            if key == self._cache_key:
                return self._cache
        self.stale = stale
        body = generate_latest(self.registry)
        with self._lock:
            # A change that raced the render bumped the generation after we read it: cache under the old key.
            self._cache_key, self._cache = key, body
        return body


class _BuildCollector(Collector):
    def describe(self) -> Iterable[GaugeMetricFamily]:
        return self.collect()

    def collect(self) -> Iterable[GaugeMetricFamily]:
        build = GaugeMetricFamily(
            "dict_rate_limit_exporter_build_info",
            "Build information of the exporter (value 1).",
            labels=["version", "python_version"],
        )
        build.add_metric([__version__, platform.python_version()], 1)
        yield build


class ProcessMetrics:
    """The process-wide part of a multi-participant exporter's own series (never labelled by participant):
    ``process_*``, build information, and the history operations (one writer serves every participant)."""

    def __init__(self) -> None:
        self.registry = new_registry(process=True)
        self.registry.register(_BuildCollector())
        self.monitoring_duration = Histogram(
            "dict_rate_limit_monitoring_duration_seconds",
            "Time of the product's operations, by operation.",
            ["operation"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        for operation in OPERATIONS:
            if operation not in POLL_OPERATIONS:
                self.monitoring_duration.labels(operation)
        self._generation = 0
        self._cache: tuple[int, bytes] | None = None

    def observe(self, operation: str, seconds: float) -> None:
        """The history writer's ``observe`` hook."""
        self.monitoring_duration.labels(operation).observe(seconds)
        self._generation += 1

    def render(self) -> bytes:
        """Re-rendered only after a change, as :meth:`SelfMetrics.render` (``process_*`` are as fresh as
        the last change, as in a single-participant exporter)."""
        cached = self._cache
        if cached is None or cached[0] != self._generation:
            cached = self._cache = (self._generation, generate_latest(self.registry))
        return cached[1]
