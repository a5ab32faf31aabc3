"""The receiver's metrics (docs/metrics.md, "Receiver"): a private registry, counters changed only by events.

The outbox backlog comes from the relay's last look at the table (no query at scrape time): a custom
collector renders it, with the age of the oldest unsent event computed at scrape time.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from exporter import __version__
from exporter.receiver.store import RecordResult
from exporter.snapshot import CATEGORIES

#: Reasons a payload is rejected with 4xx (the field itself is in the response body and the log).
INVALID_REASONS = (
    "too_large",
    "too_slow",
    "not_json",
    "unsupported_version",
    "invalid_field",
    "implausible_time",
)
#: Codes the webhook answers; created at start-up so a dashboard sees zeros, not gaps.
WEBHOOK_STATUSES = ("200", "400", "401", "408", "413", "500", "503")
#: From a loopback ack (~0.5 ms) to a send timeout (seconds).
DURATION_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
SEED_LABELS = ("endpoint_id", "severity", "psp_category")
SEVERITIES = frozenset({"critical", "warning", "info"})
#: The broker's permanent refusals (exporter.outbox.PERMANENT_RESULTS), the only set-aside reasons.
SET_ASIDE_REASONS = ("MessageTooBig", "InvalidMessage")


#: The label value standing for every policy or category outside the bounded sets.
OVERFLOW = "other"
#: Policies not (yet) in dict_rate_limit_policies admitted as label values, first come first served: a
#: receiver without history, or a policy DICT just added, still gets its own series; thousands of
#: distinct (mistaken or hostile) endpoint_id values never make more than this many.
MAX_UNKNOWN_POLICIES = 50
#: Cap on the policies taken from the database (DICT has a few dozen).
MAX_KNOWN_POLICIES = 1000


class PolicyLabels:
    """Maps an alert's endpoint_id and psp_category to a label value from a bounded set."""

    def __init__(self, max_unknown: int = MAX_UNKNOWN_POLICIES) -> None:
        self._known: frozenset[str] = frozenset()
        self._admitted: set[str] = set()
        self._max_unknown = max_unknown

    def set_known(self, names: Iterable[str]) -> None:
        """The policies of dict_rate_limit_policies (refreshed by the receiver every minute)."""
        self._known = frozenset(list(names)[:MAX_KNOWN_POLICIES])

    def policy(self, endpoint_id: str) -> str:
        if not endpoint_id or endpoint_id in self._known or endpoint_id in self._admitted:
            return endpoint_id
        if len(self._admitted) < self._max_unknown:
            self._admitted.add(endpoint_id)
            return endpoint_id
        return OVERFLOW

    @staticmethod
    def category(psp_category: str) -> str:
        return psp_category if not psp_category or psp_category in CATEGORIES else OVERFLOW


class BacklogStats:
    """The relay's last count of unsent events and the creation time of the oldest (Unix seconds)."""

    def __init__(self) -> None:
        self.count = 0
        self.oldest_created: float | None = None
        self.set_aside = 0  # events the broker refused for good, waiting for `outbox replay`

    def update(self, count: int, oldest_created: float | None) -> None:
        self.count, self.oldest_created = count, oldest_created


class _BacklogCollector(Collector):
    def __init__(self, stats: BacklogStats, clock: Callable[[], float]) -> None:
        self._stats = stats
        self._clock = clock

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return self._families(0, 0.0, 0)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        oldest = self._stats.oldest_created
        age = max(0.0, self._clock() - oldest) if oldest is not None and self._stats.count else 0.0
        return self._families(self._stats.count, age, self._stats.set_aside)

    @staticmethod
    def _families(count: int, age: float, set_aside: int) -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily(
                "dict_rate_limit_outbox_set_aside",
                "Alert events the broker refused for good (MessageTooBig...), kept unsent until"
                " `dict-rate-limit outbox replay` (as of the relay's last check).",
                value=set_aside,
            ),
            GaugeMetricFamily(
                "dict_rate_limit_outbox_backlog",
                "Alert events committed but not yet acknowledged by Pulsar (as of the relay's last check).",
                value=count,
            ),
            GaugeMetricFamily(
                "dict_rate_limit_outbox_oldest_age_seconds",
                "Age of the oldest alert event not yet acknowledged by Pulsar; 0 when none.",
                value=age,
            ),
        ]


class ReceiverMetrics:
    """Every metric of ``dict-rate-limit receiver``, registered in ``registry`` (a new one by default)."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
        observe: Callable[[str, float], None] | None = None,
    ) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.labels = PolicyLabels()
        self.backlog = BacklogStats()
        self.alerts_created = Counter(
            "dict_rate_limit_alerts_created",
            "Alerts recorded as firing for the first time (counted after commit).",
            SEED_LABELS,
            registry=reg,
        )
        self.alerts_resolved = Counter(
            "dict_rate_limit_alerts_resolved",
            "Alerts recorded as resolved (counted after commit).",
            SEED_LABELS,
            registry=reg,
        )
        self.webhook_requests = Counter(
            "dict_rate_limit_webhook_requests",
            "Webhook requests answered, by HTTP status.",
            ["status"],
            registry=reg,
        )
        self.invalid_payloads = Counter(
            "dict_rate_limit_webhook_invalid_payloads",
            "Webhook payloads rejected with 4xx, by reason.",
            ["reason"],
            registry=reg,
        )
        self.duplicates = Counter(
            "dict_rate_limit_webhook_duplicates",
            "Alert notifications that changed nothing (retries, Alertmanager clusters, repeats).",
            registry=reg,
        )
        self.truncated = Counter(
            "dict_rate_limit_webhook_truncated_alerts",
            "Sum of truncatedAlerts received (alerts Alertmanager left out of a notification).",
            registry=reg,
        )
        self.publishes = Counter(
            "dict_rate_limit_pulsar_publishes",
            "Alert events acknowledged by the Pulsar broker.",
            registry=reg,
        )
        self.publish_failures = Counter(
            "dict_rate_limit_pulsar_publish_failures",
            "Failed attempts to publish an alert event (retried).",
            registry=reg,
        )
        self.set_aside = Counter(
            "dict_rate_limit_outbox_set_aside_events",
            "Alert events set aside because the broker refused them for good, by the broker's reason.",
            ["reason"],
            registry=reg,
        )
        for reason in SET_ASIDE_REASONS:
            self.set_aside.labels(reason)
        self.publish_duration = Histogram(
            "dict_rate_limit_pulsar_publish_duration_seconds",
            "Time from send to broker acknowledgement of one alert event.",
            buckets=DURATION_BUCKETS,
            registry=reg,
        )
        self._observe: Callable[[str, float], None]
        if observe is not None:
            self._observe = observe
        else:
            # Standalone: the seed histogram is ours. In the all-in-one process the exporter owns it (one
            # family per exposition), and ``observe`` records into it.
            duration = Histogram(
                "dict_rate_limit_monitoring_duration_seconds",
                "Time of the product's operations (webhook = one request, publish = one relay batch).",
                ["operation"],
                buckets=DURATION_BUCKETS,
                registry=reg,
            )
            for operation in ("webhook", "publish"):
                duration.labels(operation)

            def observe_own(operation: str, seconds: float) -> None:
                duration.labels(operation).observe(seconds)

            self._observe = observe_own
        build = Gauge(
            "dict_rate_limit_receiver_build_info",
            "Build information of the receiver (value 1).",
            ["version", "python_version"],
            registry=reg,
        )
        build.labels(__version__, platform.python_version()).set(1)
        reg.register(_BacklogCollector(self.backlog, clock))
        for status in WEBHOOK_STATUSES:
            self.webhook_requests.labels(status)
        for reason in INVALID_REASONS:
            self.invalid_payloads.labels(reason)

    def observe(self, operation: str, seconds: float) -> None:
        """Times one operation in dict_rate_limit_monitoring_duration_seconds (webhook, publish)."""
        self._observe(operation, seconds)

    def count_recorded(self, result: RecordResult) -> None:
        """Counts a committed notification (never before commit: a rollback changed nothing)."""
        for transition in result.transitions:
            counter = self.alerts_created if transition.kind == "created" else self.alerts_resolved
            counter.labels(
                self.labels.policy(transition.endpoint_id),
                transition.severity if transition.severity in SEVERITIES else OVERFLOW,
                self.labels.category(transition.psp_category),
            ).inc()
        if result.duplicates:
            self.duplicates.inc(result.duplicates)
