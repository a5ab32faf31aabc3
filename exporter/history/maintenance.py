"""Partition maintenance: create the retention window's partitions, drop expired ones, auto-resolve alerts."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import Counter
from psycopg_pool import AsyncConnectionPool

log = logging.getLogger(__name__)

#: After a failed run, try again this soon rather than a whole interval later.
RETRY_AFTER_FAILURE = 60.0


class Maintenance:
    """Runs ``perform_dict_rate_limit_maintenance`` now and every ``interval`` seconds.

    The SQL function takes the partition advisory lock itself, so replicas running it together simply
    take turns (the second finds nothing left to do).
    """

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        *,
        retention_months: int,
        interval: float,
        observe: Callable[[str, float], None] | None = None,
    ) -> None:
        self._pool = pool
        self._retention_months = retention_months
        self._interval = interval
        self._observe = observe
        self.runs = Counter(
            "dict_rate_limit_maintenance_runs",
            "Partition maintenance runs, by result.",
            ["result"],
            registry=None,
        )
        for result in ("success", "failure"):
            self.runs.labels(result)
        self.last_success_timestamp = 0.0
        self.last_summary: dict[str, Any] | None = None

    async def run_once(self) -> dict[str, Any]:
        """One maintenance run; returns the function's JSON summary (created, dropped, auto_resolved)."""
        started = time.perf_counter()
        try:
            async with self._pool.connection() as conn:
                cursor = await conn.execute(
                    "SELECT perform_dict_rate_limit_maintenance(%s)", [self._retention_months]
                )
                row = await cursor.fetchone()
        except Exception:
            self.runs.labels("failure").inc()
            raise
        finally:
            if self._observe is not None:
                self._observe("maintenance", time.perf_counter() - started)
        # psycopg loads jsonb into a dict.
        summary: dict[str, Any] = row[0] if row is not None and isinstance(row[0], dict) else {}
        self.runs.labels("success").inc()
        self.last_success_timestamp = time.time()
        self.last_summary = summary
        if summary.get("created") or summary.get("dropped") or summary.get("auto_resolved"):
            log.info(
                "history maintenance: created %s, dropped %s, auto-resolved %s alert(s)",
                summary.get("created"),
                summary.get("dropped"),
                summary.get("auto_resolved"),
            )
        return summary

    async def loop(self) -> None:
        """Run at start-up, then every interval; a failure is retried sooner (the database may be down)."""
        while True:
            try:
                await self.run_once()
                delay = self._interval
            except Exception as exc:
                log.warning("history maintenance failed (retrying in %.0f s): %s", RETRY_AFTER_FAILURE, exc)
                delay = min(self._interval, RETRY_AFTER_FAILURE)
            await asyncio.sleep(delay)
