"""The bucket collector: exact samples per policy, a golden exposition, withdrawal, and cached gzip bodies."""

from __future__ import annotations

import gzip
import os
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from exporter.config import ExporterSettings, PolicyThreshold
from exporter.service.collector import BucketCollector, RenderedBuckets, render_buckets
from exporter.service.derivation import DerivedSnapshot, derive
from exporter.service.selfmetrics import SelfMetrics
from exporter.snapshot import PolicyReading, Snapshot
from tests.support.env import require_binary

GOLDEN = Path(__file__).parent / "golden" / "buckets.prom"
T0 = datetime(2026, 1, 5, 12, 0, 0, tzinfo=UTC)
SETTINGS = ExporterSettings(policy_thresholds={"KEYS_CHECK": PolicyThreshold(0.5, 0.25)})


def fixed_snapshot() -> DerivedSnapshot:
    """Two polls 30 s apart of three policies: draining, negative (with answer counts), and steady.

    The antiscan counts grow by 90 answered 200, 8 answered 404 and 2 answered 429: a 404 share of
    8 / 100 over the interval."""
    first = Snapshot(
        T0,
        "0" * 32,
        "A",
        (
            PolicyReading("ENTRIES_WRITE", 30_000, 36_000, 1200, 60),
            PolicyReading(
                "ENTRIES_READ_PARTICIPANT_ANTISCAN",
                10,
                50_000,
                25_000,
                60,
                ((200, 1000), (404, 50), (429, 0)),
            ),
            PolicyReading("KEYS_CHECK", 70, 70, 70, 60),
        ),
    )
    second = Snapshot(
        T0 + timedelta(seconds=30),
        "0123456789abcdef0123456789abcdef",
        "A",
        (
            PolicyReading("ENTRIES_WRITE", 29_000, 36_000, 1200, 60),
            PolicyReading(
                "ENTRIES_READ_PARTICIPANT_ANTISCAN",
                -20,
                50_000,
                25_000,
                60,
                ((200, 1090), (404, 58), (429, 2)),
            ),
            PolicyReading("KEYS_CHECK", 70, 70, 70, 60),
        ),
    )
    return derive(second, derive(first, None))


def registry_of(derived: DerivedSnapshot | None) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(BucketCollector(derived, SETTINGS.threshold_for))
    return registry


def test_every_bucket_series_has_the_exact_value_of_the_snapshot() -> None:
    r = registry_of(fixed_snapshot())
    write = {"endpoint_id": "ENTRIES_WRITE", "psp_category": "A"}
    assert r.get_sample_value("dict_rate_limit_available_tokens", write) == 29_000
    assert r.get_sample_value("dict_rate_limit_capacity", write) == 36_000
    assert r.get_sample_value("dict_rate_limit_remaining_ratio", write) == 29_000 / 36_000
    assert r.get_sample_value("dict_rate_limit_refill_tokens", write) == 1200
    assert r.get_sample_value("dict_rate_limit_refill_period_seconds", write) == 60
    assert r.get_sample_value("dict_rate_limit_refill_rate_tokens_per_second", write) == 20
    assert r.get_sample_value("dict_rate_limit_consumed_tokens_total", write) == 1600
    assert r.get_sample_value("dict_rate_limit_consumption_rate_per_minute", write) == 3200
    assert r.get_sample_value("dict_rate_limit_recovery_eta_seconds", write) == 350
    assert r.get_sample_value("dict_rate_limit_warning_remaining_ratio", write) == 0.2
    assert r.get_sample_value("dict_rate_limit_critical_remaining_ratio", write) == 0.1
    assert r.get_sample_value("dict_rate_limit_psp_category_info", {"psp_category": "A"}) == 1
    assert r.get_sample_value("dict_rate_limit_snapshot_response_time_seconds") == T0.timestamp() + 30


def test_negative_balance_is_exported_negative_with_zero_projection() -> None:
    r = registry_of(fixed_snapshot())
    antiscan = {"endpoint_id": "ENTRIES_READ_PARTICIPANT_ANTISCAN", "psp_category": "A"}
    assert r.get_sample_value("dict_rate_limit_available_tokens", antiscan) == -20
    assert r.get_sample_value("dict_rate_limit_utilization_percent", antiscan) == pytest.approx(100.04)
    assert r.get_sample_value("dict_rate_limit_exhaustion_projection_seconds", antiscan) == 0
    assert r.get_sample_value("dict_rate_limit_error_404_rate", antiscan) == 0.08


def test_answer_counts_are_passed_through_as_counters_with_the_code_as_a_string() -> None:
    r = registry_of(fixed_snapshot())
    for code, count in (("200", 1090), ("404", 58), ("429", 2)):
        labels = {"endpoint_id": "ENTRIES_READ_PARTICIPANT_ANTISCAN", "psp_category": "A", "code": code}
        assert r.get_sample_value("dict_rate_limit_dict_responses_total", labels) == count
    # A policy whose Bridge sends no counts has no counter series at all (not zeros).
    text = render_buckets(fixed_snapshot(), SETTINGS.threshold_for).decode()
    counted = [line for line in text.splitlines() if line.startswith("dict_rate_limit_dict_responses_total{")]
    assert len(counted) == 3
    assert all("ANTISCAN" in line for line in counted)


def test_the_help_of_the_404_share_states_its_window() -> None:
    text = render_buckets(fixed_snapshot(), SETTINGS.threshold_for, 900.0).decode()
    (help_line,) = [
        line for line in text.splitlines() if line.startswith("# HELP dict_rate_limit_error_404_rate")
    ]
    assert "over the last 900 s" in help_line


def test_absent_values_are_absent_not_zero() -> None:
    r = registry_of(fixed_snapshot())
    keys = {"endpoint_id": "KEYS_CHECK", "psp_category": "A"}
    # A full bucket that is not draining never exhausts, and its Bridge reports no 404 share.
    assert r.get_sample_value("dict_rate_limit_exhaustion_projection_seconds", keys) is None
    assert r.get_sample_value("dict_rate_limit_error_404_rate", keys) is None
    assert r.get_sample_value("dict_rate_limit_warning_remaining_ratio", keys) == 0.5
    assert r.get_sample_value("dict_rate_limit_critical_remaining_ratio", keys) == 0.25
    first = registry_of(derive(fixed_snapshot().snapshot, None))
    write = {"endpoint_id": "ENTRIES_WRITE", "psp_category": "A"}
    assert first.get_sample_value("dict_rate_limit_consumption_rate_per_minute", write) is None
    assert first.get_sample_value("dict_rate_limit_consumed_tokens_total", write) == 0


def test_policy_that_disappears_disappears_from_the_exposition() -> None:
    derived = fixed_snapshot()
    later = Snapshot(
        derived.snapshot.response_time + timedelta(seconds=30),
        "f" * 32,
        "A",
        derived.snapshot.policies[:1],
    )
    text = render_buckets(derive(later, derived), SETTINGS.threshold_for).decode()
    assert 'endpoint_id="ENTRIES_WRITE"' in text
    assert "KEYS_CHECK" not in text
    assert "ANTISCAN" not in text


def test_no_snapshot_renders_nothing() -> None:
    assert render_buckets(None, SETTINGS.threshold_for) == b""
    assert list(registry_of(None).collect()) == []


def test_golden_exposition_of_a_fixed_snapshot() -> None:
    text = render_buckets(fixed_snapshot(), SETTINGS.threshold_for).decode()
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(text, encoding="utf-8")
    assert text == GOLDEN.read_text(encoding="utf-8")
    assert "# TYPE dict_rate_limit_consumed_tokens_total counter" in text
    assert all(
        line.startswith("#") or len(line.split(" ")) == 2 for line in text.splitlines()
    )  # no timestamps


def test_gzip_body_is_one_valid_member_equal_to_the_text_body() -> None:
    rendered = RenderedBuckets(fixed_snapshot(), SETTINGS.threshold_for)
    for tail in (b"# tail one\n", b"# tail two, longer\n" * 50):
        plain = rendered.body(tail, gzip=False)
        assert plain == rendered.text + tail
        assert gzip.decompress(rendered.body(tail, gzip=True)) == plain


def test_promtool_accepts_buckets_and_health_together() -> None:
    promtool = require_binary("promtool")
    health = SelfMetrics(30.0)
    health.record_poll(success=True, seconds=0.01, wall_time=1.0, category_changed=True)
    body = RenderedBuckets(fixed_snapshot(), SETTINGS.threshold_for).body(
        health.render(stale=False), gzip=False
    )
    result = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, timeout=30, check=False
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")


def test_gzip_is_served_only_when_accepted() -> None:
    from exporter.service.http import accepts_gzip

    assert accepts_gzip("gzip") is True
    assert accepts_gzip("deflate, gzip;q=0.5") is True
    assert accepts_gzip("gzip;q=0") is False
    assert accepts_gzip("identity") is False
    assert accepts_gzip("") is False
