"""The outbox relay: publishes committed alert events to Pulsar, in order, marking them sent after the ack.

One relay runs in every receiver replica, but only the holder of a PostgreSQL session advisory lock (the
leader) publishes; the others wait to take over when its session ends (crash, network loss). So two
replicas never publish the same row at once, and the leader publishes in outbox order (``id``), which keeps
every policy's events in order. The leader polls the (indexed, usually empty) unsent rows every
``poll_interval`` and is woken at once by its own receiver after a commit (:meth:`OutboxRelay.wake`);
events recorded by another replica wait at most one poll interval. (No LISTEN/NOTIFY: NOTIFY serializes
the committing transactions.)

A batch is sent asynchronously (the producer batches per key) and the relay waits for every ack; then the
acknowledged prefix is marked sent in one UPDATE. Anything after the first failure is sent again later
(a duplicate at worst, which consumers absorb by ``event_id``), never skipped. While Pulsar is down the
relay retries with capped, jittered backoff, reconnecting from scratch each time so recovery does not
depend on the client library's own (slow-growing) reconnection delays.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import class_row

from exporter.backoff import Backoff
from exporter.config import OutboxSettings
from exporter.dsn import redact
from exporter.receiver.events import AlertEvent, OutboxRow
from exporter.receiver.metrics import SET_ASIDE_REASONS, ReceiverMetrics
from exporter.receiver.publisher import Message, PulsarPublisher
from exporter.runtime import describe

log = logging.getLogger(__name__)

#: Session advisory lock of the relay leader (ascii "drlrely").
RELAY_LOCK = 28554171249207673
STATS_INTERVAL = 1.0
# The bucket values of each change are the outbox row's (sql/0007): the alert row holds only the latest.
# The texts are the alert row's: written once, by the notification that first recorded the alert.
SELECT_UNSENT = """
SELECT o.id, o.event_id, o.event_type, a.alert_name, a.fingerprint, a.severity, a.endpoint_id,
       a.psp_category, a.status, a.starts_at, a.ends_at, a.resolved_at, a.resolved_by, o.available_tokens,
       o.capacity, o.utilization_percent, o.recovery_eta_seconds, o.exhaustion_projection_seconds,
       left(a.summary, %(summary)s) AS summary, left(a.description, %(description)s) AS description,
       nullif(a.labels ->> 'participant', '') AS participant
  FROM dict_rate_limit_alert_outbox o
  JOIN dict_rate_limit_alerts a ON a.id = o.alert_id
 WHERE o.sent_at IS NULL AND o.set_aside_at IS NULL
 ORDER BY o.id
 LIMIT %(limit)s
"""
#: Event text is bounded so that no accepted webhook body can make an event the broker refuses (Pulsar's
#: default limit is 5 MB; an event is then at most ~8 KB): the full text stays in dict_rate_limit_alerts.
MAX_SUMMARY_CHARS = 1024
MAX_DESCRIPTION_CHARS = 4096
#: Broker answers that no retry can change for this message: the event is set aside (kept, counted,
#: alerted on, replayable with `dict-rate-limit outbox replay`) and the relay goes on with the next.
PERMANENT_RESULTS = frozenset(SET_ASIDE_REASONS)
MARK_SET_ASIDE = (
    "UPDATE dict_rate_limit_alert_outbox SET set_aside_at = now(), set_aside_reason = %s,"
    " attempts = attempts + 1, last_error = %s WHERE id = %s"
)
SET_ASIDE_COUNT = (
    "SELECT count(*) FROM dict_rate_limit_alert_outbox WHERE sent_at IS NULL AND set_aside_at IS NOT NULL"
)
MARK_SENT = (
    "UPDATE dict_rate_limit_alert_outbox SET sent_at = now(), attempts = attempts + 1, last_error = NULL"
    " WHERE id = ANY(%s)"
)
MARK_FAILED = "UPDATE dict_rate_limit_alert_outbox SET attempts = attempts + 1, last_error = %s WHERE id = %s"
BACKLOG = (
    "SELECT count(*), extract(epoch FROM min(created_at))::float8"
    " FROM dict_rate_limit_alert_outbox WHERE sent_at IS NULL AND set_aside_at IS NULL"
)


@dataclass(frozen=True, slots=True)
class RelayTuning:
    """Relay knobs (defaults suit production; tests shorten the timeouts)."""

    batch_size: int = 1000
    poll_interval: float = 0.5
    backoff_initial: float = 0.5
    backoff_max: float = 5.0
    send_timeout_ms: int = 5000


#: The leader's lock lives as long as its session. A leader host that vanishes without closing the
#: connection would keep it for hours (TCP's default keepalive); these make the server end such a session
#: within about a minute. The relay never stays idle that long (it polls every poll_interval).
SESSION_SETTINGS = (
    ("idle_session_timeout", "60s"),
    ("tcp_keepalives_idle", "10"),
    ("tcp_keepalives_interval", "5"),
    ("tcp_keepalives_count", "3"),
)


async def _bound_session(conn: AsyncConnection[Any]) -> None:
    for name, value in SESSION_SETTINGS:
        try:
            await conn.execute("SELECT set_config(%s, %s, false)", [name, value])
        except psycopg.errors.UndefinedObject:  # idle_session_timeout needs PostgreSQL 14
            log.info("outbox relay: %s is not supported by this server", name)


class OutboxRelay:
    """Publishes ``dict_rate_limit_alert_outbox`` to Pulsar while :meth:`run` runs."""

    def __init__(
        self,
        database_url: str,
        publisher: PulsarPublisher,
        metrics: ReceiverMetrics,
        tuning: RelayTuning = RelayTuning(),
    ) -> None:
        self._database_url = database_url
        self._publisher = publisher
        self._metrics = metrics
        self._batch_size = tuning.batch_size
        self._poll_interval = tuning.poll_interval
        self._backoff = Backoff(tuning.backoff_initial, tuning.backoff_max)
        self._stopping = asyncio.Event()
        self.is_leader = False
        self.last_error: str | None = None
        self._stats_at = 0.0
        self._work = asyncio.Event()

    async def run(self) -> None:
        """Until :meth:`stop`: connect, try to lead, relay; every failure is logged and retried."""
        while not self._stopping.is_set():
            try:
                async with await AsyncConnection.connect(self._database_url, autocommit=True) as conn:
                    await _bound_session(conn)
                    await self._session(conn)
            except (psycopg.Error, OSError) as exc:
                self.last_error = f"database: {exc}"
                log.warning(
                    "outbox relay: database unavailable, retrying", extra={"ctx": {"error": str(exc)}}
                )
            except Exception as exc:  # a bug must not stop delivery for the life of the process
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("outbox relay failed, restarting it")
            finally:
                self.is_leader = False
            await self._sleep(self._backoff.next())

    async def stop(self) -> None:
        self._stopping.set()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _session(self, conn: AsyncConnection[Any]) -> None:
        while not self._stopping.is_set():
            await self._refresh_backlog(conn, force=True)
            cursor = await conn.execute("SELECT pg_try_advisory_lock(%s)", [RELAY_LOCK])
            row = await cursor.fetchone()
            if row is not None and row[0]:
                self.is_leader = True
                log.info("outbox relay: this replica publishes (leader)")
                await self._lead(conn)
                return
            await self._sleep(self._poll_interval)  # a follower: try to take over later

    async def _lead(self, conn: AsyncConnection[Any]) -> None:
        await self._connect_broker()
        while not self._stopping.is_set():
            rows = await self._unsent(conn)
            if rows:
                if await self._publish(conn, rows):
                    self._backoff.reset()
                else:
                    await self._refresh_backlog(conn, force=True)
                    await self._sleep(self._backoff.next())
                continue
            await self._refresh_backlog(conn)
            await self._wait_for_work()

    async def _connect_broker(self) -> None:
        """Connects to Pulsar on taking the lead, so health says "ok" before the first event, not after."""
        try:
            await self._publisher.ensure_connected()
            self.last_error = None
        except Exception as exc:  # retried by the first publish; health says "down" meanwhile
            self.last_error = f"pulsar: {type(exc).__name__}: {exc}"
            log.warning("outbox relay: Pulsar unavailable", extra={"ctx": {"error": str(exc)}})
            await self._publisher.reset()

    async def _unsent(self, conn: AsyncConnection[Any]) -> list[OutboxRow]:
        async with conn.cursor(row_factory=class_row(OutboxRow)) as cursor:
            await cursor.execute(
                SELECT_UNSENT,
                {
                    "summary": MAX_SUMMARY_CHARS,
                    "description": MAX_DESCRIPTION_CHARS,
                    "limit": self._batch_size,
                },
            )
            return await cursor.fetchall()

    def wake(self) -> None:
        """Called by the receiver after a commit that queued events: publish now, not at the next poll."""
        self._work.set()

    async def _wait_for_work(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._work.wait(), self._poll_interval)
        self._work.clear()

    async def _refresh_backlog(self, conn: AsyncConnection[Any], *, force: bool = False) -> None:
        """Updates the backlog gauges, at most about once a second (the leader may wake far more often)."""
        now = time.monotonic()
        if not force and now - self._stats_at < STATS_INTERVAL:
            return
        self._stats_at = now
        cursor = await conn.execute(BACKLOG)
        row = await cursor.fetchone()
        if row is not None:
            self._metrics.backlog.update(int(row[0]), row[1])
        cursor = await conn.execute(SET_ASIDE_COUNT)
        row = await cursor.fetchone()
        if row is not None:
            self._metrics.backlog.set_aside = int(row[0])

    async def _publish(self, conn: AsyncConnection[Any], rows: Sequence[OutboxRow]) -> bool:
        """Sends a batch, marks the acknowledged prefix sent; False when something must be retried."""
        events = [AlertEvent.from_row(row) for row in rows]
        started = time.perf_counter()
        try:
            await self._publisher.ensure_connected()
            results = await self._publisher.publish(
                [Message(e.body(), e.key, e.properties()) for e in events]
            )
        except Exception as exc:  # any client failure means: retry later
            results = [f"{type(exc).__name__}: {exc}"] * len(events)
        acked = sum(1 for result in results if result is None)
        self._metrics.publishes.inc(acked)
        # The handled prefix: acknowledged events, and events the broker refused for good (set aside, so
        # they never block the ones behind them). It ends at the first failure a retry may cure.
        prefix = next(
            (i for i, result in enumerate(results) if result is not None and result not in PERMANENT_RESULTS),
            len(results),
        )
        sent = [row.id for row, result in zip(rows[:prefix], results, strict=False) if result is None]
        if sent:
            await conn.execute(MARK_SENT, [sent])
        for row, result in zip(rows[:prefix], results, strict=False):
            if result is not None:
                await self._set_aside(conn, row, result)
        self._metrics.observe("publish", time.perf_counter() - started)
        if prefix == len(rows):
            self.last_error = None
            return True
        error = results[prefix] or "unknown"
        self._metrics.publish_failures.inc(len(results) - acked)
        self.last_error = f"pulsar: {error}"
        await conn.execute(MARK_FAILED, [error[:500], rows[prefix].id])
        log.warning(
            "outbox relay: publish failed, will retry",
            extra={"ctx": {"error": error, "sent": prefix, "pending": len(rows) - prefix}},
        )
        await self._publisher.reset()
        return False

    async def _set_aside(self, conn: AsyncConnection[Any], row: OutboxRow, result: str) -> None:
        self._metrics.set_aside.labels(result).inc()
        await conn.execute(MARK_SET_ASIDE, [result, f"pulsar: {result}", row.id])
        log.error(
            "outbox relay: the broker refused an event for good: set aside (dict-rate-limit outbox replay)",
            extra={"ctx": {"outbox_id": row.id, "event_id": str(row.event_id), "reason": result}},
        )


LIST_SET_ASIDE = """
SELECT o.id, o.event_id::text, o.event_type, a.endpoint_id, a.alert_name, o.set_aside_at, o.set_aside_reason
  FROM dict_rate_limit_alert_outbox o
  JOIN dict_rate_limit_alerts a ON a.id = o.alert_id
 WHERE o.sent_at IS NULL AND o.set_aside_at IS NOT NULL
 ORDER BY o.id
"""
#: Clearing set_aside_at puts the events back in the relay's queue, at their original place (their id).
REPLAY = """
UPDATE dict_rate_limit_alert_outbox SET set_aside_at = NULL, set_aside_reason = NULL
 WHERE sent_at IS NULL AND set_aside_at IS NOT NULL AND (%(all)s OR id = ANY(%(ids)s))
RETURNING id
"""


def set_aside_events(database_url: str) -> list[tuple[Any, ...]]:
    """The events set aside: id, event_id, type, policy, alert name, when, the broker's reason."""
    with psycopg.connect(database_url) as conn:
        return conn.execute(LIST_SET_ASIDE).fetchall()


def replay(database_url: str, ids: Sequence[int] | None = None) -> list[int]:
    """Returns set-aside events (``ids``, or all) to the relay's queue; the ids actually returned.

    The relay publishes them with their original event id, type and timestamps, in outbox order: a
    consumer that orders by the event's ``timestamp`` (or deduplicates by ``event_id``) sees one history.
    """
    with psycopg.connect(database_url) as conn:
        cursor = conn.execute(REPLAY, {"all": ids is None, "ids": list(ids or [])})
        return sorted(row[0] for row in cursor.fetchall())


def run(settings: OutboxSettings, *, action: str = "list", ids: Sequence[int] | None = None) -> int:
    """``dict-rate-limit outbox list|replay [--id N ...]``."""
    if not settings.database_url:
        print("dict-rate-limit outbox: set DATABASE_URL", file=sys.stderr)
        return 2
    try:
        if action == "replay":
            done = replay(settings.database_url, ids or None)
            print(f"returned to the relay: {len(done)} event(s) {done}")
            # An id asked for by name that is not set aside (a typo, already replayed, never an outbox id)
            # is said, and fails the command: a script replaying ids must not believe it worked.
            missed = sorted(set(ids or ()) - set(done))
            if missed:
                print(f"dict-rate-limit outbox: not set aside, nothing done: {missed}", file=sys.stderr)
                return 1
            return 0
        for row in set_aside_events(settings.database_url):
            outbox_id, event_id, event_type, endpoint, name, at, reason = row
            print(f"{outbox_id}\t{event_id}\t{event_type}\t{endpoint or name}\t{at.isoformat()}\t{reason}")
    except psycopg.errors.UndefinedTable:
        print(
            "dict-rate-limit outbox: the database has no alert outbox yet: "
            "run `dict-rate-limit migrate` first",
            file=sys.stderr,
        )
        return 1
    except psycopg.Error as exc:
        # One line (psycopg's messages carry the query and a caret), never the password.
        print(f"dict-rate-limit outbox: {redact(describe(exc), settings.database_url)}", file=sys.stderr)
        return 1
    return 0
