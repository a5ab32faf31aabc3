"""The history writer's skipped policy upserts and binary COPY store exactly what the every-row upsert and
text COPY stored (the previous writer, kept here as the reference), apart from a bounded last_seen_at."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql

from exporter.config import PolicyThreshold
from exporter.history import migrations
from exporter.history.statements import (
    LAST_SEEN_REFRESH,
    STATE_COLUMNS,
    UPSERT_POLICIES,
    PolicyRows,
    policy_params,
    rows_of,
)
from exporter.history.writer import HistoryWriter
from exporter.service.derivation import DerivedSnapshot, derive
from exporter.snapshot import PolicyReading, Snapshot

T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)


def rows(url: str, query: str, params: Sequence[object] = ()) -> list[tuple[object, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(query.encode(), params).fetchall()


# The writer before skipped upserts: text COPY, then every policy row rewritten at every snapshot.
REFERENCE_COPY = sql.SQL("COPY dict_rate_limit_states ({}) FROM STDIN").format(
    sql.SQL(", ").join(map(sql.Identifier, STATE_COLUMNS))
)
REFERENCE_UPSERT = b"""
INSERT INTO dict_rate_limit_policies AS p (endpoint_id, psp_category, capacity, refill_tokens,
    refill_period_sec, warning_threshold_percent, critical_threshold_percent, first_seen_at, last_seen_at,
    participant)
SELECT endpoint_id, %(category)s, capacity, refill_tokens, refill_period_sec, warning, critical,
       %(seen)s, %(seen)s, %(participant)s
  FROM unnest(%(names)s::text[], %(capacity)s::bigint[], %(refill)s::bigint[], %(period)s::integer[],
              %(warning)s::float8[], %(critical)s::float8[])
       AS t (endpoint_id, capacity, refill_tokens, refill_period_sec, warning, critical)
ON CONFLICT (endpoint_id, psp_category, participant) DO UPDATE
   SET capacity = EXCLUDED.capacity, refill_tokens = EXCLUDED.refill_tokens,
       refill_period_sec = EXCLUDED.refill_period_sec,
       warning_threshold_percent = EXCLUDED.warning_threshold_percent,
       critical_threshold_percent = EXCLUDED.critical_threshold_percent,
       first_seen_at = least(p.first_seen_at, EXCLUDED.first_seen_at),
       last_seen_at = EXCLUDED.last_seen_at, updated_at = now()
 WHERE p.last_seen_at <= EXCLUDED.last_seen_at"""
STATES = (
    "SELECT endpoint_id, psp_category, available_tokens, capacity, refill_tokens, refill_period_sec,"
    " utilization_percent, remaining_ratio, consumption_rate_per_minute, consumed_tokens,"
    " recovery_eta_seconds, exhaustion_projection_seconds, error_404_rate, response_time, correlation_id"
    " FROM dict_rate_limit_states ORDER BY endpoint_id, response_time"
)
POLICIES = (
    "SELECT endpoint_id, psp_category, capacity, refill_tokens, refill_period_sec,"
    " warning_threshold_percent, critical_threshold_percent, first_seen_at, last_seen_at"
    " FROM dict_rate_limit_policies ORDER BY endpoint_id, psp_category"
)


def _thresholds(name: str) -> PolicyThreshold:
    return PolicyThreshold(0.5, 0.25) if name == "P1" else PolicyThreshold(0.2, 0.1)


def storm() -> list[DerivedSnapshot]:
    """25 minutes at 30 s: P2's capacity changes at 8 min, the category changes at 16 min, P3 leaves at
    20 min; negative balances, a 404 share, a replay of an older snapshot, and the same snapshot twice."""
    result: list[DerivedSnapshot] = []
    previous: DerivedSnapshot | None = None
    for i in range(50):
        readings = [
            # Counts two snapshots in three: a 404 share (1/4) in some rows, NULL in the others.
            PolicyReading(
                "P1", 900 - 37 * i, 1000, 20, 60, ((200, 30 * i), (404, 10 * i)) if i % 3 else None
            ),
            PolicyReading("P2", 500, 2000 if i >= 16 else 1000, 20, 60),
        ]
        if i < 40:
            readings.append(PolicyReading("P3", 100 - 7 * i, 1000, 10, 1))
        category = "B" if i >= 32 else "A"
        snapshot = Snapshot(T0 + timedelta(seconds=30 * i), f"c{i}", category, tuple(readings))
        previous = derive(snapshot, previous)
        result.append(previous)
    return [*result[:20], result[5], *result[20:], result[-1]]


async def _reference(url: str, batch: list[DerivedSnapshot]) -> None:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        for derived in batch:
            found = rows_of(derived, _thresholds)
            async with conn.transaction():
                exists = await conn.execute(
                    b"SELECT 1 FROM dict_rate_limit_states WHERE response_time = %s",
                    [derived.snapshot.response_time],
                )
                if await exists.fetchone() is None:
                    async with conn.cursor().copy(REFERENCE_COPY) as copy:
                        for row in found:
                            await copy.write_row(row[: len(STATE_COLUMNS)])
                await conn.execute(REFERENCE_UPSERT, policy_params(derived, found))


@pytest.fixture
def two_databases(database_url: str, pg_server: str) -> Any:
    """The test's database and a second one on the same server (the reference writer's)."""
    name = f"{psycopg.conninfo.conninfo_to_dict(database_url)['dbname']}_ref"
    second = psycopg.conninfo.make_conninfo(database_url, dbname=name)
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(str(name))))
    for url in (database_url, second):
        migrations.apply(url)
    yield database_url, second
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(str(name))))


async def test_history_rows_are_those_of_the_every_row_upsert(two_databases: tuple[str, str]) -> None:
    mine, reference = two_databases
    batch = storm()
    writer = HistoryWriter(mine, queue_size=len(batch), thresholds=_thresholds)
    await writer.start()
    for derived in batch:
        await writer.write(derived)
    await writer.stop()
    await _reference(reference, batch)

    assert rows(mine, STATES) == rows(reference, STATES)
    assert len(rows(mine, STATES)) == 20 * 3 + 20 * 3 + 10 * 2
    got, expected = rows(mine, POLICIES), rows(reference, POLICIES)
    assert [row[:8] for row in got] == [row[:8] for row in expected]
    assert len(got) == 6  # P1, P2, P3 in categories A and B
    lags = [ref[8] - row[8] for row, ref in zip(got, expected, strict=True)]
    assert all(timedelta(0) <= lag < LAST_SEEN_REFRESH for lag in lags), lags
    assert any(lag > timedelta(0) for lag in lags)  # the unchanged rows were indeed not rewritten
    # P2 (category A) got its new capacity at 8 min and was refreshed 5 min later, at 13 min.
    p2 = {(row[0], row[1]): row for row in got}[("P2", "A")]
    assert (p2[2], p2[8]) == (2000, T0 + timedelta(minutes=13))


def _params(batch: list[DerivedSnapshot], index: int) -> dict[str, Any]:
    derived = batch[index]
    return policy_params(derived, rows_of(derived, _thresholds))


async def test_the_upsert_rewrites_only_rows_that_change(two_databases: tuple[str, str]) -> None:
    mine, _ = two_databases
    batch = storm()
    async with await psycopg.AsyncConnection.connect(mine, autocommit=True) as conn:

        async def rewritten(index: int) -> int:
            return (await conn.execute(UPSERT_POLICIES, _params(batch, index))).rowcount

        assert await rewritten(0) == 3  # new rows
        assert await rewritten(1) == 0  # 30 s later, nothing changed
        assert await rewritten(9) == 0  # 270 s: still within LAST_SEEN_REFRESH
        assert await rewritten(10) == 3  # 300 s: last_seen_at refreshed
        assert await rewritten(11) == 0
        assert await rewritten(16) == 1  # P2's capacity changed
        assert await rewritten(5) == 0  # an older snapshot never rolls values back


def test_policy_rows_sends_only_due_rows_and_remembers_only_commits() -> None:
    batch = storm()
    policy_rows = PolicyRows()
    first = policy_rows.due(batch[0], rows_of(batch[0], _thresholds))
    assert first is not None
    assert first["names"] == ["P1", "P2", "P3"]
    # Not committed (a failed transaction): still due.
    assert policy_rows.due(batch[1], rows_of(batch[1], _thresholds)) is not None
    policy_rows.committed(first)
    assert policy_rows.due(batch[1], rows_of(batch[1], _thresholds)) is None
    refreshed = policy_rows.due(batch[10], rows_of(batch[10], _thresholds))
    assert refreshed is not None
    assert refreshed["names"] == ["P1", "P2", "P3"]  # 300 s after the first
    policy_rows.committed(refreshed)
    changed = policy_rows.due(batch[16], rows_of(batch[16], _thresholds))
    assert changed is not None
    assert (changed["names"], changed["capacity"]) == (["P2"], [2000])
    policy_rows.committed(changed)
    assert policy_rows.due(batch[20], rows_of(batch[20], _thresholds)) is None  # the replay of 5
