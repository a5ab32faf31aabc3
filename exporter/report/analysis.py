"""What the figures mean: the monthly trend and its projection, the notes on missing data, the risk ranking
and its one sentence of advice per policy. Pure functions of the figures (a few rows per policy)."""

from __future__ import annotations

import math
from datetime import date
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from exporter.report.figures import PolicyReport, Ranked, Trend
    from exporter.report.queries import Period

#: A month takes part in the trend when the history covers at least this share of it (within the period).
TREND_MIN_COVERAGE_PERCENT = 50.0
#: The projection's horizon: beyond it the policy is "not at this trend".
HORIZON_MONTHS = 36
LEVELS = ("high", "medium", "low", "unknown")


def daily_allowance(bucket: dict[str, Any]) -> float:
    """Tokens a bucket can give in one day: a full bucket plus a day of refill."""
    return round(
        float(bucket["refill_tokens"]) * 86400 / float(bucket["refill_period_sec"])
        + float(bucket["capacity"]),
        4,
    )


def _add_months(month: str, count: int) -> str:
    year, mon = (int(part) for part in month.split("-"))
    index = year * 12 + mon - 1 + count
    return f"{index // 12:04d}-{index % 12 + 1:02d}"


def trend(policy: PolicyReport) -> Trend:
    """Growth of the peak day per month (least squares on its logarithm) and when it meets the allowance."""
    from exporter.report.figures import Trend

    used = [
        m
        for m in policy.months
        if m.coverage_percent >= TREND_MIN_COVERAGE_PERCENT
        and m.peak_day_consumed
        and m.peak_day_consumed > 0
    ]
    allowance = policy.daily_allowance
    last_peak = used[-1].peak_day_consumed if used else None
    used_percent = round(100 * last_peak / allowance, 2) if last_peak and allowance else None
    empty = Trend([m.month for m in used], None, last_peak, allowance, used_percent, None, None, "")
    if len(used) < 2:
        empty.note = (
            f"No trend: fewer than 2 months with consumption and at least {TREND_MIN_COVERAGE_PERCENT:.0f} % "
            "history coverage in the period."
        )
        return empty
    xs = [_month_index(m.month) for m in used]
    ys = [math.log(m.peak_day_consumed or 1.0) for m in used]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mean_x) ** 2 for x in xs
    )
    growth = math.exp(slope) - 1
    result = Trend(
        [m.month for m in used], round(100 * growth, 2), last_peak, allowance, used_percent, None, None, ""
    )
    assert last_peak is not None
    if allowance is None:
        result.note = "No projection: the bucket's allowance is unknown."
    elif last_peak >= allowance:
        result.months_to_exceed, result.projected_exceed_month = 0.0, used[-1].month
        result.note = "The peak day already uses the whole daily allowance."
    elif growth <= 0:
        result.note = "The peak day is not growing: the allowance is not reached at this trend."
    else:
        months = math.log(allowance / last_peak) / math.log1p(growth)
        if months > HORIZON_MONTHS:
            result.note = f"At this growth the allowance is not reached within {HORIZON_MONTHS} months."
        else:
            result.months_to_exceed = round(months, 1)
            result.projected_exceed_month = _add_months(used[-1].month, math.ceil(months))
            result.note = (
                f"At {result.monthly_growth_percent:+.2f} % a month the peak day exceeds the daily allowance "
                f"in {month_name(result.projected_exceed_month)}."
            )
    return result


def _month_index(month: str) -> int:
    year, mon = (int(part) for part in month.split("-"))
    return year * 12 + mon - 1


def month_name(month: str) -> str:
    year, mon = (int(part) for part in month.split("-"))
    return date(year, mon, 1).strftime("%B %Y")


def duration(seconds: float) -> str:
    """5 d 4 h, 3 h, 2 h 30 min, 45 min, 30 s."""
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    if hours >= 48:
        return f"{hours // 24} d {hours % 24} h" if hours % 24 else f"{hours // 24} d"
    minutes, secs = divmod(rest, 60)
    if hours and minutes:
        return f"{hours} h {minutes} min"
    if hours:
        return f"{hours} h"
    if minutes:
        return f"{minutes} min"
    return f"{secs} s"


def notes(policy: PolicyReport, period: Period) -> list[str]:
    """What is missing or changed in this policy's history, each as one sentence for the page."""
    found: list[str] = []
    cov = policy.coverage
    if cov.samples == 0:
        found.append("No snapshot of this policy in the period: no charts, no figures.")
        return found
    if cov.appeared_mid_period:
        found.append(
            f"First snapshot {cov.first_sample}: no history before it (the policy appeared mid-period, "
            "or its history starts there)."
        )
    if cov.vanished_mid_period:
        found.append(
            f"Last snapshot {cov.last_sample}: no history after it (the policy vanished mid-period, "
            "or the history stopped)."
        )
    if policy.gaps:
        found.append(
            f"{len(policy.gaps)} gap(s) in the history (no snapshot for more than "
            f"{duration(period.max_sample_seconds)}): {duration(policy.gaps_uncounted_seconds)} counted "
            "in no state; days with gaps are shaded in the chart."
        )
    for change in policy.category_changes:
        found.append(
            f"Category changed {change.from_category} → {change.to_category} at {change.at}: capacity, "
            "refill and thresholds follow the category from then on; the trend uses the current "
            "category's allowance."
        )
    if all(d.consumed_tokens is None for d in policy.days):
        found.append("No consumption figures (consumed_tokens is empty): no heat map and no trend.")
    return found


def _assess(policy: PolicyReport) -> tuple[str, str]:
    """(level, advice sentence) of one policy."""
    name, trend_ = policy.endpoint_id, policy.trend
    if policy.coverage.samples == 0:
        return "unknown", (
            f"Check the history writer: there is no snapshot of {name} in the period, so its risk is unknown."
        )
    growth = trend_.monthly_growth_percent
    growing = f"its peak grows {growth:.1f} % a month" if growth is not None and growth > 0 else None
    month = trend_.projected_exceed_month
    exceed = (
        f"at this growth its peak day exceeds the daily allowance in {month_name(month)}" if month else None
    )
    caveat = (
        f" (the history covers only {policy.coverage.coverage_percent:.0f} % of the period)"
        if policy.coverage.coverage_percent < 90
        else ""
    )
    level, sentence = _sentence(policy, growing, exceed)
    return level, sentence + caveat + "."


def _sentence(policy: PolicyReport, growing: str | None, exceed: str | None) -> tuple[str, str]:
    name, below, months = policy.endpoint_id, policy.time_below, policy.trend.months_to_exceed
    if below.critical_seconds > 0 or below.zero_seconds > 0:
        worst = max(policy.months, key=lambda m: (m.critical_seconds, m.zero_seconds))
        spent = (
            f"the {name} bucket spent {duration(worst.critical_seconds)} below {policy.critical_percent:g} % "
            f"in {month_name(worst.month)}"
        )
        if worst.critical_seconds != below.critical_seconds:
            spent += f" ({duration(below.critical_seconds)} in the period)"
        if below.zero_seconds > 0:
            spent += f", {duration(below.zero_seconds)} of it empty (DICT answering 429)"
        if growing:
            return "high", f"Ask BCB to raise the category: {spent}, and {growing}"
        return "high", (
            f"Find and smooth the bursts that drain it: {spent}, but its peak is not growing, so a category "
            "upgrade alone will not fix it"
        )
    if exceed and months is not None and months <= 6:
        return "high", f"Prepare the category request now: {exceed}"
    if below.warning_seconds > 0 or (exceed and months is not None and months <= 12):
        detail = (
            f"it spent {duration(below.warning_seconds)} below WARNING ({policy.warning_percent:g} %) "
            "but never below CRITICAL"
            if below.warning_seconds > 0
            else "it stayed above WARNING"
        )
        return "medium", f"Watch {name}: {detail}" + (f"; {exceed}" if exceed else "")
    used = policy.trend.allowance_used_percent
    use_text = f"; its peak day used {used:.0f} % of the daily allowance" if used is not None else ""
    return "low", f"Nothing to do for {name}: it stayed above WARNING{use_text}"


def rank(policies: list[PolicyReport]) -> list[Ranked]:
    """Policies ordered by risk: level, then time empty, below CRITICAL, below WARNING, time to the
    allowance. Sets each policy's ``risk`` and returns the first page's table."""
    from exporter.report.figures import Ranked, Risk

    assessed = [(p, *_assess(p)) for p in policies]

    def key(item: tuple[PolicyReport, str, str]) -> tuple[Any, ...]:
        policy, level, _ = item
        months = policy.trend.months_to_exceed
        return (
            LEVELS.index(level),
            -policy.time_below.zero_seconds,
            -policy.time_below.critical_seconds,
            -policy.time_below.warning_seconds,
            months if months is not None else math.inf,
            policy.endpoint_id,
        )

    ranking = []
    for position, (policy, level, advice) in enumerate(sorted(assessed, key=key), start=1):
        policy.risk = Risk(position, level, advice)
        ranking.append(Ranked(position, policy.endpoint_id, level, advice))
    return ranking
