"""Scrape-aligned polling of the Bridge within DICT's POLICIES_LIST budget; the latest derived snapshot.

One GetRateLimitPolicies call per interval, shared by every scraper. Polls run at wall-clock multiples of
the interval minus a lead (interval 30 s, lead 2 s: at :28 and :58), so a Prometheus scraping on the same
interval always reads data younger than one interval. The first poll runs at start-up.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from exporter.bridge.client import BridgeConfigError, BridgeError, BridgeMalformedError, BridgeResult
from exporter.config import ConfigError
from exporter.service.derivation import DerivedSnapshot, derive
from exporter.service.selfmetrics import SelfMetrics

log = logging.getLogger(__name__)

#: DICT's POLICIES_LIST bucket: refill 6 tokens/min, capacity 20, shared by everything that lists policies.
DICT_LIST_REFILL_PER_MINUTE = 6.0
#: What the exporter may spend without POLL_BUDGET_OVERRIDE: a third of the refill, leaving room for others.
SAFE_LIST_CALLS_PER_MINUTE = 2.0

Fetch = Callable[[float | None], Awaitable[BridgeResult]]


class Clock(Protocol):
    """Wall clock (alignment), monotonic clock (durations, staleness) and sleep; injectable for tests."""

    def time(self) -> float: ...
    def monotonic(self) -> float: ...
    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def check_budget(interval: float, override: bool) -> float:
    """List calls per minute of ``interval``; refuses more than the safe budget unless overridden."""
    per_minute = 60.0 / interval
    if per_minute > SAFE_LIST_CALLS_PER_MINUTE + 1e-9 and not override:
        raise ConfigError(
            "POLL_INTERVAL_SECONDS",
            f"{interval:g} s means {per_minute:.3g} Bridge list calls per minute; each costs 1 token of "
            "DICT's "
            "POLICIES_LIST bucket (refill 6/min, capacity 20), shared by everything of this participant that "
            "lists policies. The safe budget is 2 calls/min (30 s, matching a 30 s scrape_interval); use an "
            "interval >= 30 s, or POLL_BUDGET_OVERRIDE=true if you really mean it",
        )
    if per_minute > DICT_LIST_REFILL_PER_MINUTE + 1e-9:
        log.warning(
            "POLL_BUDGET_OVERRIDE: polling %.3g times per minute exceeds DICT's POLICIES_LIST refill (6/min) "
            "and would drain it against a real DICT; only for simulators and benchmarks",
            per_minute,
            extra={"ctx": {"poll_interval_seconds": interval, "list_calls_per_minute": per_minute}},
        )
    elif per_minute > SAFE_LIST_CALLS_PER_MINUTE + 1e-9:
        log.warning(
            "POLL_BUDGET_OVERRIDE: polling %.3g times per minute, above the safe 2/min budget",
            per_minute,
            extra={"ctx": {"poll_interval_seconds": interval}},
        )
    return per_minute


def next_poll_at(now: float, interval: float, lead: float) -> float:
    """The first time after ``now`` that is ``lead`` seconds before a wall-clock multiple of ``interval``."""
    k = math.floor((now + lead) / interval) + 1
    return k * interval - lead


class Poller:
    """Polls the Bridge on schedule and keeps the latest derived snapshot; scrapes only read it."""

    def __init__(
        self,
        fetch: Fetch,
        metrics: SelfMetrics,
        *,
        interval: float,
        lead: float,
        stale_after: int,
        on_snapshot: Callable[[DerivedSnapshot], Awaitable[None]] | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._fetch = fetch
        self._metrics = metrics
        self.interval = interval
        self.lead = lead
        self.stale_after = stale_after
        self._on_snapshot = on_snapshot
        self.clock: Clock = clock or SystemClock()
        self.latest: DerivedSnapshot | None = None
        #: Monotonic start of the last successful poll: the age of the data served is measured from it.
        self.last_success: float | None = None
        self.last_error: str | None = None
        self.attempted = 0
        self.consecutive_failures = 0
        self._task: asyncio.Task[None] | None = None
        self._inflight: asyncio.Future[bool] | None = None
        self._stopping = False

    # --- state read by scrapes and health checks (no I/O)

    def age(self) -> float | None:
        """Seconds since the last successful poll started; None before the first."""
        return None if self.last_success is None else self.clock.monotonic() - self.last_success

    def is_stale(self) -> bool:
        """True when data exists but is older than ``stale_after`` intervals (bucket series withdrawn)."""
        age = self.age()
        return age is not None and age > self.stale_after * self.interval

    def is_fresh(self) -> bool:
        return self.last_success is not None and not self.is_stale()

    @property
    def failed(self) -> BaseException | None:
        """The exception that ended the poll loop, if it died (liveness)."""
        if self._task is not None and self._task.done() and not self._task.cancelled():
            return self._task.exception()
        return None

    # --- polling

    async def poll_once(self) -> bool:
        """One poll: fetch, derive, publish. Never raises for Bridge trouble; returns success."""
        clock = self.clock
        started = clock.monotonic()
        # The Bridge client's deadline is on time.monotonic(); retries of one poll never run into the next.
        deadline = time.monotonic() + 0.8 * self.interval
        derived: DerivedSnapshot | None = None
        try:
            result = await self._fetch(deadline)
            self._metrics.observe("bridge_call", clock.monotonic() - started)
            for rejection in result.rejected:
                self._metrics.record_invalid(rejection.reason)
            derived = derive(result.snapshot, self.latest)
        except BridgeMalformedError as exc:
            self._metrics.record_invalid(exc.reason)
            self._failed(f"malformed response ({exc.reason}): {exc}", "MALFORMED")
        except BridgeConfigError as exc:
            self._failed(f"CONFIGURATION ERROR, fix the Bridge credentials or address: {exc}", exc.code)
        except BridgeError as exc:
            self._failed(str(exc), exc.code)
        except Exception as exc:
            log.exception("poll failed unexpectedly")
            self._failed(f"{type(exc).__name__}: {exc}", "INTERNAL")
        self.attempted += 1
        if derived is not None:
            self._succeeded(derived, started)
            if self._on_snapshot is not None:
                await self._on_snapshot(derived)  # rendering and history: part of the poll's duration
        self._metrics.record_poll(
            success=derived is not None,
            seconds=clock.monotonic() - started,
            wall_time=clock.time(),
            category_changed=derived is not None and derived.category_changed,
        )
        return derived is not None

    def _succeeded(self, derived: DerivedSnapshot, started: float) -> None:
        snapshot = derived.snapshot
        if self.consecutive_failures:
            log.info(
                "Bridge poll succeeded again after %d failures",
                self.consecutive_failures,
                extra={"ctx": {"correlation_id": snapshot.correlation_id}},
            )
        if derived.category_changed and self.latest is not None:
            log.warning(
                "PSP category changed from %s to %s",
                self.latest.snapshot.category,
                snapshot.category,
                extra={"ctx": {"correlation_id": snapshot.correlation_id}},
            )
        self.latest = derived
        self.last_success = started
        self.last_error = None
        self.consecutive_failures = 0
        log.debug(
            "poll ok",
            extra={
                "ctx": {
                    "policies": len(snapshot.policies),
                    "correlation_id": snapshot.correlation_id,
                    "category": snapshot.category,
                }
            },
        )

    def _failed(self, message: str, code: str) -> None:
        self.consecutive_failures += 1
        self.last_error = message
        latest = self.latest
        log.error(
            "poll of the Bridge failed: %s",
            message,
            extra={
                "ctx": {
                    "code": code,
                    "consecutive_failures": self.consecutive_failures,
                    "policies": len(latest.snapshot.policies) if latest else 0,
                    "last_correlation_id": latest.snapshot.correlation_id if latest else None,
                    "stale": self.is_stale(),
                }
            },
        )

    async def run(self) -> None:
        """Polls now, then at every aligned boundary until :meth:`stop`."""
        clock = self.clock
        while not self._stopping:
            self._inflight = asyncio.ensure_future(self.poll_once())
            try:
                await asyncio.shield(self._inflight)
            except Exception:
                # Bridge trouble never gets here: this is a bug (e.g. in rendering). /health/live says so.
                log.exception("the poll loop stopped")
                raise
            # Computed after the poll: a poll that overran a boundary skips it instead of bunching up.
            now = clock.time()
            await clock.sleep(next_poll_at(now, self.interval, self.lead) - now)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="bridge-poller")

    async def stop(self, grace: float) -> None:
        """Stops scheduling; lets an in-flight poll finish for up to ``grace`` seconds, then cancels it."""
        self._stopping = True
        inflight = self._inflight
        if inflight is not None and not inflight.done():
            _done, pending = await asyncio.wait({inflight}, timeout=grace)
            if pending:
                log.warning("in-flight poll did not finish within %.1f s; cancelled", grace)
                inflight.cancel()
                await asyncio.gather(inflight, return_exceptions=True)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
