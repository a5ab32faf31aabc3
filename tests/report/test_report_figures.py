"""The JSON figures of the exact scenario (report_scenario.py) against a real PostgreSQL: every value is
the one computed by hand from the scenario's description."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.report.report_scenario import ANTISCAN, CLAIMS, WRITE

PERIOD = ("--since", "2026-01-01", "--until", "2026-04-01")
Report = dict[str, Any]


@pytest.fixture
def report(scenario_url: str, report_json: Callable[..., Report]) -> Report:
    return report_json(scenario_url, *PERIOD)


def policy(report: Report, name: str) -> dict[str, Any]:
    (found,) = [p for p in report["policies"] if p["endpoint_id"] == name]
    return found


def test_three_hours_below_critical_in_march_are_exactly_10800_seconds(report: Report) -> None:
    months = {m["month"]: m for m in policy(report, ANTISCAN)["months"]}
    assert months["2026-03"]["critical_seconds"] == 10800.0
    assert months["2026-03"]["zero_seconds"] == 1800.0  # the half hour at 0 tokens (DICT answering 429)
    assert months["2026-03"]["warning_seconds"] == 10800.0  # below CRITICAL is also below WARNING
    assert months["2026-01"]["warning_seconds"] == 3600.0
    assert months["2026-01"]["critical_seconds"] == 0.0


def test_the_snapshot_before_a_gap_counts_two_poll_intervals_not_the_whole_gap(report: Report) -> None:
    antiscan = policy(report, ANTISCAN)
    months = {m["month"]: m for m in antiscan["months"]}
    # 09:59:30 was at 5 %: the 2 h silence after it counts 60 s below CRITICAL, the rest in no state.
    assert months["2026-02"]["critical_seconds"] == 60.0
    assert antiscan["gaps"] == [
        {"start": "2026-02-03T09:59:30Z", "end": "2026-02-03T12:00:00Z", "uncounted_seconds": 7170.0}
    ]
    assert antiscan["gaps_uncounted_seconds"] == 7170.0
    assert antiscan["time_below"] == {
        "warning_seconds": 14460.0,
        "critical_seconds": 10860.0,
        "zero_seconds": 1800.0,
    }
    period_seconds = 90 * 86400
    assert antiscan["coverage"]["covered_seconds"] == period_seconds - 7200 + 30  # the gap minus 60 s + 30 s
    assert any("1 gap(s) in the history" in note for note in antiscan["notes"])
    (gap_day,) = [d for d in antiscan["days"] if d["day"] == "2026-02-03"]
    assert gap_day["covered_seconds"] == 86400 - 7170.0


def test_the_category_change_is_on_the_timeline_and_the_allowance_follows_it(report: Report) -> None:
    antiscan = policy(report, ANTISCAN)
    assert antiscan["category_changes"] == [
        {"at": "2026-02-15T00:00:00Z", "from_category": "A", "to_category": "B"}
    ]
    assert antiscan["category"] == "B"
    assert antiscan["categories_seen"] == ["A", "B"]
    days = {d["day"]: d for d in antiscan["days"]}
    assert days["2026-02-14"]["daily_allowance"] == 10 * 1440 + 1000
    assert days["2026-02-15"]["daily_allowance"] == 20 * 1440 + 2000
    assert antiscan["daily_allowance"] == 30800.0
    # Half full in both categories: 500 of 1000, then 1000 of 2000.
    assert days["2026-02-14"]["min_remaining_percent"] == 50.0
    assert days["2026-02-16"]["min_remaining_percent"] == 50.0
    assert days["2026-03-10"]["min_remaining_percent"] == 0.0


def test_monthly_consumption_peak_days_and_the_projection(report: Report) -> None:
    antiscan = policy(report, ANTISCAN)
    months = {m["month"]: m for m in antiscan["months"]}
    # Weekdays: 1080 busy snapshots (09-18 h) at twice the base + 1800 at the base = 3960 x base.
    assert (months["2026-01"]["peak_day"], months["2026-01"]["peak_day_consumed"]) == ("2026-01-01", 3960.0)
    assert (months["2026-02"]["peak_day"], months["2026-02"]["peak_day_consumed"]) == ("2026-02-02", 4356.0)
    assert (months["2026-03"]["peak_day"], months["2026-03"]["peak_day_consumed"]) == ("2026-03-02", 4791.6)
    # January: 22 weekdays x 3960 + 9 weekend days x 2880.
    assert months["2026-01"]["consumed_tokens"] == 22 * 3960 + 9 * 2880
    trend = antiscan["trend"]
    assert trend["months_used"] == ["2026-01", "2026-02", "2026-03"]
    assert trend["monthly_growth_percent"] == 10.0
    assert trend["allowance_used_percent"] == 15.56  # 4791.6 / 30800
    # ln(30800 / 4791.6) / ln(1.1) = 19.52 months after March 2026.
    assert trend["months_to_exceed"] == 19.5
    assert trend["projected_exceed_month"] == "2027-11"


def test_week_by_hour_grid_shows_the_busy_weekday_hours(report: Report) -> None:
    grid = policy(report, ANTISCAN)["week_hours"]
    assert len(grid) == 7
    assert all(len(row) == 24 for row in grid)
    # Monday 10 h: 120 snapshots at 2 x base; Mondays: 4 in January (1.0), 4 in February (1.1), 5 in March.
    assert grid[0][10] == round(240 * (4 * 1.0 + 4 * 1.1 + 5 * 1.21) / 13, 4)
    assert grid[0][3] == round(120 * (4 * 1.0 + 4 * 1.1 + 5 * 1.21) / 13, 4)
    assert grid[6][10] == grid[6][3]  # Sunday has no busy hours


def test_policies_that_appear_or_vanish_mid_period_say_so(report: Report) -> None:
    write, claims = policy(report, WRITE), policy(report, CLAIMS)
    assert write["coverage"]["first_sample"] == "2026-02-01T00:00:00Z"
    assert (write["coverage"]["appeared_mid_period"], write["coverage"]["vanished_mid_period"]) == (
        True,
        False,
    )
    assert write["notes"][0].startswith("First snapshot 2026-02-01T00:00:00Z: no history before it")
    assert [m["month"] for m in write["months"]] == ["2026-02", "2026-03"]
    assert claims["coverage"]["last_sample"] == "2026-01-15T23:59:30Z"
    assert (claims["coverage"]["appeared_mid_period"], claims["coverage"]["vanished_mid_period"]) == (
        False,
        True,
    )
    assert claims["time_below"]["warning_seconds"] == 7200.0
    # Half of January is not enough history for a trend: said, not guessed.
    assert claims["trend"]["monthly_growth_percent"] is None
    assert claims["trend"]["note"].startswith("No trend: fewer than 2 months")
    assert write["trend"]["monthly_growth_percent"] == 0.0
    assert write["trend"]["projected_exceed_month"] is None


def test_ranking_puts_the_bucket_that_went_critical_first_with_its_advice(report: Report) -> None:
    assert [(r["rank"], r["endpoint_id"], r["level"]) for r in report["ranking"]] == [
        (1, ANTISCAN, "high"),
        (2, CLAIMS, "medium"),
        (3, WRITE, "low"),
    ]
    assert report["ranking"][0]["advice"] == (
        f"Ask BCB to raise the category: the {ANTISCAN} bucket spent 3 h below 10 % in March 2026 "
        "(3 h 1 min in the period), 30 min of it empty (DICT answering 429), and its peak grows "
        "10.0 % a month."
    )
    assert report["ranking"][1]["advice"] == (
        "Watch CLAIMS_READ: it spent 2 h below WARNING (20 %) but never below CRITICAL "
        "(the history covers only 17 % of the period)."
    )
    assert policy(report, ANTISCAN)["risk"] == {
        "rank": 1,
        "level": "high",
        "advice": report["ranking"][0]["advice"],
    }


def test_alerts_of_the_period_come_from_the_audit_table(report: Report) -> None:
    assert policy(report, ANTISCAN)["alerts"] == [
        {
            "alert_name": "DICTRateLimitCritical",
            "severity": "critical",
            "status": "resolved",
            "starts_at": "2026-03-10T12:00:30Z",
            "ended_at": "2026-03-10T15:01:00Z",
            "summary": f"DICTRateLimitCritical on {ANTISCAN}",
        }
    ]  # the December 2025 warning is outside the period
    assert [a["alert_name"] for a in report["health_alerts"]] == ["DICTRateLimitExporterDown"]


def test_a_shorter_period_counts_only_its_own_rows(
    scenario_url: str, report_json: Callable[..., Report]
) -> None:
    march_10 = report_json(scenario_url, "--since", "2026-03-10T13:00:00Z", "--until", "2026-03-10T14:00:00")
    antiscan = policy(march_10, ANTISCAN)
    assert antiscan["time_below"]["critical_seconds"] == 3600.0
    assert antiscan["time_below"]["zero_seconds"] == 0.0
    assert antiscan["coverage"]["samples"] == 120
    # CLAIMS_READ vanished in January: not part of a March report at all.
    assert [p["endpoint_id"] for p in march_10["policies"]] == [ANTISCAN, WRITE]
