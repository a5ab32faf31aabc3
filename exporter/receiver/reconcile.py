"""Reconciliation with Alertmanager: firing audit rows whose alert Alertmanager no longer has are resolved.

Alertmanager never delivers the resolution of an alert that is inhibited (or silenced) when it resolves,
so its audit row would stay firing, and core systems would hear nothing, until the daily auto-resolve.
Every ``RECONCILE_INTERVAL_SECONDS`` the receiver asks each configured Alertmanager for the alerts it
holds (``GET /api/v2/alerts``: active, inhibited, silenced and unprocessed alike; resolved ones are not
listed) and resolves, with ``resolved_by = 'reconciled'``, the firing rows whose identity (fingerprint
without the replica labels) it has not held at any check for ``RECONCILE_GRACE_SECONDS`` (180, at least
two checks): long enough for a resolution Alertmanager is about to deliver (its group_interval) to be
recorded as it says, and for Prometheus to resend its active alerts to an Alertmanager that restarted
empty (every minute, ``resend_delay``).

Why this mechanism: the rules cannot know what Alertmanager suppresses, and Alertmanager offers no
"deliver inhibited resolutions" option; its API is the only place where "still active" is known.

Which Alertmanagers: those of ``ALERTMANAGER_URL`` (every firing row is checked against all of them; if
any cannot be asked, the round is skipped), or by default the ones that send notifications (their
``externalURL``, learnt from each payload and stored on the rows they create): each row is checked
against the Alertmanager that created it only, and not at all while that one cannot be asked. An
unreachable API never resolves anything. ``ALERTMANAGER_URL=off`` disables the reconciliation.
The UPDATE fires the outbox trigger, so the ``resolved`` event reaches Pulsar like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

import aiohttp
from psycopg_pool import AsyncConnectionPool

from exporter.receiver.identity import label_fingerprint, without_replica_labels
from exporter.receiver.store import RecordResult, Transition

log = logging.getLogger(__name__)

FIRING = "SELECT id, fingerprint, alertmanager_url FROM dict_rate_limit_alerts WHERE status = 'firing'"
# The resolution records the bucket values of its own moment: the latest snapshot of the policy of the
# alert's participant (sql/0007, 0008).
RESOLVE = """
UPDATE dict_rate_limit_alerts a
   SET status = 'resolved', ends_at = now(), resolved_at = now(), resolved_by = 'reconciled',
       updated_at = now(),
       (available_tokens, capacity, utilization_percent, recovery_eta_seconds,
        exhaustion_projection_seconds) =
       (SELECT v.available_tokens, v.capacity, v.utilization_percent, v.recovery_eta_seconds,
               v.exhaustion_projection_seconds
          FROM (SELECT 1) AS one
          LEFT JOIN LATERAL dict_rate_limit_latest_values(
                a.endpoint_id, coalesce(a.labels ->> 'participant', '')) v ON true)
 WHERE a.id = ANY(%s) AND a.status = 'firing'
RETURNING a.endpoint_id, a.severity, a.psp_category
"""
HTTP_TIMEOUT_SECONDS = 10.0


class AlertmanagerUnavailable(RuntimeError):
    """An Alertmanager did not answer its alerts API: nothing may be concluded this round."""


def identities(alerts: Iterable[Mapping[str, Any]], replica_labels: Iterable[str]) -> set[str]:
    """The identity fingerprints of Alertmanager's alerts (as the receiver records them)."""
    drop = tuple(replica_labels)
    return {label_fingerprint(without_replica_labels(a.get("labels") or {}, drop)) for a in alerts}


def _normal(url: str) -> str:
    return url.strip().rstrip("/")


class Reconciler:
    """Resolves firing rows that every configured Alertmanager has forgotten (see the module docstring)."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        urls: Iterable[str] | None,
        replica_labels: Iterable[str],
        interval_seconds: float,
        grace_seconds: float = 180.0,
    ) -> None:
        """``urls`` None: learn the Alertmanagers from the notifications (:meth:`learn`)."""
        self._pool = pool
        self._explicit = urls is not None
        self._urls = [_normal(url) for url in urls or () if url.strip()]
        self._replica_labels = tuple(replica_labels)
        self._interval = interval_seconds
        self._grace = grace_seconds
        self._absent_since: dict[int, float] = {}
        self._failing: set[str] = set()
        self._stopping = asyncio.Event()

    def learn(self, external_url: str) -> None:
        """Notes an Alertmanager that sent a notification (ignored with explicit URLs)."""
        url = _normal(external_url)
        if not self._explicit and url and url not in self._urls:
            self._urls.append(url)

    async def _held_by(self, session: aiohttp.ClientSession, url: str) -> set[str]:
        """Identities of the alerts one Alertmanager holds; raises AlertmanagerUnavailable."""
        return identities(await self._alerts_of(session, url), self._replica_labels)

    async def _alerts_of(self, session: aiohttp.ClientSession, url: str) -> list[Mapping[str, Any]]:
        alerts: list[Mapping[str, Any]] = []
        if url:
            try:
                async with session.get(f"{url}/api/v2/alerts") as response:
                    if response.status != 200:
                        raise AlertmanagerUnavailable(f"{url}: HTTP {response.status}")
                    body = await response.json()
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                raise AlertmanagerUnavailable(f"{url}: {exc}") from None
            if not isinstance(body, list):
                raise AlertmanagerUnavailable(f"{url}: the alerts API did not answer a list")
            alerts.extend(item for item in body if isinstance(item, dict))
        return alerts

    async def _absent(self, session: aiohttp.ClientSession, rows: list[tuple[Any, ...]]) -> set[int]:
        """Firing rows whose alert their Alertmanager(s) no longer hold."""
        if self._explicit:
            held: set[str] = set()
            for url in self._urls:
                held |= await self._held_by(session, url)  # one failure skips the whole round
            return {int(row_id) for row_id, fingerprint, _ in rows if fingerprint not in held}
        absent: set[int] = set()
        for url in list(self._urls):
            try:
                held = await self._held_by(session, url)
            except AlertmanagerUnavailable as exc:
                # Once per outage: an externalURL the receiver cannot reach would log every round.
                level = logging.DEBUG if url in self._failing else logging.WARNING
                log.log(
                    level, "reconciliation skipped for one Alertmanager", extra={"ctx": {"error": str(exc)}}
                )
                self._failing.add(url)
                continue
            self._failing.discard(url)
            absent |= {
                int(row_id)
                for row_id, fingerprint, source in rows
                if _normal(source or "") == url and fingerprint not in held
            }
        return absent

    async def check_once(self) -> RecordResult:
        """One round; returns the resolutions it committed (for the seed counters)."""
        result = RecordResult()
        if not self._urls:
            return result
        async with self._pool.connection() as conn:
            rows = await (await conn.execute(FIRING)).fetchall()
            timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_SECONDS)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                absent = await self._absent(session, rows)
            now = time.monotonic()
            # Absent since the first check that missed it; kept only while it stays absent.
            self._absent_since = {row: self._absent_since.get(row, now) for row in absent}
            due = sorted(
                row for row, since in self._absent_since.items() if since < now and now - since >= self._grace
            )
            for row in due:
                del self._absent_since[row]
            if due:
                async with conn.transaction():
                    resolved = await (await conn.execute(RESOLVE, [due])).fetchall()
                for endpoint_id, severity, category in resolved:
                    transition = Transition("resolved", endpoint_id or "", severity, category or "")
                    result.transitions.append(transition)
        return result

    async def run(self, on_resolved: Any) -> None:
        """Reconciles every interval until :meth:`stop`; ``on_resolved(result)`` after each change."""
        while not self._stopping.is_set():
            try:
                result = await self.check_once()
            except AlertmanagerUnavailable as exc:
                log.warning("reconciliation skipped", extra={"ctx": {"error": str(exc)}})
            except Exception:  # a database outage must not end the loop; the next round retries
                log.exception("reconciliation failed")
            else:
                if result.transitions:
                    log.info(
                        "resolved alerts Alertmanager no longer holds",
                        extra={"ctx": {"resolved": result.resolved}},
                    )
                    on_resolved(result)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval)

    async def stop(self) -> None:
        self._stopping.set()
