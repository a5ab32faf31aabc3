"""The report's figures: dataclasses built from the SQL aggregates, the same for the HTML and the JSON.

Seconds are rounded to the millisecond and percentages and tokens to 4 decimals, so the JSON holds the
values a reader (or a test) computes by hand, not float noise such as 5.000000000000001.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from exporter.report.queries import Aggregates, Period, Rows

SCHEMA_VERSION = 1


@dataclass(slots=True)
class Day:
    day: str
    min_remaining_percent: float
    consumed_tokens: float | None
    peak_rate_per_minute: float | None
    daily_allowance: float
    covered_seconds: float
    warning_seconds: float
    critical_seconds: float
    zero_seconds: float


@dataclass(slots=True)
class Month:
    month: str
    consumed_tokens: float | None
    peak_day: str | None
    peak_day_consumed: float | None
    covered_seconds: float
    coverage_percent: float
    warning_seconds: float
    critical_seconds: float
    zero_seconds: float


@dataclass(slots=True)
class CategoryChange:
    at: str
    from_category: str
    to_category: str


@dataclass(slots=True)
class Gap:
    """No snapshot between ``start`` and ``end``; ``uncounted_seconds`` of it count in no state."""

    start: str
    end: str
    uncounted_seconds: float


@dataclass(slots=True)
class Alert:
    alert_name: str
    severity: str
    status: str
    starts_at: str
    ended_at: str | None
    summary: str | None


@dataclass(slots=True)
class Coverage:
    samples: int
    first_sample: str | None
    last_sample: str | None
    covered_seconds: float
    period_seconds: float
    coverage_percent: float
    appeared_mid_period: bool
    vanished_mid_period: bool


@dataclass(slots=True)
class TimeBelow:
    warning_seconds: float
    critical_seconds: float
    zero_seconds: float


@dataclass(slots=True)
class Trend:
    months_used: list[str]
    monthly_growth_percent: float | None
    last_peak_day_consumed: float | None
    daily_allowance: float | None
    allowance_used_percent: float | None
    months_to_exceed: float | None
    projected_exceed_month: str | None
    note: str


@dataclass(slots=True)
class Risk:
    rank: int
    level: str
    advice: str


@dataclass(slots=True)
class PolicyReport:
    endpoint_id: str
    category: str | None
    categories_seen: list[str]
    capacity: int | None
    refill_tokens: int | None
    refill_period_sec: int | None
    daily_allowance: float | None
    warning_percent: float
    critical_percent: float
    coverage: Coverage
    time_below: TimeBelow
    days: list[Day]
    months: list[Month]
    #: 7 rows (Monday first) of 24 hours: mean tokens consumed in that hour of the week; None = no data.
    week_hours: list[list[float | None]]
    category_changes: list[CategoryChange]
    gaps: list[Gap]
    gaps_uncounted_seconds: float
    alerts: list[Alert]
    trend: Trend
    risk: Risk
    notes: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Ranked:
    rank: int
    endpoint_id: str
    level: str
    advice: str


@dataclass(slots=True)
class Report:
    schema_version: int
    generated_at: str
    since: str
    until: str
    participant: str | None
    poll_interval_seconds: float
    max_sample_seconds: float
    policies: list[PolicyReport]
    ranking: list[Ranked]
    health_alerts: list[Alert]
    notes: list[str]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, ensure_ascii=False) + "\n"


def iso(value: datetime | date | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return value.isoformat()


def r4(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)


def secs(value: float | None) -> float:
    return round(float(value or 0.0), 3)


def _by_endpoint(rows: Rows) -> dict[str, Rows]:
    grouped: dict[str, Rows] = defaultdict(list)
    for row in rows:
        grouped[row["endpoint_id"]].append(row)
    return grouped


def month_seconds(month: date) -> float:
    following = date(month.year + month.month // 12, month.month % 12 + 1, 1)
    return (following - month).total_seconds()


def _day(row: dict[str, Any]) -> Day:
    return Day(
        day=row["day"].isoformat(),
        min_remaining_percent=round(float(row["min_remaining_percent"]), 4),
        consumed_tokens=r4(row["consumed_tokens"]),
        peak_rate_per_minute=r4(row["peak_rate_per_minute"]),
        daily_allowance=round(float(row["daily_allowance"]), 4),
        covered_seconds=secs(row["covered_s"]),
        warning_seconds=secs(row["warning_s"]),
        critical_seconds=secs(row["critical_s"]),
        zero_seconds=secs(row["zero_s"]),
    )


def _month(row: dict[str, Any], period: Period) -> Month:
    start = datetime(row["month"].year, row["month"].month, 1, tzinfo=UTC)
    end = start + timedelta(seconds=month_seconds(row["month"]))
    in_period = (min(end, period.until) - max(start, period.since)).total_seconds()
    return Month(
        month=row["month"].strftime("%Y-%m"),
        consumed_tokens=r4(row["consumed_tokens"]),
        peak_day=iso(row["peak_day"]),
        peak_day_consumed=r4(row["peak_day_consumed"]),
        covered_seconds=secs(row["covered_s"]),
        coverage_percent=round(100 * float(row["covered_s"]) / in_period, 2) if in_period > 0 else 0.0,
        warning_seconds=secs(row["warning_s"]),
        critical_seconds=secs(row["critical_s"]),
        zero_seconds=secs(row["zero_s"]),
    )


def _week_hours(rows: Rows) -> list[list[float | None]]:
    grid: list[list[float | None]] = [[None] * 24 for _ in range(7)]
    for row in rows:
        grid[row["weekday"]][row["hour_of_day"]] = r4(row["mean_consumed"])
    return grid


def _coverage(summary: dict[str, Any] | None, period: Period) -> Coverage:
    period_seconds = (period.until - period.since).total_seconds()
    if summary is None:
        return Coverage(0, None, None, 0.0, period_seconds, 0.0, False, False)
    slack = timedelta(seconds=period.max_sample_seconds)
    return Coverage(
        samples=int(summary["samples"]),
        first_sample=iso(summary["first_sample"]),
        last_sample=iso(summary["last_sample"]),
        covered_seconds=secs(summary["covered_s"]),
        period_seconds=period_seconds,
        coverage_percent=round(100 * float(summary["covered_s"]) / period_seconds, 2),
        appeared_mid_period=summary["first_sample"] > period.since + slack,
        vanished_mid_period=summary["last_sample"] < period.until - slack,
    )


def _categories(now: dict[str, Any] | None, changes: Rows) -> list[str]:
    seen = {now["psp_category"]} if now else set()
    return sorted(seen | {c["from_category"] for c in changes} | {c["to_category"] for c in changes})


def _alert(row: dict[str, Any]) -> Alert:
    return Alert(
        alert_name=row["alert_name"],
        severity=row["severity"],
        status=row["status"],
        starts_at=iso(row["starts_at"]) or "",
        ended_at=iso(row["ended_at"]),
        summary=row["summary"],
    )


def build(aggregates: Aggregates, period: Period, generated_at: datetime) -> Report:
    """The whole report: per-policy figures, then trend, risk and ranking (exporter.report.analysis)."""
    from exporter.report import analysis

    summary = {row["endpoint_id"]: row for row in aggregates.summary}
    current = {row["endpoint_id"]: row for row in aggregates.current}
    days, months = _by_endpoint(aggregates.days), _by_endpoint(aggregates.months)
    week, changes, gaps = (
        _by_endpoint(aggregates.week_hours),
        _by_endpoint(aggregates.changes),
        _by_endpoint(aggregates.gaps),
    )
    alerts = _by_endpoint([a for a in aggregates.alerts if a["endpoint_id"] is not None])
    cap = period.max_sample_seconds
    policies = []
    for policy in aggregates.policies:
        name = policy["endpoint_id"]
        now = current.get(name)
        policy_gaps = [
            Gap(
                iso(g["start"]) or "",
                iso(g["end"]) or "",
                secs((g["end"] - g["start"]).total_seconds() - cap),
            )
            for g in gaps.get(name, [])
        ]
        report = PolicyReport(
            endpoint_id=name,
            category=None if now is None else now["psp_category"],
            categories_seen=_categories(now, changes.get(name, [])),
            capacity=None if now is None else int(now["capacity"]),
            refill_tokens=None if now is None else int(now["refill_tokens"]),
            refill_period_sec=None if now is None else int(now["refill_period_sec"]),
            daily_allowance=None if now is None else analysis.daily_allowance(now),
            warning_percent=20.0 if now is None else float(now["warning_percent"]),
            critical_percent=10.0 if now is None else float(now["critical_percent"]),
            coverage=_coverage(summary.get(name), period),
            time_below=TimeBelow(
                secs(summary[name]["warning_s"]) if name in summary else 0.0,
                secs(summary[name]["critical_s"]) if name in summary else 0.0,
                secs(summary[name]["zero_s"]) if name in summary else 0.0,
            ),
            days=[_day(d) for d in days.get(name, [])],
            months=[_month(m, period) for m in months.get(name, [])],
            week_hours=_week_hours(week.get(name, [])),
            category_changes=[
                CategoryChange(iso(c["at"]) or "", c["from_category"], c["to_category"])
                for c in changes.get(name, [])
            ],
            gaps=policy_gaps,
            gaps_uncounted_seconds=secs(sum(g.uncounted_seconds for g in policy_gaps)),
            alerts=[_alert(a) for a in alerts.get(name, [])],
            trend=Trend([], None, None, None, None, None, None, ""),
            risk=Risk(0, "unknown", ""),
        )
        report.trend = analysis.trend(report)
        report.notes = analysis.notes(report, period)
        policies.append(report)
    ranking = analysis.rank(policies)
    notes = []
    if not any(p.coverage.samples for p in policies):
        notes.append(
            f"No bucket history between {iso(period.since)} and {iso(period.until)} in this database"
            + (f" for participant {period.participant}" if period.participant else "")
            + ": check the period, and that the exporter runs with DATABASE_URL (it writes the history)."
        )
    return Report(
        schema_version=SCHEMA_VERSION,
        generated_at=iso(generated_at) or "",
        since=iso(period.since) or "",
        until=iso(period.until) or "",
        participant=period.participant,
        poll_interval_seconds=period.poll_interval_seconds,
        max_sample_seconds=cap,
        policies=policies,
        ranking=ranking,
        health_alerts=[_alert(a) for a in aggregates.alerts if a["endpoint_id"] is None],
        notes=notes,
    )
