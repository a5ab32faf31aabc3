"""Metrics hygiene shared by every process: no undocumented ``_created`` series, the standard process
metrics, and one set of buckets for the seed histogram."""

from __future__ import annotations

import re

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter.receiver.metrics import ReceiverMetrics
from exporter.service.selfmetrics import SelfMetrics


def _buckets(text: str, family: str) -> list[str]:
    for metric in text_string_to_metric_families(text):
        if metric.name == family:
            return sorted({s.labels["le"] for s in metric.samples if s.name.endswith("_bucket")}, key=float)
    raise AssertionError(f"{family} not exported")


def _exporter_text() -> str:
    metrics = SelfMetrics(30.0)
    metrics.record_poll(success=True, seconds=0.02, wall_time=1.0, category_changed=False)
    metrics.observe("history_write", 0.003)
    return metrics.render(stale=False).decode()


def _receiver_text() -> str:
    metrics = ReceiverMetrics()
    metrics.observe("webhook", 0.004)
    return generate_latest(metrics.registry).decode()


def _created_samples(text: str) -> list[str]:
    return [line for line in text.splitlines() if re.match(r"^[a-z_]+_created[{ ]", line)]


def test_no_created_series_anywhere() -> None:
    # The seed counter dict_rate_limit_alerts_created_total would get ..._alerts_created_created.
    for text in (_exporter_text(), _receiver_text()):
        assert _created_samples(text) == []
        assert "dict_rate_limit_alerts_created_total" in _receiver_text()


def test_process_metrics_are_exported_by_both_processes() -> None:
    for text in (_exporter_text(), _receiver_text()):
        assert "# TYPE process_cpu_seconds_total counter" in text
        assert "process_resident_memory_bytes" in text
        assert "process_open_fds" in text


def test_the_seed_histogram_has_the_same_buckets_in_every_process() -> None:
    family = "dict_rate_limit_monitoring_duration_seconds"
    exporter, receiver = _buckets(_exporter_text(), family), _buckets(_receiver_text(), family)
    assert exporter == receiver
    assert exporter[0] == "0.0005"
    assert exporter[-1] == "+Inf"
