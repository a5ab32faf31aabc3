"""``dict-rate-limit report``: reads the history, writes the HTML page or the JSON figures."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg

from exporter.config import ReportSettings

if TYPE_CHECKING:
    from exporter.report.figures import Report
    from exporter.report.queries import Aggregates, Period

log = logging.getLogger(__name__)
PROG = "dict-rate-limit report"


@dataclass(frozen=True, slots=True)
class Options:
    since: str | None
    until: str | None
    participant: str | None
    output: str | None
    format: str


class UsageError(Exception):
    """A bad flag value: one line, exit 2."""


def parse_time(flag: str, raw: str) -> datetime:
    """A UTC date (2026-01-01) or ISO timestamp; naive timestamps are UTC."""
    try:
        value = datetime.fromisoformat(raw.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"{flag}: must be a date (2026-01-01) or an ISO timestamp (got {raw!r})") from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _months_before(moment: datetime, months: int) -> datetime:
    index = moment.year * 12 + moment.month - 1 - months
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


def period_of(options: Options, settings: ReportSettings, now: datetime) -> tuple[datetime, datetime]:
    """[since, until): until defaults to now (and never lies in the future), since to 13 months back."""
    until = parse_time("--until", options.until) if options.until else now
    until = min(until, now)
    if options.since:
        since = parse_time("--since", options.since)
    else:
        since = _months_before(until, settings.rate_limit_retention_months - 1)
    if since >= until:
        raise UsageError(f"--since ({since.isoformat()}) must be before --until ({until.isoformat()})")
    return since, until


class Failure(Exception):
    """Ends the command with one line on stderr and ``code``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def run(settings: ReportSettings, options: Options) -> int:
    """Exit 0 with the report written (also for an empty period: the page says so), 2 for bad usage or a
    missing extra, 1 when the database cannot be read or the file written."""
    try:
        return _run(settings, options)
    except Failure as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.code


def _run(settings: ReportSettings, options: Options) -> int:
    from exporter.report import figures, queries

    if options.format == "html":
        try:
            from exporter.report import html  # noqa: F401  (matplotlib and jinja2: the `report` extra)
        except ImportError as exc:
            raise Failure(2, f"{exc.name} is missing; install 'dict-rate-limit-exporter[report]'") from None
    if not settings.database_url:
        raise Failure(2, "DATABASE_URL is not set")
    now = datetime.now(UTC)
    try:
        since, until = period_of(options, settings, now)
    except UsageError as exc:
        raise Failure(2, str(exc)) from None
    period = queries.Period(since, until, settings.poll_interval_seconds, options.participant)
    started = time.monotonic()
    aggregates = _collect(settings.database_url, period)
    queried = time.monotonic() - started
    report = figures.build(aggregates, period, now)
    target = options.output or ("report.json" if options.format == "json" else "report.html")
    try:
        _write(target, report.to_json() if options.format == "json" else _html(report))
    except OSError as exc:
        raise Failure(1, f"cannot write {target}: {exc.strerror}") from None
    log.info(
        "report written",
        extra={
            "output": target,
            "policies": len(report.policies),
            "query_seconds": round(queried, 3),
            "total_seconds": round(time.monotonic() - started, 3),
        },
    )
    for note in report.notes:
        print(f"{PROG}: {note}", file=sys.stderr)
    return 0


def _collect(database_url: str, period: Period) -> Aggregates:
    from exporter.report import queries

    try:
        return queries.collect(database_url, period)
    except queries.ParticipantUnsupported as exc:
        raise Failure(2, f"--participant: {exc}") from None
    except psycopg.errors.UndefinedTable:
        raise Failure(1, "the database has no history tables; run `dict-rate-limit migrate` first") from None
    except psycopg.Error as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise Failure(1, f"cannot read the history: {message}") from None


def _html(report: Report) -> str:
    from exporter.report import html

    return html.render(report)


def _write(target: str, text: str) -> None:
    if target == "-":
        sys.stdout.write(text)
        return
    path = Path(target)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)  # a reader (a mail job) never picks up half a report
