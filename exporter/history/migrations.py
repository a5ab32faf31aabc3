"""Schema migrations: numbered plain SQL files applied in order, in transactions, under an advisory lock.

Files are ``NNNN_<name>.up.sql`` and ``NNNN_<name>.down.sql``, package data of ``exporter.history`` (the
repository's ``sql/`` folder, shipped inside the wheel), or in ``SQL_DIR`` when that variable names a
directory holding them (an operator's own copy).
Applied versions are recorded in ``dict_rate_limit_schema_migrations`` with the checksum of the up file.
No library fits here: yoyo-migrations names its down files ``.rollback.sql``, keeps its own lock table and
does not refuse a newer database; this runner is the few lines those rules need.

The API is synchronous (psycopg 3); :func:`migrate_async` runs :func:`apply` in a worker thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import psycopg

from exporter.config import MigrateSettings
from exporter.dsn import redact
from exporter.runtime import describe

log = logging.getLogger(__name__)

#: Session advisory lock held while migrating (ascii "drlmigr"): replicas starting together wait in turn.
MIGRATION_LOCK = 28554171244431730
FILE_PATTERN = re.compile(r"^(\d{4})_(\w+)\.(up|down)\.sql$")
CREATE_VERSION_TABLE = b"""
CREATE TABLE IF NOT EXISTS dict_rate_limit_schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    checksum   text        NOT NULL
)"""


class MigrationError(Exception):
    """The migrations cannot run (missing files, a database newer than this release...)."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    up: Path
    down: Path

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.up.read_bytes()).hexdigest()


def sql_dir() -> Path:
    """The directory holding the migrations (see the module docstring for the search order)."""
    override = os.environ.get("SQL_DIR", "")
    if override and Path(override).is_dir() and any(Path(override).glob("*.up.sql")):
        return Path(override)
    packaged = Path(str(resources.files("exporter.history") / "sql"))
    if packaged.is_dir() and any(packaged.glob("*.up.sql")):
        return packaged
    raise MigrationError("no migrations found; set SQL_DIR to the directory of the *.up.sql files")


def discover(directory: Path | None = None) -> list[Migration]:
    """Every migration, in version order; each must have both an up and a down file."""
    directory = directory or sql_dir()
    files: dict[tuple[int, str], dict[str, Path]] = {}
    for path in directory.iterdir():
        match = FILE_PATTERN.match(path.name)
        if match:
            files.setdefault((int(match[1]), match[2]), {})[match[3]] = path
    versions = [version for version, _ in files]
    if len(versions) != len(set(versions)):
        raise MigrationError(f"two migrations share a version number in {directory}")
    migrations = []
    for (version, name), pair in sorted(files.items()):
        if set(pair) != {"up", "down"}:
            raise MigrationError(f"migration {version:04d}_{name} needs both .up.sql and .down.sql")
        migrations.append(Migration(version, name, pair["up"], pair["down"]))
    return migrations


@contextmanager
def _locked(database_url: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", [MIGRATION_LOCK])
        try:
            conn.execute(CREATE_VERSION_TABLE)
            yield conn
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", [MIGRATION_LOCK])


def _applied(conn: psycopg.Connection[tuple[object, ...]]) -> dict[int, str]:
    rows = conn.execute("SELECT version, checksum FROM dict_rate_limit_schema_migrations").fetchall()
    return {int(str(version)): str(checksum) for version, checksum in rows}


def _refuse_newer(applied: dict[int, str], migrations: list[Migration]) -> None:
    newest = max((m.version for m in migrations), default=0)
    if applied and max(applied) > newest:
        raise MigrationError(
            f"the database is at schema version {max(applied)}, newer than this release's newest migration "
            f"({newest}); run a newer dict-rate-limit (or roll back with the release that applied it)"
        )


def apply(database_url: str, to: int | None = None, directory: Path | None = None) -> list[int]:
    """Apply the pending migrations up to ``to`` (default: all); return the versions applied.

    All of them in one transaction, with the partitions of the current month, the 12 before and the 2
    after: an exporter writing while ``migrate`` runs sees the old schema or the whole new one, never a
    table without its partitions (a "no partition" error is a data error, and would set its snapshot
    aside). A migration that fails leaves the database as it was. A re-run months later still leaves
    the partition invariant true.
    """
    migrations = discover(directory)
    done: list[int] = []
    with _locked(database_url) as conn, conn.transaction():
        applied = _applied(conn)
        _refuse_newer(applied, migrations)
        for migration in migrations:
            if migration.version in applied:
                if applied[migration.version] != migration.checksum:
                    log.warning("migration %s changed since it was applied", migration.up.name)
                continue
            if to is not None and migration.version > to:
                break
            conn.execute(migration.up.read_bytes())
            conn.execute(
                "INSERT INTO dict_rate_limit_schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                [migration.version, migration.name, migration.checksum],
            )
            done.append(migration.version)
        if conn.execute("SELECT to_regproc('ensure_dict_rate_limit_state_partitions')").fetchone() != (None,):
            conn.execute("SELECT ensure_dict_rate_limit_state_partitions()")
    for version in done:
        log.info("applied migration %s", next(m.up.name for m in migrations if m.version == version))
    return done


async def migrate_async(database_url: str, to: int | None = None) -> list[int]:
    """:func:`apply` without blocking the event loop."""
    return await asyncio.to_thread(apply, database_url, to)


def rollback(database_url: str, to: int | None = None, directory: Path | None = None) -> list[int]:
    """Roll back to version ``to`` (default: one step back); return the versions rolled back, newest first."""
    migrations = {m.version: m for m in discover(directory)}
    undone: list[int] = []
    with _locked(database_url) as conn:
        applied = sorted(_applied(conn), reverse=True)
        _refuse_newer(dict.fromkeys(applied, ""), list(migrations.values()))
        targets = applied[:1] if to is None else [v for v in applied if v > to]
        for version in targets:
            with conn.transaction():
                conn.execute(migrations[version].down.read_bytes())
                conn.execute("DELETE FROM dict_rate_limit_schema_migrations WHERE version = %s", [version])
            log.info("rolled back migration %s", migrations[version].down.name)
            undone.append(version)
    return undone


def status(database_url: str, directory: Path | None = None) -> list[tuple[Migration, bool]]:
    """Every known migration with whether it is applied."""
    migrations = discover(directory)
    with _locked(database_url) as conn:
        applied = _applied(conn)
    _refuse_newer(applied, migrations)
    return [(m, m.version in applied) for m in migrations]


def run(settings: MigrateSettings, direction: str = "up", to: int | None = None) -> int:
    """``dict-rate-limit migrate [up|down|status] [--to N]``."""
    if not settings.database_url:
        print("dict-rate-limit migrate: DATABASE_URL is not set", file=sys.stderr)
        return 2
    try:
        if direction == "up":
            versions = apply(settings.database_url, to)
            print(f"applied {len(versions)} migration(s): {versions}" if versions else "schema is up to date")
        elif direction == "down":
            print(f"rolled back: {rollback(settings.database_url, to) or 'nothing'}")
        else:
            for migration, done in status(settings.database_url):
                print(f"{migration.version:04d} {migration.name:<32} {'applied' if done else 'pending'}")
    except (MigrationError, psycopg.Error) as exc:
        # One line (libpq's errors carry a newline and a tab, psycopg's query excerpts too), as every
        # other command's, and never the password of DATABASE_URL.
        print(f"dict-rate-limit migrate: {redact(describe(exc), settings.database_url)}", file=sys.stderr)
        return 1
    return 0
