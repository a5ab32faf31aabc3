"""Scrape-aligned polling of the Bridge within DICT's POLICIES_LIST budget; the latest derived snapshot.

One GetRateLimitPolicies call per interval, shared by every scraper. Polls run at wall-clock multiples of
the interval minus a lead (interval 30 s, lead 2 s: at :28 and :58), so a Prometheus scraping on the same
interval always reads data younger than one interval. The first poll runs at start-up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

from exporter.bridge.budget import CallBudget
from exporter.bridge.client import BridgeConfigError, BridgeError, BridgeMalformedError, BridgeResult
from exporter.service.derivation import DEFAULT_ERROR_404_WINDOW_SECONDS, DerivedSnapshot, derive
from exporter.service.selfmetrics import SelfMetrics
from exporter.snapshot import Snapshot

log = logging.getLogger(__name__)

#: Longest wait for the call ceiling to free a slot before a poll is skipped instead (see _wait_for_budget).
BUDGET_GRACE_SECONDS = 1.0
#: Default bound on |ResponseTime - local clock| (BRIDGE_MAX_CLOCK_SKEW_SECONDS).
DEFAULT_MAX_SKEW_SECONDS = 300.0


#: One list call; its argument is the seconds it may take, retries included (None: the client's own bound).
Fetch = Callable[[float | None], Awaitable[BridgeResult]]


class PollGate(Protocol):
    """Who may poll, when replicas share one poller (exporter.service.leader.PollerLease)."""

    async def permit(self) -> bool:
        """Asked before each Bridge call; False: another replica polls (or this one cannot tell)."""
        ...

    async def publish(self, derived: DerivedSnapshot) -> None:
        """Receives each snapshot this replica derived, for the other replicas."""
        ...


class PollClock(Protocol):
    """Wall clock (alignment), monotonic clock (durations, staleness) and sleep; injectable for tests."""

    def time(self) -> float: ...
    def monotonic(self) -> float: ...
    async def sleep(self, seconds: float) -> None: ...


class SystemPollClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


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
        clock: PollClock | None = None,
        budget: CallBudget | None = None,
        max_skew: float = DEFAULT_MAX_SKEW_SECONDS,
        thresholds: Iterable[str] = (),
        known_policies: Iterable[str] = (),
        gate: PollGate | None = None,
        error_404_window: float = DEFAULT_ERROR_404_WINDOW_SECONDS,
    ) -> None:
        self._fetch = fetch
        self._metrics = metrics
        self.interval = interval
        self.lead = lead
        self.stale_after = stale_after
        self._on_snapshot = on_snapshot
        self.gate = gate
        self.clock: PollClock = clock or SystemPollClock()
        self.latest: DerivedSnapshot | None = None
        #: Monotonic start of the last successful poll: the age of the data served is measured from it.
        self.last_success: float | None = None
        self.last_error: str | None = None
        self.attempted = 0
        self.consecutive_failures = 0
        self._task: asyncio.Task[None] | None = None
        self._inflight: asyncio.Future[bool] | None = None
        self._stopping = False
        #: The same ceiling the Bridge client spends from: a poll that could not call is skipped, not run.
        self.budget = budget
        self.max_skew = max_skew
        #: Seconds of answer counts the 404 share is computed over (ERROR_404_WINDOW_SECONDS).
        self.error_404_window = error_404_window
        #: Monotonic time before which no call is made (the Bridge passed DICT's Retry-After).
        self.not_before: float | None = None
        self.skipped = 0
        #: Every policy name a successful poll returned (or history remembered): absent ones are "missing".
        self.known: set[str] = set(known_policies)
        self.thresholds = frozenset(thresholds)
        self._reported_unmatched: frozenset[str] = frozenset()
        self._last_missing: frozenset[str] = frozenset()

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

    def skip_reason(self) -> str | None:
        """Why the poll due now must not call the Bridge (Retry-After, spent budget), or None."""
        now = self.clock.monotonic()
        if self.not_before is not None and now < self.not_before:
            return f"the Bridge asked to retry after {self.not_before - now:.1f} s more"
        if self.budget is not None and self.budget.wait_seconds() > 0:
            return f"the ceiling of {self.budget.limit} list calls per minute is spent"
        return None

    async def poll_once(self) -> bool:
        """One poll: fetch, validate, derive, publish. Never raises for Bridge trouble; returns success."""
        clock = self.clock
        started = clock.monotonic()
        # What one poll may spend, retries included, so they never run into the next poll. A duration, not
        # a deadline: the poller's time is its injected clock, the Bridge client's is the real one.
        deadline = 0.8 * self.interval
        derived: DerivedSnapshot | None = None
        try:
            result = await self._fetch(deadline)  # seconds this poll may spend
            self._metrics.observe("bridge_call", clock.monotonic() - started)
            for rejection in result.rejected:
                self._metrics.record_invalid(rejection.reason)
            snapshot = self._accept(result)
            derived = derive(snapshot, self.latest, error_404_window=self.error_404_window)
            missing = tuple(sorted(self.known - {reading.name for reading in snapshot.policies}))
            derived = dataclasses.replace(derived, missing=missing)
        except BridgeMalformedError as exc:
            self._metrics.record_invalid(exc.reason)
            self._failed(f"unusable response ({exc.reason}): {exc}", "MALFORMED")
        except BridgeConfigError as exc:
            self._failed(f"CONFIGURATION ERROR, fix the Bridge credentials or address: {exc}", exc.code)
        except BridgeError as exc:
            if exc.retry_after is not None:
                self.not_before = self.clock.monotonic() + exc.retry_after
            self._failed(str(exc), exc.code)
        except Exception as exc:
            log.exception("poll failed unexpectedly")
            self._failed(f"{type(exc).__name__}: {exc}", "INTERNAL")
        self.attempted += 1
        if derived is not None:
            self._succeeded(derived, started)
            if self.gate is not None:
                await self.gate.publish(derived)
            if self._on_snapshot is not None:
                await self._on_snapshot(derived)  # rendering and history: part of the poll's duration
        self._metrics.record_poll(
            success=derived is not None,
            seconds=clock.monotonic() - started,
            wall_time=clock.time(),
            category_changed=derived is not None and derived.category_changed,
        )
        return derived is not None

    def _accept(self, result: BridgeResult) -> Snapshot:
        """The snapshot if it can be served, else BridgeMalformedError with the counted reason."""
        snapshot = result.snapshot
        latest = self.latest.snapshot if self.latest is not None else None
        skew = snapshot.response_time.timestamp() - self.clock.time()
        if abs(skew) > self.max_skew:
            raise BridgeMalformedError(
                f"ResponseTime {snapshot.response_time.isoformat()} is {skew:+.0f} s from the local clock "
                f"(more than BRIDGE_MAX_CLOCK_SKEW_SECONDS={self.max_skew:g})",
                reason="implausible_response_time",
            )
        if latest is not None and snapshot.response_time < latest.response_time:
            raise BridgeMalformedError(
                f"ResponseTime {snapshot.response_time.isoformat()} is before the previous snapshot's "
                f"({latest.response_time.isoformat()})",
                reason="response_time_backwards",
            )
        if not snapshot.category:
            if latest is None:
                raise BridgeMalformedError(
                    "the answer has no usable category and no earlier snapshot gives one",
                    reason="no_usable_category",
                )
            # The letter labels every series; BCB changes it rarely: keep the last one DICT gave.
            snapshot = dataclasses.replace(snapshot, category=latest.category)
        if not snapshot.policies:
            reasons = sorted({rejection.reason for rejection in result.rejected if rejection.policy})
            detail = (
                f" ({len(result.rejected)} left out: {', '.join(reasons)})" if reasons else " (empty list)"
            )
            raise BridgeMalformedError(
                f"the answer holds no usable policy{detail}", reason="no_usable_policy"
            )
        return snapshot

    async def adopt(self, derived: DerivedSnapshot, age: float) -> None:
        """Serves a snapshot another replica polled ``age`` seconds ago (a follower of the poller gate)."""
        self.latest = derived
        self.last_success = self.clock.monotonic() - max(0.0, age)
        self.last_error = None
        if self._on_snapshot is not None:
            await self._on_snapshot(derived)

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
        self.not_before = None
        self._report_policies(derived)
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

    def _report_policies(self, derived: DerivedSnapshot) -> None:
        """Missing policies and thresholds naming a policy the Bridge did not return: logged when new."""
        names = {state.reading.name for state in derived.states}
        for name in derived.missing:
            if name not in self._last_missing:
                log.warning(
                    "policy %s, seen before, is missing from the Bridge's answer",
                    name,
                    extra={"ctx": {"policy": name, "correlation_id": derived.snapshot.correlation_id}},
                )
        self._last_missing = frozenset(derived.missing)
        self.known |= names
        unmatched = self.thresholds - names
        for name in sorted(unmatched - self._reported_unmatched):
            log.warning(
                "POLICY_THRESHOLDS names %s, which the Bridge does not return (renamed or removed by DICT?)",
                name,
                extra={"ctx": {"policy": name}},
            )
        self._reported_unmatched = frozenset(unmatched)
        self._metrics.set_unmatched_thresholds(unmatched)

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
            # With replicas, the lease says whether this one polls now (exporter.service.leader); then
            # this process's own ceiling of list calls applies.
            if self.gate is not None and not await self.gate.permit():
                pass  # another replica polls this interval; its snapshot is adopted (adopt())
            elif (reason := await self._budget_skip_reason()) is not None:
                # Not a failure (nothing was called): the data served keeps its age, which is visible.
                self.skipped += 1
                self._metrics.record_skip()
                log.info("poll skipped: %s", reason, extra={"ctx": {"skipped": self.skipped}})
            else:
                self._inflight = asyncio.ensure_future(self.poll_once())
                try:
                    await asyncio.shield(self._inflight)
                except Exception:
                    # Bridge trouble never gets here: this is a bug (e.g. in rendering). /health/live says.
                    log.exception("the poll loop stopped")
                    raise
            # Computed after the poll: a poll that overran a boundary skips it instead of bunching up.
            now = clock.time()
            await clock.sleep(next_poll_at(now, self.interval, self.lead) - now)

    async def _budget_skip_reason(self) -> str | None:
        await self._wait_for_budget()
        return self.skip_reason()

    async def _wait_for_budget(self) -> None:
        """Waits a moment for a call the ceiling frees just after the boundary, instead of skipping the poll.

        At 2 calls/min and 30 s, the call two polls back was made a few milliseconds after its boundary, so
        this boundary comes a few milliseconds before it leaves the 60 s window: without this wait, every
        third poll would be skipped in a perfectly healthy run.
        """
        if self.budget is None:
            return
        wait = self.budget.wait_seconds()
        if 0 < wait <= min(BUDGET_GRACE_SECONDS, 0.1 * self.interval):
            await self.clock.sleep(wait)

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
