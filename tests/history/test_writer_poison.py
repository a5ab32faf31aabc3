"""Poison snapshots against the real writer and PostgreSQL: a snapshot that no retry can store is set aside
with its reason (kept, counted), the next good one is stored within one interval, health names the real
cause; "latest" survives a row dated 9999-12-31 already stored."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from exporter.history import migrations
from exporter.history.writer import HistoryWriter, error_kind
from exporter.service.derivation import DerivedSnapshot, derive
from exporter.snapshot import PolicyReading, Snapshot
from tests.history.test_writer import drained, eventually, rows, sample, snapshots

NOW = datetime.now(UTC).replace(microsecond=0)


def one(
    name: str = "ENTRIES_WRITE",
    *,
    at: datetime = NOW,
    correlation_id: str = "corr",
    period: int = 60,
    capacity: int = 1000,
) -> DerivedSnapshot:
    reading = PolicyReading(name, 500, capacity, 20, period)
    return derive(Snapshot(at, correlation_id, "A", (reading,)), None)


@pytest.fixture
def migrated(database_url: str) -> str:
    migrations.apply(database_url)
    return database_url


def rejected(writer: HistoryWriter, reason: str) -> float:
    return sample(writer, "dict_rate_limit_history_rejected_snapshots_total", {"reason": reason}) or 0


POISON = [
    ("nul_in_policy", one("ENTRIES\x00WRITE", at=NOW - timedelta(seconds=60)), "invalid_text"),
    ("nul_in_correlation_id", one(correlation_id="c\x00x", at=NOW - timedelta(seconds=60)), "invalid_text"),
    ("surrogate_in_policy", one("ENTRIES\udc80", at=NOW - timedelta(seconds=60)), "invalid_text"),
    ("capacity_above_bigint", one(capacity=2**63, at=NOW - timedelta(seconds=60)), "out_of_range"),
    ("dated_9999", one(at=datetime(9999, 12, 31, tzinfo=UTC)), "implausible_time"),
]


@pytest.mark.parametrize(("case", "poison", "reason"), POISON, ids=[p[0] for p in POISON])
async def test_a_poison_snapshot_is_set_aside_and_the_next_one_is_stored_at_once(
    migrated: str, case: str, poison: DerivedSnapshot, reason: str
) -> None:
    writer = HistoryWriter(migrated, queue_size=10, retry_max_delay=0.2)
    await writer.start()
    good = one(at=NOW)
    writer.submit(poison)
    writer.submit(good)
    await eventually(lambda: writer.queue_depth == 0, limit=10)  # well within one 30 s poll interval
    await writer.stop()
    assert rows(migrated, "SELECT response_time, correlation_id FROM dict_rate_limit_states") == [
        (NOW, "corr")
    ]
    assert rejected(writer, reason) == 1, case
    assert writer.database_ok
    assert writer.database_status == "ok"
    [(kept_reason, error, text)] = rows(
        migrated, "SELECT reason, error, snapshot FROM dict_rate_limit_rejected_snapshots"
    )
    assert kept_reason == reason
    assert error
    assert "ENTRIES" in str(text)  # the snapshot is kept, escaped, for the operator
    # Retrying was not what moved the queue on: at most the one failed attempt.
    assert (sample(writer, "dict_rate_limit_history_write_errors_total", {"kind": "connection"}) or 0) == 0


async def test_refill_period_beyond_int32_is_stored_since_0005(migrated: str) -> None:
    writer = HistoryWriter(migrated, queue_size=5)
    await writer.start()
    writer.submit(one(period=2**40))
    await drained(writer)
    await writer.stop()
    assert rows(migrated, "SELECT refill_period_sec FROM dict_rate_limit_states") == [(2**40,)]
    assert rows(migrated, "SELECT refill_period_sec FROM dict_rate_limit_policies") == [(2**40,)]


async def test_health_names_a_missing_schema_not_an_unreachable_database(database_url: str) -> None:
    writer = HistoryWriter(database_url, queue_size=5, retry_max_delay=0.2)
    await writer.start()
    writer.submit(snapshots(1)[0])
    await eventually(lambda: not writer.database_ok and writer.database_status != "no write yet")
    status = writer.database_status
    await writer.stop()
    assert status.startswith("schema not migrated (run `dict-rate-limit migrate`)"), status
    assert "unreachable" not in status


def test_a_nul_refused_by_the_driver_is_data_not_a_lost_connection() -> None:
    # psycopg raises this DataError without a SQLSTATE: it used to be classified as "connection".
    assert error_kind(psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes")) == "data"
    assert error_kind(psycopg.OperationalError("server closed the connection unexpectedly")) == "connection"


async def test_latest_survives_a_row_dated_9999_already_stored(migrated: str) -> None:
    """A bad row stored before 0005's guard (written here directly) is never "latest", and the policies
    table keeps following the real snapshots."""
    far = datetime(9999, 12, 31, tzinfo=UTC)
    writer = HistoryWriter(migrated, queue_size=5)
    await writer.start()
    writer.submit(one(at=NOW - timedelta(minutes=2)))
    await drained(writer)
    # In a thread: the writer's own tasks (maintenance holds the partition lock) run on this event loop.
    await asyncio.to_thread(_store_far_future_row, migrated, far)
    writer.submit(one(at=NOW, capacity=2000))
    await drained(writer)
    await writer.stop()
    assert rows(
        migrated, "SELECT response_time, correlation_id, capacity FROM v_dict_rate_limit_latest_states"
    ) == [(NOW, "corr", 2000)]
    assert rows(migrated, "SELECT last_seen_at, capacity FROM dict_rate_limit_policies") == [(NOW, 2000)]


def _store_far_future_row(url: str, far: datetime) -> None:
    """What a writer without today's guard stored: every row copied to ``far``, the policy stamped ``far``."""
    with psycopg.connect(url) as conn:
        conn.execute("SELECT create_dict_rate_limit_state_partition(%s)", [far.date()])
        conn.execute(
            "INSERT INTO dict_rate_limit_states SELECT endpoint_id, psp_category, 1, capacity, refill_tokens,"
            " refill_period_sec, utilization_percent, remaining_ratio, consumption_rate_per_minute,"
            " consumed_tokens, recovery_eta_seconds, exhaustion_projection_seconds, error_404_rate, %s,"
            " 'forged', created_at FROM dict_rate_limit_states",
            [far],
        )
        conn.execute("UPDATE dict_rate_limit_policies SET last_seen_at = %s, capacity = 1", [far])


def test_migration_0005_repairs_a_policy_stamped_in_the_far_future(database_url: str) -> None:
    migrations.apply(database_url, to=3)
    far = datetime(9999, 12, 31, tzinfo=UTC)
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO dict_rate_limit_policies (endpoint_id, psp_category, capacity, refill_tokens,"
            " refill_period_sec, first_seen_at, last_seen_at) VALUES ('P', 'A', 1, 1, 1, %s, %s)",
            [NOW, far],
        )
    migrations.apply(database_url)
    assert rows(database_url, "SELECT last_seen_at FROM dict_rate_limit_policies") == [(NOW,)]


def test_migration_0005_moves_state_rows_dated_9999_out_of_the_history(database_url: str) -> None:
    """Rows stored before the guard: after 0005 nothing reading dict_rate_limit_states sees them (the
    auto-resolve function of 0002 included), and they are kept in the set-aside table."""
    migrations.apply(database_url, to=3)
    far = datetime(9999, 12, 31, tzinfo=UTC)
    with psycopg.connect(database_url) as conn:
        for moment in (NOW, far):
            conn.execute("SELECT create_dict_rate_limit_state_partition(%s)", [moment.date()])
            conn.execute(
                "INSERT INTO dict_rate_limit_states (endpoint_id, psp_category, available_tokens, capacity,"
                " refill_tokens, refill_period_sec, utilization_percent, remaining_ratio,"
                " recovery_eta_seconds, response_time) VALUES ('P', 'A', 1, 1, 1, 1, 0, 1, 0, %s)",
                [moment],
            )
    migrations.apply(database_url)
    assert rows(database_url, "SELECT response_time FROM dict_rate_limit_states") == [(NOW,)]
    assert rows(database_url, "SELECT reason, response_time FROM dict_rate_limit_rejected_snapshots") == [
        ("implausible_time", far)
    ]
