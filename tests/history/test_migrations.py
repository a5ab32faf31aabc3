"""Migrations against a real PostgreSQL: order, idempotence, down paths, refusal of a newer database, locking,
and the seeds' verification queries run verbatim."""

from __future__ import annotations

import shutil
import threading
from datetime import UTC, date, datetime, time
from pathlib import Path

import psycopg
import pytest

from exporter.config import MigrateSettings
from exporter.history import migrations

SCHEMA_QUERY = """
SELECT 'column', table_name || '.' || column_name || ' ' || data_type || ' ' || is_nullable
       || ' ' || coalesce(column_default, '')
  FROM information_schema.columns WHERE table_schema = 'public'
UNION ALL SELECT 'index', indexdef FROM pg_indexes WHERE schemaname = 'public'
UNION ALL SELECT 'constraint', conrelid::regclass::text || ' ' || conname || ' ' || pg_get_constraintdef(oid)
  FROM pg_constraint WHERE connamespace = 'public'::regnamespace
UNION ALL SELECT 'function', p.oid::regprocedure::text || ' ' || md5(p.prosrc)
  FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace
UNION ALL SELECT 'view', viewname || ' ' || md5(definition) FROM pg_views WHERE schemaname = 'public'
UNION ALL SELECT 'relation', relname || ' ' || relkind::text FROM pg_class
 WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'p', 'S', 'v')
ORDER BY 1, 2
"""

# Verbatim from the seed (000_..., "Database Verification" and "Alerts not being created").
SEED_PARTITIONS = b"""SELECT tablename FROM pg_tables
WHERE tablename LIKE 'dict_rate_limit_states_%'
ORDER BY tablename;"""
SEED_TROUBLESHOOTING = b"""SELECT endpoint_id, available_tokens, capacity,
       100.0 - (available_tokens::DECIMAL / capacity * 100) AS utilization_pct
FROM dict_rate_limit_states
ORDER BY created_at DESC
LIMIT 20;"""


def schema(url: str) -> list[tuple[str, str]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(SCHEMA_QUERY).fetchall()
    # The runner's own version table is not part of any migration.
    return [(str(k), str(t)) for k, t in rows if "dict_rate_limit_schema_migrations" not in str(t)]


def scalar(url: str, query: str) -> object:
    with psycopg.connect(url) as conn:
        row = conn.execute(query.encode()).fetchone()
    assert row is not None
    return row[0]


def month_names(first: date, count: int) -> list[str]:
    names = []
    year, month = first.year, first.month
    for _ in range(count):
        names.append(f"dict_rate_limit_states_{year:04d}_{month:02d}")
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return names


def add_months(day: date, months: int) -> date:
    index = day.year * 12 + day.month - 1 + months
    return date(index // 12, index % 12 + 1, 1)


def partitions(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'dict_rate_limit_states'::regclass ORDER BY 1"
        ).fetchall()
    return [str(name) for (name,) in rows]


def test_every_migration_has_a_down_path_that_restores_the_previous_schema(database_url: str) -> None:
    versions = [m.version for m in migrations.discover()]
    assert versions[:2] == [1, 2]
    before = {0: schema(database_url)}
    for version in versions:
        assert migrations.apply(database_url, to=version) == [version]
        before[version] = schema(database_url)
    for previous, version in reversed(list(zip([0, *versions], versions, strict=False))):
        assert migrations.rollback(database_url) == [version]
        assert schema(database_url) == before[previous], f"down of {version:04d} left a different schema"
    assert migrations.apply(database_url) == versions
    assert schema(database_url) == before[versions[-1]]
    assert len(before[2]) - len(before[0]) > 80  # the comparison sees columns, indexes, functions, views


def test_rerunning_the_migrations_is_a_no_op(database_url: str) -> None:
    applied = migrations.apply(database_url)
    assert applied == [m.version for m in migrations.discover()]
    snapshot = schema(database_url)
    recorded = scalar(
        database_url, "SELECT array_agg(applied_at ORDER BY version) FROM dict_rate_limit_schema_migrations"
    )
    assert migrations.apply(database_url) == []
    assert schema(database_url) == snapshot
    assert (
        scalar(
            database_url,
            "SELECT array_agg(applied_at ORDER BY version) FROM dict_rate_limit_schema_migrations",
        )
        == recorded
    )


def test_a_database_newer_than_the_code_is_refused_with_a_clear_message(database_url: str) -> None:
    migrations.apply(database_url)
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO dict_rate_limit_schema_migrations (version, name, checksum)"
            " VALUES (9999, 'future', 'x')"
        )
    with pytest.raises(
        migrations.MigrationError, match=r"schema version 9999, newer than .* newest migration"
    ):
        migrations.apply(database_url)
    with pytest.raises(migrations.MigrationError, match="9999"):
        migrations.rollback(database_url)
    assert migrations.run(MigrateSettings(database_url=database_url), "up") == 1


def test_concurrent_migrators_apply_each_migration_exactly_once(database_url: str) -> None:
    results: list[list[int]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def migrate() -> None:
        barrier.wait()
        try:
            results.append(migrations.apply(database_url))
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=migrate) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    versions = [m.version for m in migrations.discover()]
    assert sorted(results, key=len) == [[], [], [], versions]
    assert scalar(database_url, "SELECT count(*) FROM dict_rate_limit_schema_migrations") == len(versions)


def test_a_failing_migration_leaves_the_database_as_it_was(database_url: str, tmp_path: Path) -> None:
    # One transaction for every pending migration and the partitions: an exporter writing during
    # ``migrate`` never sees the tables without their partitions (or half a release's schema).
    for path in migrations.sql_dir().glob("*.sql"):
        shutil.copy(path, tmp_path / path.name)
    (tmp_path / "0999_broken.up.sql").write_text("SELECT 1 / 0;")
    (tmp_path / "0999_broken.down.sql").write_text("SELECT 1;")
    before = schema(database_url)
    with pytest.raises(psycopg.errors.DivisionByZero):
        migrations.apply(database_url, directory=tmp_path)
    assert schema(database_url) == before
    assert scalar(database_url, "SELECT count(*) FROM dict_rate_limit_schema_migrations") == 0
    assert migrations.apply(database_url) == [m.version for m in migrations.discover()]


def test_a_migration_without_its_down_file_is_refused(tmp_path: Path) -> None:
    source = migrations.sql_dir()
    shutil.copy(source / "0001_history.up.sql", tmp_path / "0001_history.up.sql")
    with pytest.raises(migrations.MigrationError, match="0001_history needs both"):
        migrations.discover(tmp_path)


def test_sql_dir_env_overrides_the_repository_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "0001_x.up.sql").write_text("SELECT 1;")
    monkeypatch.setenv("SQL_DIR", str(tmp_path))
    assert migrations.sql_dir() == tmp_path
    monkeypatch.setenv("SQL_DIR", str(tmp_path / "missing"))
    assert migrations.sql_dir() == Path(migrations.__file__).resolve().parent / "sql"


def test_migrate_command_reports_status(database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    settings = MigrateSettings(database_url=database_url)
    assert migrations.run(settings, "status") == 0
    assert "0001 history" in capsys.readouterr().out.replace("  ", " ").replace("  ", " ")
    assert migrations.run(settings, "up") == 0
    assert migrations.run(settings, "status") == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[-1] for line in lines if line[:4].isdigit()] == ["applied"] * len(
        migrations.discover()
    )
    assert migrations.run(MigrateSettings(database_url=None), "up") == 2


def test_migrate_creates_the_current_month_the_12_before_and_the_2_after(database_url: str) -> None:
    migrations.apply(database_url)
    today = scalar(database_url, "SELECT (now() AT TIME ZONE 'UTC')::date")
    assert isinstance(today, date)
    assert partitions(database_url) == month_names(add_months(today, -12), 15)


def test_seed_database_verification_queries_work_verbatim(database_url: str) -> None:
    migrations.apply(database_url)
    with psycopg.connect(database_url) as conn:
        for name in ["ENTRIES_WRITE", "ENTRIES_READ_PARTICIPANT_ANTISCAN"]:
            conn.execute(
                "INSERT INTO dict_rate_limit_policies VALUES (%s, 'A', 1000, 20, 60, 20, 10, now(), now())",
                [name],
            )
            for minutes, available in [(2, 900), (1, 50)]:
                conn.execute(
                    "INSERT INTO dict_rate_limit_states (endpoint_id, psp_category, available_tokens,"
                    " capacity, refill_tokens, refill_period_sec, utilization_percent, remaining_ratio,"
                    " recovery_eta_seconds, response_time) VALUES (%s, 'A', %s, 1000, 20, 60,"
                    " 100 - %s / 10.0, %s / 1000.0, 0, now() - make_interval(mins => %s))",
                    [name, available, available, available, minutes],
                )
        conn.commit()
        assert conn.execute("SELECT COUNT(*) FROM dict_rate_limit_policies;").fetchone() == (2,)
        assert conn.execute("SELECT COUNT(*) FROM dict_rate_limit_states;").fetchone() == (4,)
        latest = conn.execute("SELECT * FROM v_dict_rate_limit_latest_states;").fetchall()
        assert sorted((row[0], row[2]) for row in latest) == [
            ("ENTRIES_READ_PARTICIPANT_ANTISCAN", 50),
            ("ENTRIES_WRITE", 50),
        ]
        assert conn.execute("SELECT * FROM v_dict_rate_limit_active_alerts;").fetchall() == []
        tables = conn.execute(SEED_PARTITIONS).fetchall()
        assert len(tables) >= 13
        assert all(str(t).startswith("dict_rate_limit_states_") for (t,) in tables)
        troubleshooting = conn.execute(SEED_TROUBLESHOOTING).fetchall()
        assert len(troubleshooting) == 4
        assert {float(row[3]) for row in troubleshooting} == {10.0, 95.0}
        functions = conn.execute(
            "SELECT proname FROM pg_proc WHERE proname = ANY(%s) ORDER BY proname",
            [
                [
                    "auto_resolve_alerts",
                    "create_dict_rate_limit_state_partition",
                    "drop_old_partitions",
                    "perform_dict_rate_limit_maintenance",
                ]
            ],
        ).fetchall()
        assert [f for (f,) in functions] == [
            "auto_resolve_alerts",
            "create_dict_rate_limit_state_partition",
            "drop_old_partitions",
            "perform_dict_rate_limit_maintenance",
        ]
        views = conn.execute(
            "SELECT viewname FROM pg_views WHERE viewname LIKE 'v_dict_rate_limit_%' ORDER BY 1"
        )
        assert [v for (v,) in views.fetchall()] == [
            "v_dict_rate_limit_active_alerts",
            "v_dict_rate_limit_latest_states",
        ]


def shift(moment: datetime, months: int) -> datetime:
    """``moment`` moved by whole calendar months (its day is at most 28, so it always exists)."""
    first = add_months(moment.date(), months)
    return moment.replace(year=first.year, month=first.month)


def test_maintenance_14_months_ahead_drops_exactly_the_expired_partitions(database_url: str) -> None:
    migrations.apply(database_url)
    now = scalar(database_url, "SELECT now()")
    assert isinstance(now, datetime)
    now = now.astimezone(UTC)
    now = now.replace(day=min(now.day, 28))
    before = partitions(database_url)
    reference = shift(now, 14)
    cutoff = shift(reference, -13)
    # Dropped: each partition whose whole month ended at least 13 months before the reference.
    expected_dropped = [
        name for name in before
        if datetime.combine(add_months(date(int(name[-7:-3]), int(name[-2:]), 1), 1), time(), UTC) <= cutoff
    ]  # fmt: skip
    window = month_names(add_months(reference.date(), -12), 15)
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT perform_dict_rate_limit_maintenance(13, %s)", [reference]).fetchone()
    assert row is not None
    summary = row[0]
    # Migrate made the current month -12..+2; 14 months on, the current month and the 12 before expired.
    assert expected_dropped == month_names(add_months(now.date(), -12), 13)
    assert summary["dropped"] == expected_dropped
    assert summary["created"] == sorted(set(window) - set(before))
    assert partitions(database_url) == month_names(add_months(now.date(), 1), 16)
    with psycopg.connect(database_url) as conn:
        again = conn.execute("SELECT perform_dict_rate_limit_maintenance(13, %s)", [reference]).fetchone()
    assert again is not None
    assert (again[0]["created"], again[0]["dropped"]) == ([], [])


def test_drop_old_partitions_keeps_everything_inside_the_retention(database_url: str) -> None:
    migrations.apply(database_url)
    before = partitions(database_url)
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT drop_old_partitions()").fetchall() == []
        assert conn.execute("SELECT drop_old_partitions(1)").fetchall() != []
    assert len(partitions(database_url)) < len(before)
