"""The history writer: every derived snapshot into PostgreSQL, in order, through a bounded queue.

A database outage never blocks polling or /metrics: :meth:`HistoryWriter.submit` only appends to an
in-memory queue (the oldest snapshot is dropped, counted and logged when it is full) and one background
task writes the queue head, retrying with backoff until it succeeds. Each snapshot is one transaction:
COPY into a per-connection temporary table, then ``INSERT ... ON CONFLICT DO NOTHING`` into
``dict_rate_limit_states`` (so a retried write, a duplicate or a second replica never duplicates a row)
and an upsert of the ``dict_rate_limit_policies`` rows that change something (see history_sql.PolicyRows).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from exporter import dsn
from exporter.backoff import Backoff
from exporter.config import PolicyThreshold
from exporter.history.maintenance import Maintenance
from exporter.history.statements import (
    CLEAR_INCOMING,
    COPY_INCOMING,
    COPY_STATES,
    CREATE_INCOMING,
    INSERT_INCOMING,
    PRUNE_SET_ASIDE,
    SET_ASIDE,
    UPSERT_POLICIES,
    PolicyRows,
    copy_rows,
    rows_of,
)
from exporter.logsetup import printable
from exporter.service.derivation import DerivedSnapshot

log = logging.getLogger(__name__)

ERROR_KINDS = ("connection", "query", "data", "other")
#: Why a snapshot was set aside (dict_rate_limit_history_rejected_snapshots_total{reason}).
REJECT_REASONS = ("invalid_text", "out_of_range", "invalid_value", "implausible_time", "retries_exhausted")
#: Failures of one snapshot that are neither the connection nor a missing schema, tolerated before it is
#: set aside: an unknown error may be transient (a lock timeout), but must not block the queue for ever.
MAX_ATTEMPTS = 5
#: A snapshot dated later than this ahead of the local clock is not stored (docs/history.md): stored, it
#: would be every policy's "latest" until that date.
MAX_FUTURE = timedelta(days=1)
#: SQLSTATEs saying the schema is not (fully) migrated: retried (running `migrate` fixes them), reported.
SCHEMA_STATES = frozenset({"42P01", "42703", "42883", "3F000"})
#: One snapshot is ~1 ms on loopback; a slow disk or a busy server is seconds.
FAILURE_LOG_INTERVAL = 60.0
WRITE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def error_kind(exc: BaseException) -> str:  # noqa: PLR0911 - one return per kind reads best
    """Why a write failed, which decides whether retrying can help.

    ``connection``: the server is unreachable or went away (retry). ``data``: a value PostgreSQL cannot
    store (class 22/23/54, or refused by the driver before sending, such as a NUL in text): permanent, the
    snapshot is set aside. ``query``: the server refused the statement (a schema not migrated...).
    ``other``: anything else.
    """
    if isinstance(exc, PoolTimeout | OSError):
        return "connection"
    if isinstance(exc, psycopg.Error):
        state = exc.sqlstate
        if isinstance(exc, psycopg.DataError | psycopg.IntegrityError) or (state or "")[:2] in {
            "22",
            "23",
            "54",
        }:
            return "data"
        # No SQLSTATE on an operational error: the connection is lost; 08 and 57P0x: the server says so.
        if state is None and isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
            return "connection"
        if state is not None and (state.startswith("08") or state in {"57P01", "57P02", "57P03"}):
            return "connection"
        return "query"
    if isinstance(exc, ValueError | OverflowError | TypeError):  # the driver could not adapt a value
        return "data"
    return "other"


def reject_reason(exc: BaseException) -> str:
    """The bounded reason of a ``data`` error: what kind of value PostgreSQL (or the driver) refused."""
    state = exc.sqlstate if isinstance(exc, psycopg.Error) else None
    if isinstance(exc, UnicodeError) or state in {"22021", "22P05"} or "NUL" in str(exc):
        return "invalid_text"
    if isinstance(exc, OverflowError) or state in {"22003", "22008"}:
        return "out_of_range"
    return "invalid_value"


def _escaped(text: object) -> str:
    """Storable text: control characters (NUL included) and lone surrogates as escapes."""
    return printable(text).encode("utf-8", "backslashreplace").decode()


def snapshot_text(derived: DerivedSnapshot) -> str:
    """The snapshot as JSON text with every character escaped, so that even a NUL can be kept."""
    snapshot = derived.snapshot
    document = {
        "response_time": snapshot.response_time.isoformat(),
        "correlation_id": snapshot.correlation_id,
        "category": snapshot.category,
        "policies": [dataclasses.asdict(reading) for reading in snapshot.policies],
    }
    if derived.participant:
        document["participant"] = derived.participant
    return json.dumps(document, ensure_ascii=True, default=str)


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    await conn.execute(CREATE_INCOMING)
    await conn.commit()


class HistoryWriter:
    """Writes derived snapshots to PostgreSQL in order; see the module docstring."""

    def __init__(
        self,
        database_url: str,
        *,
        queue_size: int,
        retention_months: int = 13,
        maintenance_interval: float = 86400.0,
        max_connections: int = 4,
        min_connections: int = 1,
        connect_timeout: float = 5.0,
        observe: Callable[[str, float], None] | None = None,
        thresholds: Callable[[str], PolicyThreshold] | None = None,
        participant_thresholds: Mapping[str, Callable[[str], PolicyThreshold]] | None = None,
        retry_max_delay: float = 10.0,
        ping_interval: float = 15.0,
    ) -> None:
        psycopg.conninfo.conninfo_to_dict(database_url)  # a malformed URL fails here, not in the background
        self._queue: deque[DerivedSnapshot] = deque()
        self._queue_size = queue_size
        self._inflight = 0
        # Bumped by every change of the writer's metrics, so a scrape re-renders them only after one.
        self._version = 0
        self._rendered: tuple[int, bytes] | None = None
        self._observe = observe
        self._thresholds = thresholds
        #: A multi-participant exporter's thresholds by participant name (a snapshot's ``participant``).
        self._participant_thresholds = dict(participant_thresholds or {})
        self._retry_max_delay = retry_max_delay
        self._ping_interval = ping_interval
        self._months: set[date] = set()
        self._policy_rows = PolicyRows()
        self._ok = False
        self._status = "no write yet"
        self._attempts = 0
        self._last_warning = 0.0
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()  # set while the queue is empty and nothing is being written
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # reconnect_timeout bounds the pool's own reconnection backoff; once it gives up, the next write
        # attempt starts a fresh one, so a long outage is followed by a quick recovery.
        self._pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            database_url,
            min_size=min(min_connections, max_connections),
            max_size=max_connections,
            kwargs={"connect_timeout": dsn.connect_timeout(connect_timeout)},
            open=False,
            configure=_configure,
            check=AsyncConnectionPool.check_connection,
            reconnect_timeout=max(1.0, 3 * retry_max_delay),
            timeout=max(1.0, retry_max_delay),
            name="dict-rate-limit-history",
        )
        self.maintenance = Maintenance(
            self._pool, retention_months=retention_months, interval=maintenance_interval, observe=observe
        )
        self.rows_written = Counter(
            "dict_rate_limit_history_rows_written",
            "State rows written to dict_rate_limit_states.",
            registry=None,
        )
        self.write_errors = Counter(
            "dict_rate_limit_history_write_errors",
            "Failed snapshot write attempts by kind (the snapshot stays queued and is retried).",
            ["kind"],
            registry=None,
        )
        for kind in ERROR_KINDS:
            self.write_errors.labels(kind)
        self.rejected = Counter(
            "dict_rate_limit_history_rejected_snapshots",
            "Snapshots set aside (not stored) because retrying could never store them, by reason"
            " (kept in dict_rate_limit_rejected_snapshots).",
            ["reason"],
            registry=None,
        )
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        self.dropped = Counter(
            "dict_rate_limit_history_dropped",
            "Snapshots dropped because the history queue was full (oldest first).",
            registry=None,
        )
        self.write_duration = Histogram(
            "dict_rate_limit_history_write_duration_seconds",
            "Time to write one snapshot to PostgreSQL.",
            buckets=WRITE_BUCKETS,
            registry=None,
        )
        self.collector: Collector = _HistoryCollector(self)
        self._registry = CollectorRegistry()
        self._registry.register(self.collector)

    @property
    def database_ok(self) -> bool:
        """True when the last write or ping succeeded (readiness)."""
        return self._ok

    @property
    def metrics_version(self) -> int:
        """Changes whenever one of the writer's metrics (maintenance's included) may have changed."""
        return self._version + self.maintenance.version

    def render_metrics(self) -> bytes:
        """The text exposition of :attr:`collector`, rendered again only after a change."""
        version = self.metrics_version
        if self._rendered is None or self._rendered[0] != version:
            self._rendered = (version, generate_latest(self._registry))
        return self._rendered[1]

    @property
    def database_status(self) -> str:
        """``ok``, or the cause of the last failure in words: unreachable, schema not migrated, refused."""
        return "ok" if self._ok else self._status

    @property
    def queue_depth(self) -> int:
        return len(self._queue) + self._inflight

    @property
    def queue_capacity(self) -> int:
        return self._queue_size

    async def start(self) -> None:
        """Open the pool in the background (a database that is down is retried, not fatal) and start tasks."""
        self._loop = asyncio.get_running_loop()
        await self._pool.open(wait=False)
        self._tasks = [
            asyncio.create_task(self._write_loop(), name="history-writer"),
            asyncio.create_task(self.maintenance.loop(), name="history-maintenance"),
        ]

    def submit(self, derived: DerivedSnapshot) -> None:
        """Queue a snapshot; never blocks, never raises. A full queue drops (and counts) its oldest."""
        try:
            if len(self._queue) >= self._queue_size:
                oldest = self._queue.popleft()
                self.dropped.inc()
                log.warning(
                    "history queue full (%d): dropped the snapshot of %s",
                    self._queue_size,
                    oldest.snapshot.response_time.isoformat(),
                )
            self._queue.append(derived)
            self._version += 1
            self._wake()
        except Exception:  # pragma: no cover - submit must never break the poller
            log.exception("history submit failed")

    def _wake(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._queued()
        else:
            loop.call_soon_threadsafe(self._queued)

    def _queued(self) -> None:
        self._idle.clear()
        self._wakeup.set()

    # The interface (shared with the exporter) takes a plain timeout: stop() is called from shutdown paths.
    async def stop(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Write what can be written within ``timeout``, then stop the tasks and close the pool."""
        deadline = time.monotonic() + timeout
        if self._tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout)
        if self.queue_depth:
            log.warning("history stopped with %d snapshot(s) not written", self.queue_depth)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self._pool.close(timeout=max(0.1, deadline - time.monotonic()))

    async def _write_loop(self) -> None:
        # Retries of the queue head: from 0.1 s doubling up to retry_max_delay, reset after a success.
        backoff = Backoff(0.1, max(0.1, self._retry_max_delay))
        while True:
            if not self._queue:
                self._idle.set()
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), self._ping_interval)
                except TimeoutError:
                    await self._ping()
                continue
            self._idle.clear()
            derived = self._queue.popleft()
            self._inflight = 1
            try:
                await self._write_or_set_aside(derived)
                backoff.reset()
                delay = 0.0
            except Exception:
                self._requeue(derived)
                delay = backoff.next()
            finally:
                self._inflight = 0
                self._version += 1  # whatever the attempt changed: counters, queue, set-aside
            if delay:
                await asyncio.sleep(delay)

    async def _write_or_set_aside(self, derived: DerivedSnapshot) -> None:
        """Writes the snapshot, or sets it aside when no retry could store it; raises to retry it."""
        if derived.snapshot.response_time > datetime.now(UTC) + MAX_FUTURE:
            await self._set_aside(derived, "implausible_time", "response_time is more than 1 day ahead")
            return
        try:
            await self.write(derived)
            self._attempts = 0
            return
        except Exception as exc:
            kind = self._failed(exc)
            self._attempts += 1
            if kind == "data":
                reason = reject_reason(exc)
            elif kind in {"query", "other"} and self._attempts >= MAX_ATTEMPTS and not _schema(exc):
                reason = "retries_exhausted"
            else:
                raise
            error = f"{type(exc).__name__}: {exc}"
        await self._set_aside(derived, reason, error)

    async def _set_aside(self, derived: DerivedSnapshot, reason: str, error: str) -> None:
        """Keeps the snapshot in dict_rate_limit_rejected_snapshots and moves on to the next one.

        Raises (so the snapshot is retried) only when the database is unreachable; a set-aside table that
        cannot be written otherwise (a schema before 0005) still lets the queue move: the loss is counted.
        """
        snapshot = derived.snapshot
        self._attempts = 0
        self.rejected.labels(reason).inc()
        log.warning(
            "history: snapshot set aside, not stored (%s)",
            reason,
            extra={
                "ctx": {"response_time": snapshot.response_time.isoformat(), "error": printable(error)[:500]}
            },
        )
        params = [
            snapshot.response_time,
            _escaped(snapshot.correlation_id),
            _escaped(snapshot.category),
            reason,
            _escaped(error)[:2000],
            snapshot_text(derived),
        ]
        try:
            async with self._pool.connection() as conn:
                await conn.execute(SET_ASIDE, params)
                await conn.execute(PRUNE_SET_ASIDE)
        except Exception as exc:
            if error_kind(exc) == "connection":
                raise
            log.warning("history: could not keep the set-aside snapshot (dropped): %s", exc)
        # The database answered: it is reachable, whatever the snapshot held.
        self._ok = True

    def _requeue(self, derived: DerivedSnapshot) -> None:
        # Back at the head to keep the order; if new snapshots filled the queue meanwhile, it is the oldest.
        if len(self._queue) >= self._queue_size:
            self.dropped.inc()
            log.warning("history queue full: dropped the snapshot of %s", derived.snapshot.response_time)
        else:
            self._queue.appendleft(derived)

    def _failed(self, exc: Exception) -> str:
        kind = error_kind(exc)
        self.write_errors.labels(kind).inc()
        if kind == "data":
            return kind  # the database is up: it refused this snapshot's values (set aside by the caller)
        # The first failure, then one line a minute: an hour-long outage must not flood the logs.
        now = time.monotonic()
        if self._ok or now - self._last_warning >= FAILURE_LOG_INTERVAL:
            self._last_warning = now
            log.warning("history write failed (%s, %d queued, retrying): %s", kind, self.queue_depth, exc)
        self._ok = False
        self._status = _cause(kind, exc)
        return kind

    async def write(self, derived: DerivedSnapshot) -> int:
        """Write one snapshot in one transaction; return the rows inserted (0 when already stored).

        The fast path COPYs straight into the table (measured ~3x cheaper than staging the rows); the
        primary key refuses a snapshot already stored, and only then is it staged and merged with
        ON CONFLICT DO NOTHING, so the result is the same either way: each row exactly once.
        """
        thresholds = self._participant_thresholds.get(derived.participant, self._thresholds)
        rows = rows_of(derived, thresholds)
        policies = self._policy_rows.due(derived, rows)  # None: no policy row changes
        month = derived.snapshot.response_time.astimezone(UTC).date().replace(day=1)
        started = time.perf_counter()
        async with self._pool.connection() as conn:
            try:
                async with conn.transaction():
                    await self._ensure_partition(conn, month)
                    await copy_rows(conn, COPY_STATES, rows)
                    if policies is not None:
                        await conn.execute(UPSERT_POLICIES, policies)
                inserted = len(rows)
            except psycopg.errors.UniqueViolation:
                async with conn.transaction():
                    await conn.execute(CLEAR_INCOMING)
                    await copy_rows(conn, COPY_INCOMING, rows)
                    cursor = await conn.execute(INSERT_INCOMING)
                    inserted = max(0, cursor.rowcount)
                    if policies is not None:
                        await conn.execute(UPSERT_POLICIES, policies)
        self._policy_rows.committed(policies)
        elapsed = time.perf_counter() - started
        self._months.add(month)
        self.write_duration.observe(elapsed)
        if self._observe is not None:
            self._observe("history_write", elapsed)
        self.rows_written.inc(inserted)
        self._version += 1
        if not self._ok:
            log.info("history writes succeed again (%d queued)", len(self._queue))
        self._ok = True
        return inserted

    async def _ensure_partition(self, conn: psycopg.AsyncConnection[Any], month: date) -> None:
        # Once per month and process: maintenance normally made it long ago, but a writer must never
        # fail on a month nobody prepared (maintenance down for months, a clock far ahead).
        if month not in self._months:
            await conn.execute("SELECT create_dict_rate_limit_state_partition(%s)", [month])

    async def _ping(self) -> None:
        try:
            async with self._pool.connection() as conn:
                await conn.execute("SELECT 1")
            self._ok = True
        except Exception as exc:
            if self._ok:
                log.warning("history database unreachable: %s", exc)
            self._ok = False
            self._status = _cause(error_kind(exc), exc)


def _schema(exc: BaseException) -> bool:
    return isinstance(exc, psycopg.Error) and exc.sqlstate in SCHEMA_STATES


def _cause(kind: str, exc: BaseException) -> str:
    """The readiness text of a failure: its cause first, then the server's or the driver's words."""
    detail = printable(exc)[:300]
    if kind == "connection":
        return f"unreachable: {detail}"
    if _schema(exc):
        return f"schema not migrated (run `dict-rate-limit migrate`): {detail}"
    return f"writes refused ({kind}): {detail}"


class _HistoryCollector(Collector):
    """The writer's metrics: counters it owns plus queue gauges read at scrape time."""

    def __init__(self, writer: HistoryWriter) -> None:
        self._writer = writer

    def describe(self) -> Iterable[Metric]:
        return list(self._metrics(samples=False))

    def collect(self) -> Iterable[Metric]:
        return list(self._metrics(samples=True))

    def _metrics(self, *, samples: bool) -> Iterator[Metric]:
        w = self._writer
        gauges: Sequence[tuple[str, str, float]] = (
            ("dict_rate_limit_history_enabled", "1 when DATABASE_URL is set, 0 when history is disabled.", 1),
            ("dict_rate_limit_history_queue_depth", "Snapshots waiting to be written.", w.queue_depth),
            ("dict_rate_limit_history_queue_capacity", "HISTORY_QUEUE_SIZE.", w.queue_capacity),
            (
                "dict_rate_limit_maintenance_last_success_timestamp_seconds",
                "Unix time of the last successful partition maintenance; 0 before the first.",
                w.maintenance.last_success_timestamp,
            ),
        )
        for name, documentation, value in gauges:
            yield GaugeMetricFamily(name, documentation, value=value if samples else None)
        for metric in (
            w.rows_written,
            w.write_errors,
            w.rejected,
            w.dropped,
            w.write_duration,
            w.maintenance.runs,
        ):
            yield from metric.collect() if samples else metric.describe()


class _DisabledCollector(Collector):
    def describe(self) -> Iterable[Metric]:
        return [
            GaugeMetricFamily("dict_rate_limit_history_enabled", "1 when DATABASE_URL is set, 0 otherwise.")
        ]

    def collect(self) -> Iterable[Metric]:
        return [
            GaugeMetricFamily(
                "dict_rate_limit_history_enabled", "1 when DATABASE_URL is set, 0 otherwise.", value=0
            )
        ]


def disabled_collector() -> Collector:
    """``dict_rate_limit_history_enabled 0``: history is off because DATABASE_URL is unset."""
    return _DisabledCollector()


def disabled_metrics() -> bytes:
    """The exposition of :func:`disabled_collector` (it never changes)."""
    registry = CollectorRegistry()
    registry.register(disabled_collector())
    return generate_latest(registry)
