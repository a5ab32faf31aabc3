"""What every process's own metrics share: the seed histogram's buckets, no ``_created`` series, and the
standard ``process_*`` metrics (docs/metrics.md)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, ProcessCollector, disable_created_metrics

#: Buckets of ``dict_rate_limit_monitoring_duration_seconds`` (the seed histogram) and of the products' other
#: duration histograms: from a loopback acknowledgement (~0.5 ms) to a Bridge or broker timeout (seconds).
#: One tuple, so a histogram has the same buckets in every process (exporter, receiver, all-in-one) and
#: ``histogram_quantile`` over their sum stays meaningful.
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


def new_registry(*, process: bool) -> CollectorRegistry:
    """A private registry; with ``process`` also ``process_*`` (CPU, memory, file descriptors, start time).

    client_python adds a ``_created`` series to every counter and histogram; nothing here uses them, and an
    undocumented series per metric is noise (the receiver had 18 after one alert), so they are turned off
    for the whole process (a switch of the library, idempotent)."""
    disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in client_python
    registry = CollectorRegistry(auto_describe=True)
    if process:
        ProcessCollector(registry=registry)
    return registry
