"""Reconciliation with Alertmanager: firing audit rows whose alert Alertmanager no longer has are resolved.

Alertmanager never delivers the resolution of an alert that is inhibited (or silenced) when it resolves,
so its audit row would stay firing, and core systems would hear nothing, until the daily auto-resolve.
Every ``RECONCILE_INTERVAL_SECONDS`` the receiver asks each configured Alertmanager for the alerts it
holds (``GET /api/v2/alerts``: active, inhibited, silenced and unprocessed alike; resolved ones are not
listed) and resolves, with ``resolved_by = 'reconciled'``, the firing rows whose identity (fingerprint
without the replica labels) none of them holds at two consecutive checks. Two checks, so a resolution
Alertmanager is about to deliver (within its group_interval) is recorded as it says, not raced.

Why this mechanism: the rules cannot know what Alertmanager suppresses, and Alertmanager offers no
"deliver inhibited resolutions" option; its API is the only place where "still active" is known. If any
Alertmanager cannot be asked, the round is skipped: an unreachable API must never resolve anything.
The UPDATE fires the outbox trigger, so the ``resolved`` event reaches Pulsar like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import aiohttp
from psycopg_pool import AsyncConnectionPool

from exporter.receiver.identity import label_fingerprint, without_replica_labels
from exporter.receiver.store import RecordResult, Transition

log = logging.getLogger(__name__)

FIRING = "SELECT id, fingerprint FROM dict_rate_limit_alerts WHERE status = 'firing'"
RESOLVE = """
UPDATE dict_rate_limit_alerts
   SET status = 'resolved', ends_at = now(), resolved_at = now(), resolved_by = 'reconciled',
       updated_at = now()
 WHERE id = ANY(%s) AND status = 'firing'
RETURNING endpoint_id, severity, psp_category
"""
HTTP_TIMEOUT_SECONDS = 10.0


class AlertmanagerUnavailable(RuntimeError):
    """An Alertmanager did not answer its alerts API: nothing may be concluded this round."""


def identities(alerts: Iterable[Mapping[str, Any]], replica_labels: Iterable[str]) -> set[str]:
    """The identity fingerprints of Alertmanager's alerts (as the receiver records them)."""
    drop = tuple(replica_labels)
    return {label_fingerprint(without_replica_labels(a.get("labels") or {}, drop)) for a in alerts}


class Reconciler:
    """Resolves firing rows that every configured Alertmanager has forgotten (see the module docstring)."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        urls: Iterable[str],
        replica_labels: Iterable[str],
        interval_seconds: float,
    ) -> None:
        self._pool = pool
        self._urls = [url.strip().rstrip("/") for url in urls if url.strip()]
        self._replica_labels = tuple(replica_labels)
        self._interval = interval_seconds
        self._absent_before: set[int] = set()
        self._stopping = asyncio.Event()

    async def _alertmanager_alerts(self, session: aiohttp.ClientSession) -> list[Mapping[str, Any]]:
        alerts: list[Mapping[str, Any]] = []
        for url in self._urls:
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

    async def check_once(self) -> RecordResult:
        """One round; returns the resolutions it committed (for the seed counters)."""
        timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_SECONDS)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            active = identities(await self._alertmanager_alerts(session), self._replica_labels)
        result = RecordResult()
        async with self._pool.connection() as conn:
            rows = await (await conn.execute(FIRING)).fetchall()
            absent = {int(row_id) for row_id, fingerprint in rows if fingerprint not in active}
            due = sorted(absent & self._absent_before)
            self._absent_before = absent - set(due)
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
