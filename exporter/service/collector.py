"""The bucket series: a custom collector over the latest derived snapshot, rendered once per snapshot.

Sample of what :class:`BucketCollector` exports for one policy (values cached from the last poll)::

    dict_rate_limit_available_tokens{endpoint_id="ENTRIES_WRITE",psp_category="A"} 35000.0
    dict_rate_limit_capacity{endpoint_id="ENTRIES_WRITE",psp_category="A"} 36000.0
    dict_rate_limit_consumed_tokens_total{endpoint_id="ENTRIES_WRITE",psp_category="A"} 1600.0
    dict_rate_limit_dict_responses_total{endpoint_id="ENTRIES_WRITE",psp_category="A",code="429"} 12.0
    dict_rate_limit_psp_category_info{psp_category="A"} 1.0
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from exporter.config import PolicyThreshold
from exporter.service.derivation import DEFAULT_ERROR_404_WINDOW_SECONDS, DerivedSnapshot, PolicyState

LABELS = ("endpoint_id", "psp_category")
RESPONSE_LABELS = (*LABELS, "code")
CACHED = " Cached from the last successful poll of the Bridge."
Family = GaugeMetricFamily | CounterMetricFamily
ThresholdLookup = Callable[[str], PolicyThreshold]


@dataclass(frozen=True, slots=True)
class _Series:
    """One per-policy bucket family: its name, HELP, and how to read its value (None = no sample)."""

    name: str
    help: str
    value: Callable[[PolicyState, PolicyThreshold], float | None]
    counter: bool = False
    #: False for configuration values, which are not read from the Bridge.
    cached: bool = True


SERIES: tuple[_Series, ...] = (
    _Series(
        "dict_rate_limit_available_tokens",
        "DICT AvailableTokens of the bucket; may be negative (a 404 lookup costs 3 tokens).",
        lambda s, _t: s.reading.available_tokens,
    ),
    _Series("dict_rate_limit_capacity", "DICT Capacity of the bucket.", lambda s, _t: s.reading.capacity),
    _Series(
        "dict_rate_limit_utilization_percent",
        "100 * (1 - available / capacity); above 100 when the balance is negative.",
        lambda s, _t: s.utilization_percent,
    ),
    _Series(
        "dict_rate_limit_remaining_ratio",
        "available / capacity (negative when the balance is); what the thresholds compare against.",
        lambda s, _t: s.remaining_ratio,
    ),
    _Series(
        "dict_rate_limit_refill_tokens",
        "DICT RefillTokens of the bucket.",
        lambda s, _t: s.reading.refill_tokens,
    ),
    _Series(
        "dict_rate_limit_refill_period_seconds",
        "DICT RefillPeriodSec of the bucket.",
        lambda s, _t: s.reading.refill_period_sec,
    ),
    _Series(
        "dict_rate_limit_refill_rate_tokens_per_second",
        "RefillTokens / RefillPeriodSec: tokens the bucket regains per second.",
        lambda s, _t: s.reading.refill_rate_per_second,
    ),
    _Series(
        "dict_rate_limit_consumed_tokens",
        "Gross tokens consumed since the exporter started, derived from balances: a lower bound away from "
        "capacity (tokens given back after a payment order, and refill discarded by a full bucket, are not "
        "seen); never decreases; an interval in which capacity or refill changed adds nothing; use rate().",
        lambda s, _t: s.consumed_tokens_total,
        counter=True,
    ),
    _Series(
        "dict_rate_limit_consumption_rate_per_minute",
        "Gross tokens consumed per minute over about one refill period of snapshots (by DICT ResponseTime, "
        "a lower bound); absent until two snapshots exist and right after a capacity or refill change.",
        lambda s, _t: s.consumption_rate_per_minute,
    ),
    _Series(
        "dict_rate_limit_recovery_eta_seconds",
        "Seconds until the bucket is full at the refill rate if nothing is consumed; 0 when full, "
        "+Inf when RefillTokens is 0.",
        lambda s, _t: s.recovery_eta_seconds,
    ),
    _Series(
        "dict_rate_limit_exhaustion_projection_seconds",
        "Seconds until the balance reaches 0 at the current gross consumption rate; 0 when already <= 0; "
        "no sample when the bucket is not draining (never exhausts) or right after a capacity or refill "
        "change (nothing measured yet).",
        lambda s, _t: s.exhaustion_projection_seconds,
    ),
    _Series(
        "dict_rate_limit_error_404_rate",
        "Share (0..1) of 404 among DICT's answers to this policy's requests over the last {window} s "
        "(ERROR_404_WINDOW_SECONDS; less until that much was counted), from the Bridge's answer counts "
        "(Bridge restarts handled as counter resets); absent when the Bridge sends no counts or counted "
        "no answer in the window.",
        lambda s, _t: s.error_404_share,
    ),
    _Series(
        "dict_rate_limit_warning_remaining_ratio",
        "WARNING threshold of this policy from configuration: alert when remaining_ratio is at or below it; "
        "listed for the policies of the snapshot being served.",
        lambda _s, t: t.warning,
        cached=False,
    ),
    _Series(
        "dict_rate_limit_critical_remaining_ratio",
        "CRITICAL threshold of this policy from configuration: alert when remaining_ratio is at or below it; "
        "listed for the policies of the snapshot being served.",
        lambda _s, t: t.critical,
        cached=False,
    ),
)


class BucketCollector(Collector):
    """Every bucket and participant series of one derived snapshot (nothing at all for ``None``)."""

    def __init__(
        self,
        derived: DerivedSnapshot | None,
        thresholds: ThresholdLookup,
        error_404_window: float = DEFAULT_ERROR_404_WINDOW_SECONDS,
    ) -> None:
        self._derived = derived
        self._thresholds = thresholds
        self._window = error_404_window

    def describe(self) -> Iterator[Family]:
        for spec in SERIES:
            yield _family(spec, self._window)
        yield _responses(None)
        yield from self._participant(None)

    def collect(self) -> Iterator[Family]:
        derived = self._derived
        if derived is None:
            return
        category = derived.snapshot.category
        thresholds = [self._thresholds(state.reading.name) for state in derived.states]
        for spec in SERIES:
            family = _family(spec, self._window)
            for state, threshold in zip(derived.states, thresholds, strict=True):
                value = spec.value(state, threshold)
                if value is not None:
                    family.add_metric([state.reading.name, category], float(value))
            yield family
        yield _responses(derived)
        yield from self._participant(derived)

    @staticmethod
    def _participant(derived: DerivedSnapshot | None) -> Iterator[Family]:
        info = GaugeMetricFamily(
            "dict_rate_limit_psp_category_info",
            "The PSP category DICT reported in the last snapshot (value 1)." + CACHED,
            labels=["psp_category"],
        )
        response_time = GaugeMetricFamily(
            "dict_rate_limit_snapshot_response_time_seconds",
            "DICT ResponseTime (Unix seconds) of the snapshot being served." + CACHED,
        )
        if derived is not None:
            info.add_metric([derived.snapshot.category], 1)
            response_time.add_metric([], derived.snapshot.response_time.timestamp())
        missing = GaugeMetricFamily(
            "dict_rate_limit_policy_missing",
            "1 for a policy an earlier successful poll returned (or history remembers) that the last "
            "successful poll did not; 0 for the policies it did return." + CACHED,
            labels=list(LABELS),
        )
        if derived is not None:
            category = derived.snapshot.category
            for state in derived.states:
                missing.add_metric([state.reading.name, category], 0)
            for name in derived.missing:
                missing.add_metric([name, category], 1)
        yield info
        yield response_time
        yield missing


def _responses(derived: DerivedSnapshot | None) -> CounterMetricFamily:
    """The Bridge's cumulative answer counts, passed through as they come.

    Passed through, not accumulated here: every replica (and an exporter restarted) exports the same value
    the Bridge holds, and a Bridge restart is an ordinary counter reset that rate() and increase() handle.
    """
    family = CounterMetricFamily(
        "dict_rate_limit_dict_responses",
        "DICT's answers to this policy's requests the Bridge relayed, by HTTP status (code), cumulative "
        "since the Bridge started: a Bridge restart resets it (use rate()/increase()); only for policies "
        "whose Bridge counts them." + CACHED,
        labels=list(RESPONSE_LABELS),
    )
    if derived is None:
        return family
    category = derived.snapshot.category
    for state in derived.states:
        for code, count in state.reading.response_counts or ():
            family.add_metric([state.reading.name, category, str(code)], float(count))
    return family


def _family(spec: _Series, window: float = DEFAULT_ERROR_404_WINDOW_SECONDS) -> Family:
    text = spec.help.format(window=f"{window:g}") if "{window}" in spec.help else spec.help
    help_text = text + CACHED if spec.cached else text
    if spec.counter:
        return CounterMetricFamily(spec.name, help_text, labels=LABELS)
    return GaugeMetricFamily(spec.name, help_text, labels=LABELS)


def render_buckets(
    derived: DerivedSnapshot | None,
    thresholds: ThresholdLookup,
    error_404_window: float = DEFAULT_ERROR_404_WINDOW_SECONDS,
) -> bytes:
    """The text exposition of one snapshot's bucket series (empty for ``None``)."""
    if derived is None:
        return b""
    registry = CollectorRegistry()
    registry.register(BucketCollector(derived, thresholds, error_404_window))
    return generate_latest(registry)


class RenderedBuckets:
    """The bucket part of /metrics for one snapshot: text rendered once, gzip state prepared on first use.

    The gzip variant is one gzip member for the whole body: the bucket part is compressed once and flushed
    to a byte boundary, and each scrape continues a copy of that compressor with its small health part.
    """

    def __init__(
        self,
        derived: DerivedSnapshot | None,
        thresholds: ThresholdLookup,
        error_404_window: float = DEFAULT_ERROR_404_WINDOW_SECONDS,
    ) -> None:
        self.derived = derived
        self.text = render_buckets(derived, thresholds, error_404_window)
        self._gzip_prefix: bytes | None = None
        self._compressor: zlib._Compress | None = None
        # The last body of each variant by its tail: between polls the tail rarely changes, and reusing
        # the joined bytes spares a copy of a large exposition (and a compression) on most scrapes.
        self._last: dict[bool, tuple[bytes, bytes]] = {}

    def body(self, tail: bytes, *, gzip: bool) -> bytes:
        """The whole exposition: these buckets followed by ``tail`` (the per-scrape health part)."""
        last = self._last.get(gzip)
        if last is not None and last[0] == tail:
            return last[1]
        body = self._gzip_body(tail) if gzip else self.text + tail
        self._last[gzip] = (tail, body)
        return body

    def _gzip_body(self, tail: bytes) -> bytes:
        if self._compressor is None:
            compressor = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: gzip header and trailer
            prefix = compressor.compress(self.text) + compressor.flush(zlib.Z_SYNC_FLUSH)
            self._gzip_prefix, self._compressor = prefix, compressor
        assert self._gzip_prefix is not None
        scrape = self._compressor.copy()
        return self._gzip_prefix + scrape.compress(tail) + scrape.flush()
