"""The report's charts: matplotlib figures rendered to SVG text for inline use (no files, no fonts fetched).

Object-oriented matplotlib only (``Figure``, never ``pyplot``): no global figure state, nothing left open.
Text stays text in the SVG (``svg.fonttype = none``), drawn with the reader's own sans-serif font.
"""

from __future__ import annotations

import io
import itertools
import math
import re
from datetime import date, datetime
from typing import Any

import matplotlib
from matplotlib.colors import LinearSegmentedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from exporter.report.figures import PolicyReport

RC: dict[Any, Any] = {
    "svg.fonttype": "none",
    "svg.hashsalt": "dict-rate-limit-report",
    "font.family": "sans-serif",
    "font.size": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
}
WARNING_COLOR, CRITICAL_COLOR, LINE_COLOR, BAR_COLOR = "#d98c00", "#c62828", "#1f5fa8", "#7fa7d9"
GAP_COLOR = "#bdbdbd"
HEAT = LinearSegmentedColormap.from_list("pressure", ["#f4f8fb", "#fdd49e", "#ef6548", "#7f0000"])
WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_ids = itertools.count(1)


def _svg(fig: Figure) -> str:
    buffer = io.StringIO()
    with matplotlib.rc_context(RC):
        fig.savefig(buffer, format="svg", bbox_inches="tight")
    text = buffer.getvalue()
    text = text[text.index("<svg") :]  # drop the XML prolog and DOCTYPE: the SVG goes inside HTML
    return _unique_ids(text, f"c{next(_ids)}-")


def _unique_ids(svg: str, prefix: str) -> str:
    """Prefixes every id, so charts inlined side by side never resolve each other's clip paths."""
    ids = set(re.findall(r'id="([^"]+)"', svg))
    for ident in sorted(ids, key=len, reverse=True):
        svg = svg.replace(f'id="{ident}"', f'id="{prefix}{ident}"')
        svg = svg.replace(f"url(#{ident})", f"url(#{prefix}{ident})")
        svg = svg.replace(f'href="#{ident}"', f'href="#{prefix}{ident}"')
    return svg


def timeline(policy: PolicyReport, since: date, until: date) -> str:
    """Daily minimum remaining share with the thresholds, and daily consumption against the allowance;
    category changes as vertical lines, days with gaps shaded."""
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(9.0, 4.2))
        top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
        days, minimum, consumed, allowance = _daily_series(policy)
        top.step(
            days,
            minimum,
            where="mid",
            color=LINE_COLOR,
            linewidth=1.2,
            label="daily minimum remaining",
        )
        top.axhline(
            policy.warning_percent,
            color=WARNING_COLOR,
            linestyle="--",
            linewidth=1,
            label=f"WARNING {policy.warning_percent:g} %",
        )
        top.axhline(
            policy.critical_percent,
            color=CRITICAL_COLOR,
            linestyle="--",
            linewidth=1,
            label=f"CRITICAL {policy.critical_percent:g} %",
        )
        top.axhline(0, color="#555555", linewidth=0.6)
        low = min([0.0, *(d.min_remaining_percent for d in policy.days)])
        top.set_ylim(low - 5, 105)
        top.set_ylabel("remaining (% of capacity)")
        # One stairs path, not a bar per day: 365 rectangles cost more than the rest of the chart.
        edges = [*days, date.fromordinal(days[-1].toordinal() + 1)]
        bottom.stairs(consumed, edges, fill=True, color=BAR_COLOR, label="tokens consumed per day")
        bottom.step(
            days,
            allowance,
            where="mid",
            color=CRITICAL_COLOR,
            linewidth=1,
            label="daily allowance (refill/day + capacity)",
        )
        bottom.set_ylabel("tokens / day")
        bottom.set_ylim(0, None)
        # The whole period on the x axis: a policy that appeared or vanished mid-period shows it as a
        # grey stretch with no line, like a gap, not as a chart that merely starts later.
        missing = [*_gap_days(policy), (since, days[0]), (date.fromordinal(days[-1].toordinal() + 1), until)]
        for start, end in (span for span in missing if span[0] < span[1]):
            for ax in (top, bottom):
                ax.axvspan(start, end, color=GAP_COLOR, alpha=0.6, linewidth=0)
        top.set_xlim(since, until)
        for change in policy.category_changes:
            at = datetime.fromisoformat(change.at.replace("Z", "+00:00"))
            for ax in (top, bottom):
                ax.axvline(at, color="#6a1b9a", linewidth=1)
            top.annotate(
                f"{change.from_category}→{change.to_category}",
                (at, 100),
                xytext=(3, 0),
                textcoords="offset points",
                color="#6a1b9a",
                va="top",
            )
        handles, _ = top.get_legend_handles_labels()
        if any(span[0] < span[1] for span in missing):
            handles.append(Patch(color=GAP_COLOR, alpha=0.6, label="no history (gap, or policy absent)"))
        top.legend(
            handles=handles, loc="lower left", bbox_to_anchor=(0, 1.0), fontsize=7, frameon=False, ncol=4
        )
        bottom.legend(loc="lower left", bbox_to_anchor=(0, 1.0), fontsize=7, frameon=False, ncol=2)
        fig.autofmt_xdate()
        return _svg(fig)


def _daily_series(policy: PolicyReport) -> tuple[list[date], list[float], list[float], list[float]]:
    """Every day from the first to the last with data; days without any snapshot are NaN, so lines and
    areas break there instead of bridging a missing day."""
    known = {date.fromisoformat(d.day): d for d in policy.days}
    first, last = min(known), max(known)
    days = [date.fromordinal(o) for o in range(first.toordinal(), last.toordinal() + 1)]

    def value(day: date, attr: str) -> float:
        found = known.get(day)
        got = None if found is None else getattr(found, attr)
        return math.nan if got is None else float(got)

    return (
        days,
        [value(d, "min_remaining_percent") for d in days],
        [value(d, "consumed_tokens") for d in days],
        [value(d, "daily_allowance") for d in days],
    )


def _gap_days(policy: PolicyReport) -> list[tuple[date, date]]:
    """Whole days touched by each gap: a two-hour gap would be invisible at the scale of a year."""
    spans = []
    for gap in policy.gaps:
        start = datetime.fromisoformat(gap.start.replace("Z", "+00:00")).date()
        end = datetime.fromisoformat(gap.end.replace("Z", "+00:00")).date()
        spans.append((start, date.fromordinal(end.toordinal() + 1)))
    return spans


def heatmap(policy: PolicyReport) -> str:
    """Mean tokens consumed per hour of the week (UTC); hours without data hatched grey, not zero."""
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(9.0, 2.4))
        ax = fig.subplots()
        values = [[math.nan if v is None else v for v in row] for row in policy.week_hours]
        ax.set_facecolor(GAP_COLOR)
        mesh = ax.pcolormesh(
            range(25), range(8), values, cmap=HEAT, shading="flat", edgecolors="white", linewidth=0.3
        )
        ax.set_yticks([i + 0.5 for i in range(7)], WEEKDAYS)
        ax.set_xticks(range(0, 25, 3), [f"{h:02d}h" for h in range(0, 25, 3)])
        ax.invert_yaxis()
        ax.set_xlabel("hour of the day (UTC); grey: no data")
        colorbar = fig.colorbar(mesh, ax=ax, pad=0.01)
        colorbar.set_label("tokens / hour (mean)")
        return _svg(fig)
