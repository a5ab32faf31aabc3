"""One poller per exporter deployment: a lease in PostgreSQL elects the replica that calls the Bridge.

Every replica of a poller group (``POLLER_GROUP``) runs a :class:`PollerLease` on its own connection:

* a follower tries to take the lease every ``lease/3`` s; it succeeds once the lease expired (on the
  database's clock) and then holds it with ``term + 1``;
* the leader renews it every ``lease/3`` s; before each Bridge call the poller asks :meth:`permit`, one
  UPDATE that records the call (``last_poll_at``) only if the lease still names this replica with its term
  and the group's previous call is at least half an interval old: a replaced leader (frozen, cut from the
  database) cannot poll, and a new leader never spends a second call in an interval the previous one used;
* the leader publishes each derived snapshot (:mod:`exporter.history.shared_snapshot`), fenced by its
  term; followers read it every ``follow_period`` and serve it (``adopt``), so all replicas show the same
  values, and a new leader derives its first snapshot against the previous leader's last one.

Why a lease row and not ``pg_try_advisory_lock``: a leader frozen by SIGSTOP keeps its session (the kernel
still answers TCP keepalives), so a session lock would never be released, and nothing would tell the
leader it lost the lock when it loses the database. A lease expires whatever its holder does, and the term
fences the holder. Failover bound: the lease expires at most ``lease`` after the leader's last renewal, a
follower takes it within ``lease/3``, then polls at the next interval boundary, so the group polls again
within ``2 x POLL_INTERVAL_SECONDS + 4/3 x POLLER_LEASE_SECONDS`` of the last poll before the failure.
The Bridge itself cannot check a fencing token, so one window remains: a leader frozen in the instant
between its permit and sending the call would send it when thawed. The permit is the last thing before
the call, so that window is the few microseconds of one function return.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import psycopg
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from psycopg.types.json import Jsonb

from exporter.history import shared_snapshot
from exporter.service.derivation import DerivedSnapshot

log = logging.getLogger(__name__)

Adopt = Callable[[DerivedSnapshot, float], Awaitable[None]]
FAILURE_LOG_INTERVAL = 60.0

ACQUIRE = """
INSERT INTO dict_rate_limit_poller_lease AS l (poller_group, holder, term, acquired_at, expires_at)
VALUES (%(group)s, %(holder)s, 1, clock_timestamp(), clock_timestamp() + make_interval(secs => %(lease)s))
ON CONFLICT (poller_group) DO UPDATE
   SET holder = EXCLUDED.holder, term = l.term + 1, acquired_at = EXCLUDED.acquired_at,
       expires_at = EXCLUDED.expires_at
 WHERE l.expires_at <= clock_timestamp()
RETURNING term
"""
# Renewing an expired lease is safe as long as the term is unchanged: nobody else held it meanwhile.
RENEW = """
UPDATE dict_rate_limit_poller_lease SET expires_at = clock_timestamp() + make_interval(secs => %(lease)s)
 WHERE poller_group = %(group)s AND holder = %(holder)s AND term = %(term)s
RETURNING term
"""
PERMIT = """
UPDATE dict_rate_limit_poller_lease SET last_poll_at = clock_timestamp(), last_poll_term = term
 WHERE poller_group = %(group)s AND holder = %(holder)s AND term = %(term)s
   AND expires_at > clock_timestamp()
   AND (last_poll_at IS NULL OR last_poll_at <= clock_timestamp() - make_interval(secs => %(gap)s))
RETURNING 1
"""
HOLDER = "SELECT holder, term FROM dict_rate_limit_poller_lease WHERE poller_group = %s"
# Every replica says it is alive and counts the others seen within ``recent`` seconds; rows of replicas gone
# for a day are removed on the way. (The SELECT does not see this statement's own insert: it counts others.)
HEARTBEAT = """
WITH seen AS (
    INSERT INTO dict_rate_limit_poller_members (poller_group, holder, seen_at)
    VALUES (%(group)s, %(holder)s, clock_timestamp())
    ON CONFLICT (poller_group, holder) DO UPDATE SET seen_at = EXCLUDED.seen_at),
gone AS (
    DELETE FROM dict_rate_limit_poller_members
     WHERE poller_group = %(group)s AND seen_at < clock_timestamp() - interval '1 day')
SELECT count(*) FROM dict_rate_limit_poller_members
 WHERE poller_group = %(group)s AND holder <> %(holder)s
   AND seen_at > clock_timestamp() - make_interval(secs => %(recent)s)
"""
LEAVE = "DELETE FROM dict_rate_limit_poller_members WHERE poller_group = %(group)s AND holder = %(holder)s"
# On a clean stop the lease ends now, so a follower takes over within lease/3 instead of a whole lease.
RELEASE = """
UPDATE dict_rate_limit_poller_lease SET expires_at = clock_timestamp()
 WHERE poller_group = %(group)s AND holder = %(holder)s AND term = %(term)s
"""


def replica_id() -> str:
    """Host, process and a random suffix: unique even when a pod restarts with the same name and pid."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


@dataclass(frozen=True, slots=True)
class LeaseTiming:
    """The lease and how often it is worked; derived from the interval and the lease length."""

    interval: float
    lease: float
    lead: float = 0.0

    @property
    def renew_period(self) -> float:
        return self.lease / 3

    @property
    def follow_period(self) -> float:
        """How often a follower looks for a newer shared snapshot: well inside the poll lead, so a scrape
        right after an interval boundary finds the same snapshot on every replica."""
        candidates = [self.renew_period, self.interval / 4]
        if self.lead > 0:
            candidates.append(self.lead / 2)
        return max(0.05, min(candidates))

    @property
    def statement_timeout(self) -> float:
        return max(0.2, min(2.0, self.renew_period / 2, self.interval / 4))

    @property
    def failover_bound(self) -> float:
        """Longest time between the group's last poll before a leader failure and the next poll."""
        return 2 * self.interval + self.lease + self.renew_period


class PollerLease:
    """The lease of one replica: :meth:`permit` and :meth:`publish` for the poller, followers' adoption."""

    def __init__(
        self,
        database_url: str,
        *,
        group: str,
        timing: LeaseTiming,
        adopt: Adopt | None = None,
        holder: str | None = None,
        max_age: float = float("inf"),
    ) -> None:
        """``max_age``: a shared snapshot older than this is not adopted (STALE_AFTER_INTERVALS intervals:
        it would be withdrawn anyway, and deriving the next poll against it would average hours)."""
        self._database_url = database_url
        self.group = group
        self.timing = timing
        self.holder = holder or replica_id()
        self._adopt = adopt
        self._max_age = max_age
        self.term: int | None = None
        #: Other replicas of the group seen at the last heartbeat (None before the first).
        self.others: int | None = None
        #: Polling alone without the database: this replica led, and no other replica was seen to take over.
        self.solo = False
        #: Local monotonic time until which the lease is certainly ours (taken before the renewal was sent).
        self._valid_until = 0.0
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._renewed_at = -float("inf")
        self._seen_response_time: Any = None
        #: True once the first election attempt finished, whatever its outcome (start-up probe).
        self.decided = False
        self.last_error: str | None = None
        self._warned_at = -float("inf")
        self.collector: Collector = _LeaderCollector(self)

    @property
    def is_leader(self) -> bool:
        return self.solo or (self.term is not None and time.monotonic() < self._valid_until)

    # --- lifecycle

    async def start(self) -> None:
        """First election attempt now (bounded), then the background loop; never fails on a database error."""
        await self._tick()
        self.decided = True
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="poller-lease")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.term is not None:
            with contextlib.suppress(Exception):
                await self._execute(RELEASE, self._params())
                log.info("poller lease released", extra={"ctx": {"group": self.group, "term": self.term}})
            self.term = None
        with contextlib.suppress(Exception):
            await self._execute(LEAVE, self._params())
        await self._disconnect()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.timing.follow_period)
            await self._tick()

    async def _tick(self) -> None:
        try:
            if time.monotonic() - self._renewed_at >= self.timing.renew_period:
                await self._heartbeat()
                await (self._renew() if self.term is not None else self._acquire())
            if self.term is None:
                await self._follow()
        except Exception as exc:
            self._failed(exc)
            return
        if self.last_error is not None:
            log.info("poller lease: database reachable again", extra={"ctx": self._ctx()})
            self.last_error, self._warned_at = None, -float("inf")
        self.solo = False  # the database answers again: the lease decides

    # --- election

    async def _heartbeat(self) -> None:
        row = await self._fetchone(HEARTBEAT, {**self._params(), "recent": 2 * self.timing.lease})
        self.others = int(row[0]) if row is not None else None

    async def _acquire(self) -> None:
        started = time.monotonic()
        row = await self._fetchone(ACQUIRE, self._params())
        self._renewed_at = started
        if row is None:
            return
        self.term = int(row[0])
        self._valid_until = started + self.timing.lease
        log.info("poller lease acquired: this replica polls the Bridge", extra={"ctx": self._ctx()})
        # Continue from the previous leader's last snapshot: same counters, same ResponseTime baseline.
        await self._follow()

    async def _renew(self) -> None:
        started = time.monotonic()
        row = await self._fetchone(RENEW, self._params())
        self._renewed_at = started
        if row is None:
            self._lost("another replica holds the lease")
        else:
            self._valid_until = started + self.timing.lease

    def _lost(self, why: str) -> None:
        if self.term is not None and not self.solo:
            log.warning("poller lease lost (%s): this replica stops polling", why, extra={"ctx": self._ctx()})
        self.term = None
        self._valid_until = 0.0

    def _failed(self, exc: Exception) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"
        if self.term is not None and not self.solo and self.others == 0:
            # Nobody else to take over: stopping would only blind a single-replica deployment.
            self.solo = True
            log.warning(
                "poller lease: database unreachable, no other replica seen: polling alone until it returns",
                extra={"ctx": self._ctx()},
            )
        if self.term is not None and time.monotonic() >= self._valid_until:
            self._lost(f"database unreachable: {self.last_error}")
        # The loop retries several times a second while the database is away: one line a minute says so.
        now = time.monotonic()
        if now - self._warned_at >= FAILURE_LOG_INTERVAL:
            self._warned_at = now
            log.warning("poller lease: database error: %s", self.last_error, extra={"ctx": self._ctx()})

    # --- the poller's hooks

    async def permit(self) -> bool:
        """May this replica call the Bridge now? Records the call in the lease row when it may."""
        if not self.is_leader:
            return False
        if self.solo:
            return True  # no database to record the call in; one replica, one call per interval
        try:
            row = await self._fetchone(PERMIT, {**self._params(), "gap": self.timing.interval / 2})
            if row is not None:
                return True
            holder = await self._fetchone(HOLDER, [self.group])
            if holder is None or (holder[0], holder[1]) != (self.holder, self.term):
                self._lost("another replica took the lease")
            else:
                log.info(
                    "poll skipped: the group polled under half an interval ago", extra={"ctx": self._ctx()}
                )
        except Exception as exc:
            # No database, no permit: a leader cut from it cannot know whether it was replaced, unless it
            # saw no other replica that could replace it (then it goes on alone: ``solo``).
            self._failed(exc)
            return self.solo
        return False

    async def publish(self, derived: DerivedSnapshot) -> None:
        """Shares a snapshot this replica polled; dropped (and leadership given up) if it was replaced."""
        if self.term is None or self.solo:
            return
        params = {
            **self._params(),
            "response_time": derived.snapshot.response_time,
            "snapshot": Jsonb(shared_snapshot.encode(derived)),
        }
        try:
            row = await self._fetchone(shared_snapshot.PUBLISH, params)
        except Exception as exc:
            self._failed(exc)
            return
        if row is None:
            holder = await self._fetchone(HOLDER, [self.group])
            if holder is None or (holder[0], holder[1]) != (self.holder, self.term):
                self._lost("another replica took the lease before the snapshot was shared")
        else:
            self._seen_response_time = derived.snapshot.response_time

    async def _follow(self) -> None:
        params = {"group": self.group, "seen": self._seen_response_time}
        row = await self._fetchone(shared_snapshot.READ, params)
        if row is None or self._adopt is None:
            return
        _term, response_time, age, document = row
        if self._seen_response_time is not None and response_time <= self._seen_response_time:
            return
        try:
            derived = shared_snapshot.decode(document)
        except shared_snapshot.SnapshotFormatError as exc:
            log.error("cannot read the shared snapshot: %s", exc, extra={"ctx": self._ctx()})
            self._seen_response_time = response_time
            return
        self._seen_response_time = response_time
        if float(age) > self._max_age:
            log.info(
                "shared snapshot too old to serve (%.0f s): not adopted", age, extra={"ctx": self._ctx()}
            )
            return
        await self._adopt(derived, float(age))

    # --- the connection (one, dedicated: the lease must not wait behind history writes)

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            timeout = self.timing.statement_timeout
            conn = await asyncio.wait_for(
                psycopg.AsyncConnection.connect(
                    self._database_url,
                    autocommit=True,
                    connect_timeout=max(1, round(timeout * 2)),
                    application_name="dict-rate-limit-poller-lease",
                    # A server that stops answering (cut network) is noticed within seconds, not hours.
                    keepalives=1,
                    keepalives_idle=5,
                    keepalives_interval=2,
                    keepalives_count=2,
                    tcp_user_timeout=max(1000, int(timeout * 2000)),
                ),
                timeout * 3,
            )
            await conn.execute(
                "SELECT set_config('statement_timeout', %s, false)", [f"{int(timeout * 1000)}ms"]
            )
            self._conn = conn
        return self._conn

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 1.0)

    async def _fetchone(self, query: str, params: Any) -> tuple[Any, ...] | None:
        async with self._lock:
            try:
                conn = await self._connect()
                cursor = await asyncio.wait_for(
                    conn.execute(query, params), self.timing.statement_timeout * 2
                )
                return await cursor.fetchone() if cursor.description is not None else None
            except BaseException:
                await self._disconnect()  # a timed-out or broken connection is not reused
                raise

    async def _execute(self, query: str, params: Any) -> None:
        await self._fetchone(query, params)

    def _params(self) -> dict[str, Any]:
        return {"group": self.group, "holder": self.holder, "term": self.term, "lease": self.timing.lease}

    def _ctx(self) -> dict[str, Any]:
        return {"group": self.group, "holder": self.holder, "term": self.term}


class _LeaderCollector(Collector):
    def __init__(self, lease: PollerLease | None) -> None:
        self._lease = lease

    def describe(self) -> Iterable[Metric]:
        return [
            GaugeMetricFamily("dict_rate_limit_poller_leader", _LEADER_HELP),
            GaugeMetricFamily("dict_rate_limit_poller_replicas", _REPLICAS_HELP),
        ]

    def collect(self) -> Iterable[Metric]:
        lease = self._lease
        leading = lease is None or lease.is_leader
        # Before the first heartbeat (or without a database) this replica knows only itself.
        replicas = 1 + (lease.others or 0) if lease is not None else 1
        return [
            GaugeMetricFamily("dict_rate_limit_poller_leader", _LEADER_HELP, value=1 if leading else 0),
            GaugeMetricFamily("dict_rate_limit_poller_replicas", _REPLICAS_HELP, value=replicas),
        ]


_LEADER_HELP = (
    "1 on the replica that polls the Bridge for its poller group (always 1 without DATABASE_URL), 0 on the "
    "replicas that serve the leader's shared snapshot."
)
_REPLICAS_HELP = (
    "Replicas of this poller group seen in the last two leases, this one included (1 without DATABASE_URL); "
    "a leader that saw only itself keeps polling alone when it loses the database."
)


def single_poller_collector() -> Collector:
    """``dict_rate_limit_poller_leader 1``: without DATABASE_URL every replica polls on its own."""
    return _LeaderCollector(None)
