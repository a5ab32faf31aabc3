"""The report page: the figures and their inline SVG charts through one Jinja2 template (package data)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

import jinja2

from exporter.report import charts
from exporter.report.analysis import duration
from exporter.report.figures import PolicyReport, Report


@dataclass(frozen=True, slots=True)
class PolicyCharts:
    timeline: str
    heatmap: str | None


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("exporter.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,  # a misspelt field fails the render, never prints nothing
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["duration"] = duration
    env.filters["pct"] = lambda value: f"{value:g} %"
    env.filters["tokens"] = lambda value: "" if value is None else f"{value:,.0f}"
    return env


def policy_charts(policy: PolicyReport, since: date, until: date) -> PolicyCharts | None:
    if policy.coverage.samples == 0:
        return None
    has_consumption = any(v is not None for row in policy.week_hours for v in row)
    return PolicyCharts(
        charts.timeline(policy, since, until), charts.heatmap(policy) if has_consumption else None
    )


def _day(stamp: str, *, end: bool) -> date:
    moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    day = moment.date()
    # An exclusive end at midnight ends the day before; any later moment ends within its own day.
    return day if end and moment.time() == datetime.min.time() else date.fromordinal(day.toordinal() + end)


def render(report: Report) -> str:
    """The self-contained page: CSS and SVG inline, no script, no link to anything outside the file."""
    since, until = _day(report.since, end=False), _day(report.until, end=True)
    rendered = {
        p.endpoint_id: c for p in report.policies if (c := policy_charts(p, since, until)) is not None
    }
    template = _environment().get_template("report.html.j2")
    return template.render(
        report=report, policies={p.endpoint_id: p for p in report.policies}, charts=rendered
    )
