"""Bad input of ``dict-rate-limit report``: each case is one clear line (or a page saying what is missing),
the project's exit codes (2: usage or configuration, 1: the database), never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from devstack.embedded import free_port
from tests.report.report_scenario import SCENARIO, WRITE, write_history

RunReport = Callable[..., tuple[int, str]]


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_without_database_url_it_exits_2_naming_the_key(
    run_report: RunReport, monkeypatch: Any, tmp_path: Path
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    code, err = run_report("--output", str(tmp_path / "r.html"))
    assert code == 2
    assert one_line(err) == (
        "dict-rate-limit report: invalid configuration: DATABASE_URL: "
        "the report reads the history in PostgreSQL; set DATABASE_URL"
    )
    assert not (tmp_path / "r.html").exists()


def test_an_unreachable_database_is_one_line_and_exit_1(run_report: RunReport, tmp_path: Path) -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres?connect_timeout=3"
    code, err = run_report("--database-url", url, "--output", str(tmp_path / "r.html"))
    assert code == 1
    assert one_line(err).startswith("dict-rate-limit report: cannot read the history: connection")


def test_a_database_without_the_schema_says_to_migrate(
    run_report: RunReport, database_url: str, tmp_path: Path
) -> None:
    code, err = run_report("--database-url", database_url, "--output", str(tmp_path / "r.html"))
    assert code == 1
    assert one_line(err) == (
        "dict-rate-limit report: the database has no history tables; run `dict-rate-limit migrate` first"
    )


def test_bad_dates_are_usage_errors(run_report: RunReport, migrated_url: str) -> None:
    code, err = run_report("--database-url", migrated_url, "--since", "last tuesday")
    assert code == 2
    assert one_line(err) == (
        "dict-rate-limit report: --since: must be a date (2026-01-01) or an ISO timestamp "
        "(got 'last tuesday')"
    )
    code, err = run_report("--database-url", migrated_url, "--since", "2026-03-01", "--until", "2026-02-01")
    assert code == 2
    assert "--since (2026-03-01T00:00:00+00:00) must be before --until" in one_line(err)


def test_an_empty_period_writes_a_page_that_says_so(
    run_report: RunReport, migrated_url: str, tmp_path: Path
) -> None:
    page, data = tmp_path / "r.html", tmp_path / "r.json"
    period = ("--since", "2026-01-01", "--until", "2026-02-01")
    code, err = run_report("--database-url", migrated_url, *period, "--output", str(page))
    assert code == 0
    assert one_line(err).startswith("dict-rate-limit report: No bucket history between 2026-01-01T00:00:00Z")
    html = page.read_text(encoding="utf-8")
    assert "No policy has history in this period: nothing to rank." in html
    assert "No bucket history between 2026-01-01T00:00:00Z and 2026-02-01T00:00:00Z" in html
    assert "<svg" not in html  # no chart drawn from nothing
    code, _ = run_report("--database-url", migrated_url, *period, "--format", "json", "--output", str(data))
    assert code == 0
    loaded = json.loads(data.read_text(encoding="utf-8"))
    assert (loaded["policies"], loaded["ranking"]) == ([], [])
    assert loaded["notes"][0].startswith("No bucket history between")


def test_a_known_policy_without_snapshots_in_the_period_is_ranked_unknown_with_no_chart(
    run_report: RunReport, migrated_url: str, tmp_path: Path
) -> None:
    with psycopg.connect(migrated_url) as conn:
        conn.execute(
            "INSERT INTO dict_rate_limit_policies (endpoint_id, psp_category, capacity, refill_tokens,"
            " refill_period_sec, first_seen_at, last_seen_at) VALUES ('KEYS_CHECK', 'A', 70, 70, 60, %s, %s)",
            [datetime(2025, 6, 1, tzinfo=UTC), datetime(2026, 1, 10, tzinfo=UTC)],
        )
    page, data = tmp_path / "r.html", tmp_path / "r.json"
    period = ("--since", "2026-01-01", "--until", "2026-02-01")
    assert (
        run_report("--database-url", migrated_url, *period, "--format", "json", "--output", str(data))[0] == 0
    )
    (policy,) = json.loads(data.read_text(encoding="utf-8"))["policies"]
    assert policy["risk"]["level"] == "unknown"
    assert policy["notes"] == ["No snapshot of this policy in the period: no charts, no figures."]
    assert run_report("--database-url", migrated_url, *period, "--output", str(page))[0] == 0
    html = page.read_text(encoding="utf-8")
    assert "No snapshot of this policy in the period: no charts, no figures." in html
    assert "<svg" not in html


def _split_between_two_participants(database_url: str, first_until: datetime) -> None:
    """The history as a two-participant exporter writes it (sql/0008): bank-a's rows, then bank-b's."""
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "UPDATE dict_rate_limit_states SET participant = CASE WHEN response_time < %s"
            " THEN 'bank-a' ELSE 'bank-b' END",
            [first_until],
        )
        conn.execute("CREATE TEMPORARY TABLE copied AS SELECT * FROM dict_rate_limit_policies")
        conn.execute("UPDATE copied SET participant = 'bank-b'")
        conn.execute("UPDATE dict_rate_limit_policies SET participant = 'bank-a'")
        conn.execute("INSERT INTO dict_rate_limit_policies SELECT * FROM copied")


def test_several_participants_are_reported_one_at_a_time(
    run_report: RunReport, migrated_url: str, report_json: Callable[..., dict[str, Any]]
) -> None:
    since, until = datetime(2026, 2, 1, tzinfo=UTC), datetime(2026, 2, 2, tzinfo=UTC)
    write_history(migrated_url, {WRITE: SCENARIO[WRITE]}, since, until)
    period = ("--since", "2026-02-01", "--until", "2026-02-02")
    # One participant ('' : a single-participant exporter): no flag needed.
    assert report_json(migrated_url, *period)["policies"][0]["coverage"]["samples"] == 24 * 120
    _split_between_two_participants(migrated_url, datetime(2026, 2, 1, 6, tzinfo=UTC))
    (first,) = report_json(migrated_url, *period, "--participant", "bank-a")["policies"]
    assert first["coverage"]["samples"] == 6 * 120
    (second,) = report_json(migrated_url, *period, "--participant", "bank-b")["policies"]
    assert second["coverage"]["samples"] == 18 * 120
    code, err = run_report("--database-url", migrated_url, *period)
    assert code == 2
    assert one_line(err) == (
        "dict-rate-limit report: --participant: the history of the period holds 2 participants "
        "('bank-a', 'bank-b'): choose one with --participant NAME"
    )
    code, err = run_report("--database-url", migrated_url, *period, "--participant", "bank-c")
    assert code == 2
    assert one_line(err) == (
        "dict-rate-limit report: --participant: no participant 'bank-c' in the period "
        "(known: 'bank-a', 'bank-b')"
    )


def test_an_unwritable_output_is_one_line_and_exit_1(
    run_report: RunReport, migrated_url: str, tmp_path: Path
) -> None:
    target = tmp_path / "missing-dir" / "r.json"
    code, err = run_report("--database-url", migrated_url, "--format", "json", "--output", str(target))
    assert code == 1
    assert one_line(err).startswith(f"dict-rate-limit report: cannot write {target}")


def test_the_console_script_says_one_line_without_a_traceback(tmp_path: Path) -> None:
    """The real process (logging set up, lazy imports), not only main() in this interpreter."""
    script = Path(sys.executable).parent / "dict-rate-limit"
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    result = subprocess.run(
        [str(script), "report", "--output", str(tmp_path / "r.html")],
        capture_output=True, text=True, timeout=60, check=False, env=env,
    )  # fmt: skip
    assert result.returncode == 2
    assert one_line(result.stderr).startswith("dict-rate-limit report: invalid configuration: DATABASE_URL: ")
