"""docs/runbooks.md: its PromQL is valid and names only exported metrics, its SQL runs on the real schema."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import psycopg
import yaml

from exporter.history import migrations
from tests.support.env import ROOT, require_binary

RUNBOOKS = (ROOT / "docs" / "runbooks.md").read_text(encoding="utf-8")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
#: One runbook section (and one SQL block) per alert of the bundle.
ALERT_COUNT = sum(
    1
    for path in sorted((ROOT / "rules").glob("*.rules.yml"))
    for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]
    for rule in group["rules"]
    if "alert" in rule
)


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", RUNBOOKS, flags=re.DOTALL)


def _promql_queries() -> list[str]:
    """One query per line; an indented line continues the previous one."""
    queries: list[str] = []
    for block in _blocks("promql"):
        for line in block.splitlines():
            if line.startswith(" ") and queries:
                queries[-1] += " " + line.strip()
            elif line.strip():
                queries.append(line.strip())
    return queries


def test_every_runbook_section_has_promql_sql_and_whom_to_tell() -> None:
    sections = RUNBOOKS.split("\n## ")[1:]
    alerts = {
        rule["alert"]
        for path in sorted((ROOT / "rules").glob("*.rules.yml"))
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    assert sorted(section.splitlines()[0] for section in sections) == sorted(alerts)
    for section in sections:
        assert "```promql" in section, section.splitlines()[0]
        assert "```sql" in section, section.splitlines()[0]
        assert "**Tell.**" in section, section.splitlines()[0]


def test_runbook_promql_names_only_metrics_of_the_contract() -> None:
    contract = set(re.findall(r"`(dict_rate_limit_\w+)`", (ROOT / "docs" / "metrics.md").read_text("utf-8")))
    used = set(re.findall(r"(?<![:\w])(dict_rate_limit_\w+)", " ".join(_promql_queries())))
    unknown = set()
    for name in used:
        base = next((name.removesuffix(s) for s in HISTOGRAM_SUFFIXES if name.endswith(s)), name)
        if name not in contract and base not in contract:
            unknown.add(name)
    assert len(used) > 20
    assert sorted(unknown) == []


def test_runbook_promql_parses_in_promtool(tmp_path: Path) -> None:
    # promtool has no offline query parser; a recording rule per query gets each one parsed and checked.
    rules = [{"record": f"runbook:query:{i}", "expr": q} for i, q in enumerate(_promql_queries())]
    path = tmp_path / "runbook-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "runbooks", "rules": rules}]}), encoding="utf-8")
    result = subprocess.run(
        [require_binary("promtool"), "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_runbook_sql_runs_on_the_migrated_schema(database_url: str) -> None:
    migrations.apply(database_url)
    statements = _blocks("sql")
    assert len(statements) == len(RUNBOOKS.split("\n## ")[1:])
    with psycopg.connect(database_url) as conn:
        for statement in statements:
            # Read-only queries on an empty history: each must plan and run, returning rows or none.
            cursor = conn.execute(statement.encode())
            assert cursor.description is not None, statement
            cursor.fetchall()
