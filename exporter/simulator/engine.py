"""The simulator's bucket engine: DICT's buckets for a category, driven by a scenario on a clock."""

from __future__ import annotations

import logging
import math
import random
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from exporter.simulator import policy_table as dp
from exporter.simulator import scenario as sc
from exporter.simulator.bucket import CONTINUOUS, PERIOD, SimBucket
from exporter.simulator.clock import Clock, RealClock, utc_ms
from exporter.snapshot import PolicyReading

log = logging.getLogger(__name__)

#: 404 shares are reported over this many seconds of simulated traffic.
NOT_FOUND_WINDOW_SECONDS = 60.0
#: DICT's answers the simulated Bridge counts: served, key not found (lookups), bucket empty.
OK, NOT_FOUND, TOO_MANY = 200, 404, 429
#: Statuses every policy lists from the start (count 0), as a Bridge should: a series that exists before
#: its first event lets Prometheus' increase() see that first event.
COUNTED_CODES = (OK, NOT_FOUND, TOO_MANY)


@dataclass
class _Stream:
    """Requests on one policy at ``rate`` per minute; fractions carry over so no request is lost."""

    policy: str
    rate: float
    jitter: float = 0.0
    not_found: float = 0.0
    start: float = 0.0
    until: float = math.inf
    pending: float = 0.0
    pending_404: float = 0.0


class BucketEngine:
    """All buckets of one participant. Time advances in fixed ticks of scenario time, so the same seed and
    scenario give the same balances however often (or whenever) the engine is read."""

    def __init__(
        self,
        *,
        category: str = "A",
        scenario: sc.Scenario | None = None,
        seed: int = 0,
        refill: str = CONTINUOUS,
        clock: Clock | None = None,
        tick: float = 1.0,
    ) -> None:
        if refill not in (CONTINUOUS, PERIOD):
            raise ValueError(f"refill must be {CONTINUOUS} or {PERIOD} (got {refill!r})")
        self.clock = clock or RealClock()
        self.start = self.clock.time()
        self.tick = tick
        self.scenario = scenario or sc.Scenario(name="none")
        self._fault_window: tuple[str, float] | None = None
        self._fault_queue: deque[str] = deque()
        self.category = category
        # A scenario that is about the refill mode (step-refill) fixes it whatever --refill says.
        self._refill = self.scenario.refill or refill
        # Two generators: traffic draws never depend on how many calls asked for a correlation id.
        self._rng = random.Random(seed)  # noqa: S311 - simulation, not secrecy
        self._ids = random.Random(f"correlation-ids-{seed}")  # noqa: S311
        self._buckets = {spec.name: self._bucket(spec) for spec in dp.policies_for(category)}
        self._base: dict[str, _Stream] = {}
        self._extra: list[_Stream] = []
        self._window: dict[str, deque[tuple[int, int]]] = {}
        self._tick_counts: dict[str, tuple[int, int]] = {}
        self._404_override: dict[str, float | None] = {}
        #: policy -> HTTP status -> answers since the (simulated) Bridge started; see restart_counts().
        self._answers: dict[str, dict[int, int]] = {}
        self._latency = (0.0, math.inf)
        self._error_window: tuple[str, float] | None = None
        self._error_queue: deque[str] = deque()
        self._ticks = 0
        self._cycle = 0
        self._cycle_start = 0.0
        self._cursor = 0
        self._start_cycle(0.0)

    # --- time

    def advance(self) -> None:
        """Plays every whole tick up to the clock's time."""
        target = math.floor((self.clock.time() - self.start) / self.tick + 1e-9)
        while self._ticks < target:
            self._ticks += 1
            self._step(self._ticks * self.tick)

    def _step(self, s: float) -> None:
        now = self.start + s
        self._tick_counts = {}
        for stream in [*self._base.values(), *self._extra]:
            if stream.start < s <= stream.until:
                self._run(stream, now)
        self._extra = [stream for stream in self._extra if stream.until > s]
        for policy, window in self._window.items():
            window.append(self._tick_counts.get(policy, (0, 0)))
        repeat = self.scenario.repeat
        if repeat is not None and math.floor(s / repeat + 1e-9) > self._cycle:
            self._cycle += 1
            self._start_cycle(s)
        self._fire_events(s)

    def _start_cycle(self, s: float) -> None:
        self._cycle_start = s
        self._cursor = 0
        self._base = {t.policy: self._stream(t, s) for t in self.scenario.traffic}
        self._extra = []
        if s > 0:
            log.info(
                "scenario restarts", extra={"ctx": {"scenario": self.scenario.name, "cycle": self._cycle}}
            )
        self._fire_events(s)

    def _fire_events(self, s: float) -> None:
        events = self.scenario.events
        while self._cursor < len(events) and events[self._cursor].at <= s - self._cycle_start + 1e-9:
            event = events[self._cursor]
            self._cursor += 1
            self._apply(event.action, s, self._cycle_start + event.at)

    def _run(self, stream: _Stream, now: float) -> None:
        bucket = self._buckets.get(stream.policy)
        if bucket is None:
            return  # the policy was removed: its traffic has nowhere to go
        factor = 1.0 + self._rng.uniform(-stream.jitter, stream.jitter) if stream.jitter else 1.0
        stream.pending += stream.rate / 60.0 * self.tick * factor
        requests = math.floor(stream.pending)
        stream.pending -= requests
        stream.pending_404 += requests * stream.not_found
        not_found = math.floor(stream.pending_404)
        stream.pending_404 -= not_found
        bucket.refill_to(now)
        served = bucket.admit(requests - not_found)
        served_404 = bucket.admit(not_found, dp.NOT_FOUND_COST)
        self._count(stream.policy, OK, served)
        self._count(stream.policy, NOT_FOUND, served_404)
        self._count(stream.policy, TOO_MANY, requests - served - served_404)
        # Once a policy sees lookups that can be 404, all its traffic counts in the share's denominator.
        if stream.not_found > 0 or stream.policy in self._window:
            window_ticks = max(1, round(NOT_FOUND_WINDOW_SECONDS / self.tick))
            self._window.setdefault(stream.policy, deque(maxlen=window_ticks))
            lookups, misses = self._tick_counts.get(stream.policy, (0, 0))
            self._tick_counts[stream.policy] = (lookups + served + served_404, misses + served_404)

    def _stream(self, traffic: sc.Traffic, s: float) -> _Stream:
        return _Stream(traffic.policy, traffic.rate, traffic.jitter, traffic.not_found, start=s)

    # --- scenario actions

    def _apply(self, action: sc.Action, s: float, cycle_at: float) -> None:
        """Applies one scenario event at scenario time ``s``; ``until`` fields are relative to the cycle."""
        end = self._cycle_start
        detail: dict[str, Any] = {}
        match action:
            case sc.Traffic():
                self._base[action.policy] = self._stream(action, s)
                detail = {"policy": action.policy, "rate_per_min": action.rate}
            case sc.Burst():
                bucket = self._live(action.policy, s)
                served = bucket.admit(action.requests, action.cost) if bucket else 0
                if bucket is not None:
                    self._count(action.policy, OK, served)
                    self._count(action.policy, TOO_MANY, action.requests - served)
                detail = {"policy": action.policy, "requests": action.requests, "served": served}
            case sc.Drain():
                rate = action.rate if action.rate is not None else self._drain_rate(action, s, end)
                self._extra.append(_Stream(action.policy, rate, start=s, until=end + action.until))
                detail = {"policy": action.policy, "rate_per_min": round(rate, 1), "until_s": action.until}
            case sc.Storm404():
                storm = _Stream(action.policy, action.rate, not_found=1.0, start=s, until=end + action.until)
                self._extra.append(storm)
                detail = {"policy": action.policy, "rate_per_min": action.rate, "until_s": action.until}
            case sc.CategoryChange():
                self._change_category(action.category, self.start + s)
                detail = {"category": action.category}
            case sc.AddPolicy():
                if action.name not in self._buckets:
                    spec = dp.PolicySpec(
                        action.name, action.refill_tokens, action.refill_period_sec, action.capacity
                    )
                    self._buckets[action.name] = self._bucket(spec, action.available, self.start + s)
                detail = {"policy": action.name}
            case sc.RemovePolicy():
                self._buckets.pop(action.name, None)
                detail = {"policy": action.name}
            case sc.Latency():
                self._latency = (action.seconds, math.inf if action.until is None else end + action.until)
                detail = {"seconds": action.seconds}
            case sc.InjectError() | sc.Fault():
                detail = self._schedule(action, end)
            case sc.BridgeRestart():
                self._answers.clear()
                detail = {"counts": "reset"}
        log.info(
            "scenario event",
            extra={"ctx": {"at_s": round(cycle_at - end, 3), "event": type(action).__name__, **detail}},
        )

    def _schedule(self, action: sc.InjectError | sc.Fault, end: float) -> dict[str, Any]:
        """Queues an injected error or broken answer for ``count`` calls, or opens a window to ``until``."""
        if isinstance(action, sc.InjectError):
            queue, what = self._error_queue, action.code
        else:
            queue, what = self._fault_queue, action.kind
        if action.count is not None:
            queue.extend([what] * action.count)
        elif action.until is not None:
            window = (what, end + action.until)
            if isinstance(action, sc.InjectError):
                self._error_window = window
            else:
                self._fault_window = window
        return {"code" if isinstance(action, sc.InjectError) else "kind": what, "count": action.count}

    def _live(self, policy: str, s: float) -> SimBucket | None:
        bucket = self._buckets.get(policy)
        if bucket is not None:
            bucket.refill_to(self.start + s)
        return bucket

    def _drain_rate(self, drain: sc.Drain, s: float, cycle_start: float) -> float:
        """Requests/min that, on top of the steady traffic, bring the bucket to ``to_ratio`` by ``until``."""
        bucket = self._live(drain.policy, s)
        if bucket is None or drain.to_ratio is None:
            return 0.0
        seconds = max(self.tick, cycle_start + drain.until - s)
        steady = self._base[drain.policy].rate / 60.0 if drain.policy in self._base else 0.0
        needed = (bucket.tokens - drain.to_ratio * bucket.capacity) / seconds + bucket.rate
        return max(0.0, needed - steady) * 60.0

    def _bucket(
        self, spec: dp.PolicySpec, available: float | None = None, now: float | None = None
    ) -> SimBucket:
        """A bucket as of ``now``: the clock's present for knobs, the tick's time for scenario events, so a
        replayed tick never stamps a bucket with a later time than its own."""
        now = self.clock.time() if now is None else now
        tokens = float(spec.capacity if available is None else available)
        return SimBucket(
            spec.name, spec.capacity, spec.refill_tokens, spec.refill_period_sec, tokens, now, self.start,
            self._refill,
        )  # fmt: skip

    # --- reads (what the gRPC servicer answers)

    def readings(self) -> tuple[PolicyReading, ...]:
        self.advance()
        return tuple(self._reading(bucket) for bucket in self._buckets.values())

    def reading(self, name: str) -> PolicyReading | None:
        self.advance()
        bucket = self._buckets.get(name)
        return self._reading(bucket) if bucket else None

    def _reading(self, bucket: SimBucket) -> PolicyReading:
        bucket.refill_to(self.clock.time())
        return PolicyReading(
            bucket.name, bucket.available, bucket.capacity, bucket.refill_tokens, bucket.refill_period_sec,
            self._counts(bucket.name),
        )  # fmt: skip

    def _count(self, policy: str, code: int, answers: int) -> None:
        if answers > 0:
            counts = self._answers.setdefault(policy, {})
            counts[code] = counts.get(code, 0) + answers

    def response_counts(self, policy: str) -> tuple[tuple[int, int], ...]:
        """DICT's answers to ``policy`` since the simulated Bridge started, by status (200, 404, 429 always
        listed, 0 until the first); what the gRPC answer's response_counts carry."""
        self.advance()
        return self._counts(policy)

    def _counts(self, policy: str) -> tuple[tuple[int, int], ...]:
        counts = dict.fromkeys(COUNTED_CODES, 0) | self._answers.get(policy, {})
        return tuple(sorted(counts.items()))

    def restart_counts(self) -> None:
        """The simulated Bridge restarts: every answer count goes back to 0 (buckets are DICT's: kept)."""
        self.advance()
        self._answers.clear()
        log.info(
            "simulated Bridge restart: answer counts reset", extra={"ctx": {"at_s": self._ticks * self.tick}}
        )

    def error_404_rate(self, policy: str) -> float | None:
        if policy in self._404_override:
            return self._404_override[policy]
        window = self._window.get(policy)
        if window is None:
            return None  # this policy never saw lookups that can be 404: the Bridge has no share to give
        lookups = sum(count for count, _ in window)
        return sum(misses for _, misses in window) / lookups if lookups else 0.0

    def tokens(self, policy: str) -> float:
        """The exact (fractional) balance now; tests read it, the gRPC answer rounds it down."""
        self.advance()
        bucket = self._buckets[policy]
        bucket.refill_to(self.clock.time())
        return bucket.tokens

    def charge_call(self, policy: str) -> bool:
        """Spends one token of POLICIES_LIST/POLICIES_READ for a call; False (429) when under 1."""
        self.advance()
        bucket = self._buckets.get(policy)
        if bucket is None:
            return True
        bucket.refill_to(self.clock.time())
        admitted = bucket.admit(1) == 1
        self._count(policy, OK if admitted else TOO_MANY, 1)
        return admitted

    def next_error(self) -> str | None:
        """The status the next call must fail with, if any (a queued count first, then a time window)."""
        self.advance()
        if self._error_queue:
            return self._error_queue.popleft()
        if self._error_window and self._ticks * self.tick < self._error_window[1]:
            return self._error_window[0]
        return None

    def next_fault(self) -> str | None:
        """The kind of broken answer the next list call must get, if any (see scenario.FAULT_KINDS)."""
        self.advance()
        if self._fault_queue:
            return self._fault_queue.popleft()
        if self._fault_window and self._ticks * self.tick < self._fault_window[1]:
            return self._fault_window[0]
        return None

    def inject_fault(self, kind: str, count: int = 1) -> None:
        if kind not in sc.FAULT_KINDS:
            raise ValueError(f"{kind!r} is not one of {', '.join(sorted(sc.FAULT_KINDS))}")
        self._fault_queue.extend([kind] * count)

    def consumed(self, policy: str) -> float:
        """True tokens spent on ``policy`` since the start (what the exporter's counter estimates)."""
        self.advance()
        return self._buckets[policy].spent

    def latency(self) -> float:
        self.advance()
        seconds, until = self._latency
        return seconds if self._ticks * self.tick < until else 0.0

    def correlation_id(self) -> str:
        return f"{self._ids.getrandbits(128):032x}"

    def response_time(self) -> datetime:
        return utc_ms(self.clock)

    def policy_names(self) -> tuple[str, ...]:
        return tuple(self._buckets)

    # --- test knobs (each first plays time up to now, so it acts at the clock's present)

    def set_tokens(self, policy: str, value: float) -> None:
        self.advance()
        bucket = self._buckets[policy]
        bucket.refill_to(self.clock.time())
        bucket.tokens = min(float(value), float(bucket.capacity))

    def consume(self, policy: str, n: float) -> None:
        self.advance()
        bucket = self._buckets[policy]
        bucket.refill_to(self.clock.time())
        bucket.charge(n)

    def set_category(self, letter: str) -> None:
        if letter not in dp.CATEGORY_LIMITS:
            raise ValueError(f"unknown DICT category {letter!r}")
        self.advance()
        self._change_category(letter, self.clock.time())

    def _change_category(self, letter: str, now: float) -> None:
        self.category = letter
        for name in dp.CATEGORY_POLICIES:
            bucket = self._buckets.get(name)
            if bucket is not None:
                bucket.refill_to(now)
                spec = dp.category_spec(name, letter)
                bucket.set_limits(spec.capacity, spec.refill_tokens, spec.refill_period_sec)

    def add_policy(
        self,
        name: str,
        capacity: int,
        refill_tokens: int,
        refill_period_sec: int,
        *,
        available: float | None = None,
    ) -> None:
        self.advance()
        if name in self._buckets:
            raise ValueError(f"policy {name} already exists")
        self._buckets[name] = self._bucket(
            dp.PolicySpec(name, refill_tokens, refill_period_sec, capacity), available
        )

    def remove_policy(self, name: str) -> None:
        self.advance()
        if self._buckets.pop(name, None) is None:
            raise ValueError(f"no policy {name}")

    def inject_errors(self, code_name: str, count: int) -> None:
        if code_name not in sc.ERROR_CODES:
            raise ValueError(f"{code_name!r} is not a gRPC status name other than OK")
        self._error_queue.extend([code_name] * count)

    def inject_latency(self, seconds: float) -> None:
        self._latency = (seconds, math.inf)

    def set_error_404_rate(self, policy: str, rate: float | None) -> None:
        """Forces the reported 404 share of ``policy`` (None: reported absent)."""
        self._404_override[policy] = rate
