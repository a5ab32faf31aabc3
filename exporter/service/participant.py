"""One watched participant: its Bridge client, call budget, poller, poller lease and rendered series.

A single-participant exporter has one (``name`` None: no ``participant`` label anywhere, as before); a
multi-participant one has one per ``participants:`` entry, each with its own settings, so one Bridge
failing, stalling or spending its budget touches nothing of the others (docs/exporter.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from exporter import logsetup
from exporter.bridge.budget import CallBudget
from exporter.bridge.client import BridgeClient
from exporter.config import ExporterSettings, call_ceiling
from exporter.service import exposition
from exporter.service.collector import RenderedBuckets
from exporter.service.derivation import DerivedSnapshot
from exporter.service.leader import LeaseTiming, PollerLease, single_poller_collector
from exporter.service.poller import Fetch, PollClock, Poller
from exporter.service.selfmetrics import SelfMetrics

log = logging.getLogger(__name__)

#: The label every series of a participant carries in a multi-participant exporter.
PARTICIPANT_LABEL = "participant"


class ParticipantPoller:
    """Everything polled and served for one participant; the service wires the shared parts around it."""

    def __init__(
        self,
        settings: ExporterSettings,
        name: str | None = None,
        *,
        fetch: Fetch | None = None,
        clock: PollClock | None = None,
        budget: CallBudget | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.pair = None if name is None else exposition.label_pair(PARTICIPANT_LABEL, name)
        ceiling = call_ceiling(
            settings.poll_interval_seconds,
            settings.bridge_max_calls_per_minute,
            settings.poll_budget_override,
        )
        self.metrics = SelfMetrics(settings.poll_interval_seconds, process=name is None)
        # Each participant has its own POLICIES_LIST bucket at DICT, hence its own ceiling of list calls.
        self.budget = budget or CallBudget(ceiling)
        self.bridge: BridgeClient | None = None
        if fetch is None:
            fetch = self._bridge_fetch()
        self.poller = Poller(
            fetch,
            self.metrics,
            interval=settings.poll_interval_seconds,
            lead=settings.poll_lead_seconds,
            stale_after=settings.stale_after_intervals,
            on_snapshot=self._publish,
            clock=clock,
            budget=self.budget,
            max_skew=settings.bridge_max_clock_skew_seconds,
            thresholds=settings.policy_thresholds,
            error_404_window=settings.error_404_window_seconds,
        )
        self.lease: PollerLease | None = None
        #: dict_rate_limit_poller_leader and _replicas of this participant's lease (rendered per scrape).
        self.registry = CollectorRegistry(auto_describe=True)
        #: Where derived snapshots go besides the scrapes (the service's history writer), if anywhere.
        self.submit: Callable[[DerivedSnapshot], None] | None = None
        self.rendered = RenderedBuckets(None, settings.threshold_for, settings.error_404_window_seconds)
        self.withdrawn = self.rendered
        self.families: exposition.Families = {}
        self._tail: tuple[bytes, exposition.Families] = (b"", {})
        self._lease_cache: tuple[tuple[bool, int | None] | None, bytes] | None = None

    def _bridge_fetch(self) -> Fetch:
        self.bridge = BridgeClient.from_settings(
            self.settings, on_attempt=self.metrics.record_bridge_request, budget=self.budget
        )
        bridge = self.bridge

        async def fetch_from_bridge(seconds: float | None) -> Any:
            deadline = None if seconds is None else time.monotonic() + seconds
            return await bridge.list_policies(deadline=deadline)

        return fetch_from_bridge

    @property
    def lease_group(self) -> str:
        """POLLER_GROUP, and the participant's name after it: one lease (one poller) per participant."""
        group = self.settings.poller_group
        return group if self.name is None else f"{group}/{self.name}"

    def open_lease(self, database_url: str) -> None:
        s = self.settings
        timing = LeaseTiming(s.poll_interval_seconds, s.poller_lease_seconds, s.poll_lead_seconds)
        self.lease = PollerLease(
            database_url,
            group=self.lease_group,
            timing=timing,
            adopt=self.poller.adopt,
            max_age=s.stale_after_intervals * s.poll_interval_seconds,
        )
        self.poller.gate = self.lease
        self.registry.register(self.lease.collector)

    def without_lease(self) -> None:
        self.registry.register(single_poller_collector())

    async def start_lease(self) -> None:
        """Elects (or not) before the first poll; the lease's task logs with the participant's name."""
        if self.lease is not None:
            with self._logging():
                await self.lease.start()

    def start_polling(self) -> None:
        with self._logging():
            self.poller.start()  # the poll task inherits the log context

    @contextlib.contextmanager
    def _logging(self) -> Iterator[None]:
        if self.name is None:
            yield
            return
        token = logsetup.log_context.set({"participant": self.name})
        try:
            yield
        finally:
            logsetup.log_context.reset(token)

    async def stop(self) -> None:
        await self.poller.stop(min(STOP_POLL_SECONDS, self.settings.poll_interval_seconds))
        if self.lease is not None:
            await self.lease.stop()  # released at once: a follower takes over within a third of a lease

    async def close(self) -> None:
        if self.bridge is not None:
            await self.bridge.close()

    # --- the poller's output

    async def _publish(self, derived: DerivedSnapshot) -> None:
        if self.submit is not None:
            self.submit(dataclasses.replace(derived, participant=self.name or ""))
        # Rendered once here; every scrape until the next poll serves these bytes. In a worker thread:
        # 10,000 series take ~0.1-0.2 s of Python, during which scrapes keep being answered (old bytes).
        rendered, families = await asyncio.to_thread(self._render, derived)
        self.rendered, self.families = rendered, families

    def _render(self, derived: DerivedSnapshot) -> tuple[RenderedBuckets, exposition.Families]:
        window = self.settings.error_404_window_seconds
        rendered = RenderedBuckets(derived, self.settings.threshold_for, window)
        families = exposition.split(rendered.text, self.pair) if self.pair is not None else {}
        return rendered, families

    # --- what the scrapes read (no I/O)

    def buckets(self) -> tuple[bool, RenderedBuckets]:
        """(stale, the bucket part to serve): nothing once the data is older than the stale bound."""
        stale = self.poller.is_stale()
        return stale, self.withdrawn if stale else self.rendered

    def own_series(self, stale: bool) -> bytes:
        """The participant's health series and lease series (text, unlabelled)."""
        return self.metrics.render(stale=stale) + self.lease_series()

    def lease_series(self) -> bytes:
        """dict_rate_limit_poller_leader and _replicas, rendered again only when the lease's state moved."""
        lease = self.lease
        state = None if lease is None else (lease.is_leader, lease.others)
        cached = self._lease_cache
        if cached is None or cached[0] != state:
            cached = self._lease_cache = (state, generate_latest(self.registry))
        return cached[1]

    def labelled_parts(self) -> list[exposition.Families]:
        """The participant's bucket and health families, labelled (multi-participant exporters)."""
        assert self.pair is not None
        stale, _ = self.buckets()
        tail = self.own_series(stale)
        if tail != self._tail[0]:
            self._tail = (tail, exposition.split(tail, self.pair))
        return [_WITHDRAWN if stale else self.families, self._tail[1]]

    def bridge_check(self) -> tuple[str, str | None]:
        """Readiness of this participant's data: ("ok" or why not, a note when ok despite a failure)."""
        poller = self.poller
        if poller.is_fresh():
            if poller.last_error is not None:
                # Still ready: the last good snapshot is fresh and served (unready would stop the scrapes
                # and resolve every bucket alert). But say why the last poll failed.
                return "ok", f"failed (serving the previous snapshot): {poller.last_error}"
            return "ok", None
        if poller.latest is None:
            return f"no successful poll yet: {poller.last_error or 'first poll pending'}", None
        return (
            f"no successful poll for {poller.stale_after} intervals (data withdrawn): {poller.last_error}",
            None,
        )


#: The bucket part of a stale participant (one object: the service caches the merged body by identity).
_WITHDRAWN: exposition.Families = {}
#: Longest wait for an in-flight poll at shutdown (further bounded by the interval).
STOP_POLL_SECONDS = 5.0
