"""The history writer against a real PostgreSQL: exactly-once rows, negative balances, policies and their
thresholds, the latest-states view, overflow accounting, auto-resolve, metrics and error classification."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from devstack.embedded import free_port
from exporter.config import PolicyThreshold
from exporter.history import migrations
from exporter.history.writer import HistoryWriter, disabled_collector, error_kind
from exporter.service.derivation import DerivedSnapshot, derive
from exporter.snapshot import PolicyReading, Snapshot

T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
POLICIES = ("ENTRIES_WRITE", "ENTRIES_READ_PARTICIPANT_ANTISCAN", "CLAIMS_READ")


def snapshots(
    count: int,
    *,
    start: datetime = T0,
    step: float = 30.0,
    balances: Sequence[int] | None = None,
    category: str = "A",
    names: Sequence[str] = POLICIES,
) -> list[DerivedSnapshot]:
    """``count`` consecutive derived snapshots, every policy at ``balances[i]`` (default: draining by 10)."""
    result: list[DerivedSnapshot] = []
    previous: DerivedSnapshot | None = None
    for i in range(count):
        available = balances[i] if balances is not None else 1000 - 10 * i
        readings = tuple(PolicyReading(name, available, 1000, 20, 60) for name in names)
        snapshot = Snapshot(start + timedelta(seconds=step * i), f"corr-{i}", category, readings)
        previous = derive(snapshot, previous)
        result.append(previous)
    return result


async def eventually(predicate: Callable[[], object], limit: float = 20.0) -> None:
    """Wait until ``predicate()`` is true; fails the test after ``limit`` seconds."""
    async with asyncio.timeout(limit):
        # Polling plain attributes and metric values: there is no event to wait on.
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def drained(writer: HistoryWriter) -> None:
    await eventually(lambda: writer.queue_depth == 0)


def rows(url: str, query: str, params: Sequence[object] = ()) -> list[tuple[object, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(query.encode(), params).fetchall()


def sample(writer: HistoryWriter, name: str, labels: dict[str, str] | None = None) -> float | None:
    registry = CollectorRegistry()
    registry.register(writer.collector)
    return registry.get_sample_value(name, labels or {})


Alert = tuple[str, str, str, str | None, datetime]  # fingerprint, alert name, severity, endpoint, startsAt


def insert_alert(conn: psycopg.Connection[tuple[object, ...]], alert: Alert) -> None:
    """A firing alert as the receiver records it (only the columns auto-resolve reads matter here)."""
    conn.execute(
        "INSERT INTO dict_rate_limit_alerts (fingerprint, alert_name, severity, endpoint_id,"
        " status, starts_at, labels, annotations, payload)"
        " VALUES (%s, %s, %s, %s, 'firing', %s, '{}', '{}', '{}')",
        list(alert),
    )


@pytest.fixture
def migrated(database_url: str) -> str:
    migrations.apply(database_url)
    return database_url


async def test_duplicated_snapshots_are_stored_exactly_once(migrated: str) -> None:
    writer = HistoryWriter(migrated, queue_size=100)
    await writer.start()
    batch = snapshots(5)
    for derived in [*batch, *batch, batch[2]]:
        writer.submit(derived)
    await drained(writer)
    assert await writer.write(batch[0]) == 0  # a retried write of a stored snapshot inserts nothing
    await writer.stop()
    counts = rows(
        migrated,
        "SELECT endpoint_id, count(*), count(DISTINCT response_time) FROM dict_rate_limit_states GROUP BY 1",
    )
    assert sorted(counts) == sorted((name, 5, 5) for name in POLICIES)
    assert sample(writer, "dict_rate_limit_history_rows_written_total") == 15
    assert writer.database_ok


async def test_two_writers_on_the_same_snapshots_never_duplicate_rows(migrated: str) -> None:
    first, second = HistoryWriter(migrated, queue_size=50), HistoryWriter(migrated, queue_size=50)
    await first.start()
    await second.start()
    for derived in snapshots(10):
        first.submit(derived)
        second.submit(derived)
    await drained(first)
    await drained(second)
    await first.stop()
    await second.stop()
    assert rows(
        migrated, "SELECT count(*), count(DISTINCT (endpoint_id, response_time)) FROM dict_rate_limit_states"
    ) == [(30, 30)]
    written = sample(first, "dict_rate_limit_history_rows_written_total") or 0
    assert written + (sample(second, "dict_rate_limit_history_rows_written_total") or 0) == 30


async def test_stored_values_match_the_snapshot_including_negative_balances(migrated: str) -> None:
    writer = HistoryWriter(migrated, queue_size=10)
    await writer.start()
    batch = snapshots(2, balances=[100, -17])
    for derived in batch:
        writer.submit(derived)
    await writer.stop()
    stored = rows(
        migrated,
        "SELECT available_tokens, capacity, refill_tokens, refill_period_sec, utilization_percent,"
        " remaining_ratio, consumed_tokens, consumption_rate_per_minute, recovery_eta_seconds,"
        " exhaustion_projection_seconds,"
        " error_404_rate, response_time, correlation_id, psp_category"
        " FROM dict_rate_limit_states WHERE endpoint_id = 'ENTRIES_WRITE' ORDER BY response_time",
    )
    first, second = stored
    assert first == (100, 1000, 20, 60, 90.0, 0.1, None, None, 2700.0, None, None, T0, "corr-0", "A")
    state = batch[1].states[0]
    assert second == (
        -17, 1000, 20, 60, state.utilization_percent, -0.017, 127.0, 254.0,
        3051.0, 0.0, None, T0 + timedelta(seconds=30), "corr-1", "A",
    )  # fmt: skip
    assert state.utilization_percent == pytest.approx(101.7)  # 117 net + 10 refilled in 30 s = 127 consumed


async def test_policies_are_upserted_with_their_thresholds_and_the_view_uses_them(migrated: str) -> None:
    overrides = {"ENTRIES_WRITE": PolicyThreshold(warning=0.5, critical=0.3)}

    def thresholds(name: str) -> PolicyThreshold:
        return overrides.get(name, PolicyThreshold(warning=0.2, critical=0.1))

    writer = HistoryWriter(migrated, queue_size=10, thresholds=thresholds)
    await writer.start()
    for derived in snapshots(3, balances=[1000, 700, 400]):
        writer.submit(derived)
    await writer.stop()
    policies = rows(
        migrated,
        "SELECT endpoint_id, psp_category, capacity, warning_threshold_percent, critical_threshold_percent,"
        " first_seen_at, last_seen_at FROM dict_rate_limit_policies ORDER BY 1",
    )
    last = T0 + timedelta(seconds=60)
    assert policies == [
        ("CLAIMS_READ", "A", 1000, 20.0, 10.0, T0, last),
        ("ENTRIES_READ_PARTICIPANT_ANTISCAN", "A", 1000, 20.0, 10.0, T0, last),
        ("ENTRIES_WRITE", "A", 1000, 50.0, 30.0, T0, last),
    ]
    latest = rows(
        migrated,
        "SELECT endpoint_id, available_tokens, status FROM v_dict_rate_limit_latest_states ORDER BY 1",
    )
    assert latest == [
        ("CLAIMS_READ", 400, "OK"),
        ("ENTRIES_READ_PARTICIPANT_ANTISCAN", 400, "OK"),
        ("ENTRIES_WRITE", 400, "WARNING"),
    ]


async def test_latest_states_has_one_row_per_endpoint_after_a_category_change(migrated: str) -> None:
    writer = HistoryWriter(migrated, queue_size=10)
    await writer.start()
    for derived in [
        *snapshots(2, balances=[500, 150]),
        *snapshots(1, start=T0 + timedelta(minutes=5), balances=[50], category="B"),
    ]:
        writer.submit(derived)
    await writer.stop()
    assert rows(migrated, "SELECT count(*) FROM dict_rate_limit_policies") == [
        (6,)
    ]  # 3 policies x 2 categories
    latest = rows(
        migrated,
        "SELECT endpoint_id, psp_category, available_tokens, status FROM v_dict_rate_limit_latest_states",
    )
    assert sorted(latest) == sorted((name, "B", 50, "CRITICAL") for name in POLICIES)


async def test_a_full_queue_drops_the_oldest_snapshots_and_counts_them(migrated: str) -> None:
    writer = HistoryWriter(migrated, queue_size=3)
    batch = snapshots(7)
    for derived in batch:  # not started yet: nothing is written, so the queue overflows
        writer.submit(derived)
    assert writer.queue_depth == 3
    assert sample(writer, "dict_rate_limit_history_dropped_total") == 4
    assert sample(writer, "dict_rate_limit_history_queue_capacity") == 3
    await writer.start()
    await drained(writer)
    await writer.stop()
    stored = rows(migrated, "SELECT DISTINCT response_time FROM dict_rate_limit_states ORDER BY 1")
    assert [t for (t,) in stored] == [d.snapshot.response_time for d in batch[4:]]


async def test_a_snapshot_in_a_month_without_partition_gets_one(migrated: str) -> None:
    # A month long before the retention window that maintenance prepares (a snapshot more than a day
    # ahead of the clock is set aside instead: tests/test_history_poison.py).
    far = datetime(2019, 7, 15, 12, tzinfo=UTC)
    writer = HistoryWriter(migrated, queue_size=3)
    await writer.start()
    writer.submit(snapshots(1, start=far)[0])
    await writer.stop()
    assert rows(migrated, "SELECT count(*) FROM dict_rate_limit_states_2019_07") == [(3,)]


async def test_auto_resolve_resolves_only_alerts_whose_policy_recovered(migrated: str) -> None:
    writer = HistoryWriter(migrated, queue_size=50, thresholds=lambda name: PolicyThreshold(0.5, 0.3))
    await writer.start()
    start = datetime.now(UTC) - timedelta(minutes=20)
    # 0-5 min: drained (CRITICAL); 5-20 min: back to 90 % for ENTRIES_WRITE and CLAIMS_READ only.
    for derived in snapshots(6, start=start, step=60, balances=[50] * 6):
        writer.submit(derived)
    for derived in snapshots(
        15, start=start + timedelta(minutes=6), step=60, balances=[900] * 15, names=POLICIES[::2]
    ):
        writer.submit(derived)
    # ENTRIES_READ_PARTICIPANT_ANTISCAN recovers to 40 %: above critical (30 %) but below its warning (50 %).
    for derived in snapshots(
        15, start=start + timedelta(minutes=6), step=60, balances=[400] * 15, names=POLICIES[1:2]
    ):
        writer.submit(derived)
    await writer.stop()
    alerts = [
        ("f1", "DICTRateLimitCritical", "critical", "ENTRIES_WRITE", start + timedelta(minutes=2)),
        (
            "f2",
            "DICTRateLimitWarning",
            "warning",
            "ENTRIES_READ_PARTICIPANT_ANTISCAN",
            start + timedelta(minutes=2),
        ),
        (
            "f3",
            "DICTRateLimitCritical",
            "critical",
            "ENTRIES_READ_PARTICIPANT_ANTISCAN",
            start + timedelta(minutes=2),
        ),
        ("f4", "DICTRateLimitBridgeDown", "critical", None, start),  # a health alert: never auto-resolved
        (
            "f5",
            "DICTRateLimitCritical",
            "critical",
            "CLAIMS_READ",
            datetime.now(UTC),
        ),  # started after the latest state
    ]
    with psycopg.connect(migrated) as conn:
        for alert in alerts:
            insert_alert(conn, alert)
        conn.commit()
        assert conn.execute("SELECT auto_resolve_alerts()").fetchone() == (2,)
        conn.commit()
        assert conn.execute("SELECT auto_resolve_alerts()").fetchone() == (0,)
    resolved = rows(
        migrated,
        "SELECT fingerprint, status, resolved_by, resolved_at IS NOT NULL"
        " FROM dict_rate_limit_alerts ORDER BY 1",
    )
    assert resolved == [
        ("f1", "resolved", "auto_resolve", True),
        ("f2", "firing", None, False),
        ("f3", "resolved", "auto_resolve", True),
        ("f4", "firing", None, False),
        ("f5", "firing", None, False),
    ]
    active = rows(migrated, "SELECT fingerprint, age_seconds FROM v_dict_rate_limit_active_alerts ORDER BY 1")
    assert [f for f, _ in active] == ["f2", "f4", "f5"]
    assert 20 * 60 <= int(str(active[1][1])) < 25 * 60


async def test_auto_resolve_waits_for_the_grace_period(migrated: str) -> None:
    writer = HistoryWriter(migrated, queue_size=50)
    await writer.start()
    start = datetime.now(UTC) - timedelta(minutes=10)
    # Below 10 % until 2 minutes ago, then 90 %: recovered, but for less than the default 5-minute grace.
    for derived in snapshots(10, start=start, step=60, balances=[50] * 8 + [900] * 2, names=POLICIES[:1]):
        writer.submit(derived)
    await writer.stop()
    with psycopg.connect(migrated) as conn:
        insert_alert(
            conn, ("f", "DICTRateLimitCritical", "critical", "ENTRIES_WRITE", start + timedelta(minutes=3))
        )
        assert conn.execute("SELECT auto_resolve_alerts()").fetchone() == (0,)
        assert conn.execute("SELECT auto_resolve_alerts(interval '90 seconds')").fetchone() == (1,)


async def test_maintenance_runs_at_start_up_and_is_counted(migrated: str) -> None:
    observed: list[tuple[str, float]] = []
    writer = HistoryWriter(migrated, queue_size=3, observe=lambda op, seconds: observed.append((op, seconds)))
    await writer.start()
    writer.submit(snapshots(1)[0])
    await eventually(lambda: writer.maintenance.last_success_timestamp)
    await drained(writer)
    await writer.stop()
    assert sample(writer, "dict_rate_limit_maintenance_runs_total", {"result": "success"}) == 1
    assert sample(writer, "dict_rate_limit_maintenance_runs_total", {"result": "failure"}) == 0
    assert (
        sample(writer, "dict_rate_limit_maintenance_last_success_timestamp_seconds") or 0
    ) > time.time() - 60
    assert {op for op, _ in observed} == {"maintenance", "history_write"}
    assert writer.maintenance.last_summary is not None
    assert writer.maintenance.last_summary["dropped"] == []


async def test_metrics_exist_from_the_start_and_render(migrated: str) -> None:
    writer = HistoryWriter(migrated, queue_size=7)
    text = generate_latest(_registry(writer)).decode()
    for line in [
        "dict_rate_limit_history_enabled 1.0",
        "dict_rate_limit_history_queue_depth 0.0",
        "dict_rate_limit_history_queue_capacity 7.0",
        "dict_rate_limit_history_rows_written_total 0.0",
        'dict_rate_limit_history_write_errors_total{kind="connection"} 0.0',
        'dict_rate_limit_history_write_errors_total{kind="query"} 0.0',
        'dict_rate_limit_history_write_errors_total{kind="other"} 0.0',
        "dict_rate_limit_history_dropped_total 0.0",
        "dict_rate_limit_history_write_duration_seconds_count 0.0",
        'dict_rate_limit_maintenance_runs_total{result="success"} 0.0',
        "dict_rate_limit_maintenance_last_success_timestamp_seconds 0.0",
    ]:
        assert line in text.splitlines(), line


def _registry(writer: HistoryWriter) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(writer.collector)
    return registry


def test_disabled_history_says_so_with_a_metric() -> None:
    registry = CollectorRegistry()
    registry.register(disabled_collector())
    assert registry.get_sample_value("dict_rate_limit_history_enabled") == 0


async def test_errors_are_classified_connection_or_query(database_url: str) -> None:
    with pytest.raises(psycopg.OperationalError) as refused:
        await psycopg.AsyncConnection.connect(
            f"postgresql://postgres@127.0.0.1:{free_port()}/x", connect_timeout=2
        )
    assert error_kind(refused.value) == "connection"
    with psycopg.connect(database_url) as conn, pytest.raises(psycopg.errors.UndefinedTable) as missing:
        conn.execute("SELECT * FROM dict_rate_limit_states")
    assert error_kind(missing.value) == "query"
    assert error_kind(RuntimeError("x")) == "other"
    assert error_kind(ValueError("x")) == "data"  # the driver could not adapt a value: permanent


async def test_writes_before_migrate_are_query_errors_and_succeed_once_migrated(database_url: str) -> None:
    writer = HistoryWriter(database_url, queue_size=5, retry_max_delay=0.2)
    await writer.start()
    writer.submit(snapshots(1)[0])
    await eventually(lambda: sample(writer, "dict_rate_limit_history_write_errors_total", {"kind": "query"}))
    assert writer.queue_depth == 1
    assert not writer.database_ok
    await migrations.migrate_async(database_url)
    await drained(writer)
    await writer.stop()
    assert rows(database_url, "SELECT count(*) FROM dict_rate_limit_states") == [(3,)]
    assert sample(writer, "dict_rate_limit_history_write_errors_total", {"kind": "connection"}) == 0
