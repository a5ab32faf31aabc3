"""Token-bucket arithmetic (dict-domain.md §4): the values derived from consecutive snapshots.

Every formula works with DICT's clock (``ResponseTime``), accepts negative balances, and never divides by
zero: a snapshot whose ResponseTime does not advance yields no consumption and no rate.

Two things make DICT's buckets harder than the textbook formula, and both are handled here without knowing
how DICT refills (continuously, or ``RefillTokens`` at once every ``RefillPeriodSec``):

* **Step refill.** Over one poll interval a stepped bucket gains 0 or a whole step, where the formula
  credits ``rate x interval``. The per-interval estimate is therefore kept *signed* (a step interval
  looks like negative consumption) and summed; the sum telescopes, so over any span its error is at most
  one step, whatever the phase of DICT's steps. The counter is the running maximum of that sum (never
  decreasing, never negative), and the rate is measured over a window as close as possible to a whole
  number of refill periods, which holds exactly the same number of steps as the continuous formula
  credits: the projection does not alternate between "soon" and "never".
* **Answer counts.** The Bridge's ``response_counts`` are cumulative since the Bridge started and go back
  to 0 when it restarts. They are exported as they come (Prometheus handles the reset); the 404 share
  needs their increase, computed per status as Prometheus' ``increase()`` does: a count lower than the
  previous one was reset, and its whole value is the increase since.
* **Limit changes.** When capacity or refill differs from the previous snapshot (a category change, a new
  API version), the balance was clamped or re-based by DICT, not consumed: that interval yields no
  consumption, no rate and no projection, and measurement restarts from the new snapshot.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from exporter.snapshot import PolicyReading, ResponseCounts, Snapshot

#: Longest span of past snapshots kept per policy to measure the rate over (seconds of DICT's clock).
MAX_WINDOW_SECONDS = 900.0
#: Most past snapshots kept per policy, whatever the interval.
MAX_WINDOW_POINTS = 64
#: Window lengths within this share of a refill period of a whole number of periods count as aligned.
ALIGNMENT_TOLERANCE = 0.02

#: (ResponseTime as Unix seconds, signed running sum) of one past snapshot of a policy.
WindowPoint = tuple[float, float]
#: (ResponseTime as Unix seconds, answers counted, of which 404) since the exporter began counting, reset
#: corrected: a running sum of per-interval increases, so a Bridge restart never makes it go back.
CountPoint = tuple[float, float, float]
#: Default window of the 404 share (ERROR_404_WINDOW_SECONDS).
DEFAULT_ERROR_404_WINDOW_SECONDS = 300.0
#: The count window keeps about this many points per window however short the poll interval: a point
#: younger than window/COUNT_POINTS_PER_WINDOW after the one before replaces the last instead of adding.
COUNT_POINTS_PER_WINDOW = 256
NOT_FOUND = 404


@dataclass(frozen=True, slots=True)
class PolicyState:
    """One bucket of a snapshot with its derived values."""

    reading: PolicyReading
    remaining_ratio: float
    utilization_percent: float
    #: Gross tokens consumed since the previous snapshot (the counter's increase, >= 0); None for the
    #: first snapshot of a policy, after a limit change and when ResponseTime did not advance.
    consumed_tokens: float | None
    #: Gross tokens consumed since the exporter started (the counter Prometheus rates); a lower bound.
    consumed_tokens_total: float
    #: Gross consumption per minute over the measuring window; None without a usable previous snapshot.
    consumption_rate_per_minute: float | None
    recovery_eta_seconds: float
    #: Seconds to an empty bucket at the current gross rate; 0 when already <= 0; None means "never"
    #: (or "unknown": right after a limit change).
    exhaustion_projection_seconds: float | None
    #: Signed running sum of the per-interval estimates; at most one refill step below the counter.
    signed_total: float = 0.0
    #: Past snapshots of this policy (oldest first, this one last) the rate is measured over.
    window: tuple[WindowPoint, ...] = ()
    #: True when capacity or refill differ from the previous snapshot's: nothing was measured.
    limits_changed: bool = False
    #: Share (0..1) of 404 among the answers counted over the 404 window; None without counts, before a
    #: second snapshot with counts, or when no answer was counted in the window (never a made-up 0).
    error_404_share: float | None = None
    #: Reset-corrected count totals of past snapshots (oldest first, this one last) the share is over.
    count_window: tuple[CountPoint, ...] = ()


@dataclass(frozen=True, slots=True)
class DerivedSnapshot:
    """A snapshot with every policy's derived values; what the collector renders and history stores."""

    snapshot: Snapshot
    states: tuple[PolicyState, ...]
    #: True when the category differs from the previous snapshot's (BCB changed it).
    category_changed: bool
    #: Policies an earlier successful poll returned that this snapshot lacks (set by the poller).
    missing: tuple[str, ...] = ()
    #: The participant's name in a multi-participant exporter, "" for a single participant (history rows).
    participant: str = ""


def remaining_ratio(reading: PolicyReading) -> float:
    return reading.available_tokens / reading.capacity


def recovery_eta_seconds(reading: PolicyReading) -> float:
    """Seconds to a full bucket at the refill rate if nothing is consumed; +inf when it never refills."""
    missing = max(0, reading.capacity - reading.available_tokens)
    if missing == 0:
        return 0.0
    # RefillTokens 0 is valid (only negative is rejected): such a bucket never recovers.
    rate = reading.refill_rate_per_second
    return missing / rate if rate > 0 else math.inf


def interval_estimate(previous: PolicyReading, current: PolicyReading, elapsed_seconds: float) -> float:
    """Net drop plus the refill the continuous formula credits; negative when the balance rose faster.

    Refill above capacity is discarded, so the refill credited is at most what the previous balance was
    missing. Negative values are real information for a stepped bucket (a step landed in the interval)
    and for payment orders that give tokens back: the caller sums them instead of dropping them.
    """
    refill = min(
        current.refill_rate_per_second * elapsed_seconds,
        max(0, previous.capacity - previous.available_tokens),
    )
    return float(previous.available_tokens - current.available_tokens) + refill


def gross_consumption(previous: PolicyReading, current: PolicyReading, elapsed_seconds: float) -> float:
    """Tokens consumed between two readings, alone (no window): the interval estimate, never negative."""
    return max(0.0, interval_estimate(previous, current, elapsed_seconds))


def exhaustion_projection_seconds(reading: PolicyReading, rate_per_second: float | None) -> float | None:
    """Seconds until the balance reaches 0 if consumption keeps its rate; None when it is not draining."""
    if reading.available_tokens <= 0:
        return 0.0
    if rate_per_second is None:
        return None
    drain = rate_per_second - reading.refill_rate_per_second
    if drain <= 0:
        return None
    return reading.available_tokens / drain


def limits_differ(previous: PolicyReading, current: PolicyReading) -> bool:
    return (previous.capacity, previous.refill_tokens, previous.refill_period_sec) != (
        current.capacity,
        current.refill_tokens,
        current.refill_period_sec,
    )


def window_rate(window: tuple[WindowPoint, ...], period: float) -> float | None:
    """Tokens/s between the window's last point and the best anchor before it; None without one.

    The anchor is the youngest past point whose age is (within ALIGNMENT_TOLERANCE) a whole number of
    refill periods, so the window holds exactly the steps the continuous formula credits; when no point
    is a period old yet (or the period is longer than the window), the oldest point is used.
    """
    if len(window) < 2:
        return None
    now, total = window[-1]
    past = [(now - at, signed) for at, signed in window[:-1] if now - at > 0]
    if not past:
        return None
    aligned = [(age, signed) for age, signed in past if age >= period * (1 - ALIGNMENT_TOLERANCE)]
    if aligned:
        best = min(_misalignment(age, period) for age, _ in aligned)
        age, signed = min(
            (p for p in aligned if _misalignment(p[0], period) <= best + ALIGNMENT_TOLERANCE),
            key=lambda p: p[0],
        )
    else:
        age, signed = max(past, key=lambda p: p[0])
    return max(0.0, total - signed) / age


def _misalignment(age: float, period: float) -> float:
    """Distance of ``age`` to the nearest whole number of periods, as a share of one period."""
    periods = age / period
    return abs(periods - round(periods))


def derive(
    current: Snapshot,
    previous: DerivedSnapshot | None,
    *,
    error_404_window: float = DEFAULT_ERROR_404_WINDOW_SECONDS,
) -> DerivedSnapshot:
    """Derives every policy of ``current`` against the previous derived snapshot (None at start-up).

    ``error_404_window``: seconds of answer counts the 404 share is computed over."""
    elapsed = 0.0
    previous_states: dict[str, PolicyState] = {}
    if previous is not None:
        elapsed = (current.response_time - previous.snapshot.response_time).total_seconds()
        previous_states = {state.reading.name: state for state in previous.states}
    at = current.response_time.timestamp()
    states = tuple(
        _with_counts(
            _derive_policy(reading, previous_states.get(reading.name), elapsed, at),
            previous_states.get(reading.name),
            at,
            error_404_window,
        )
        for reading in current.policies
    )
    changed = previous is not None and previous.snapshot.category != current.category
    return DerivedSnapshot(snapshot=current, states=states, category_changed=changed)


def _derive_policy(
    reading: PolicyReading, previous: PolicyState | None, elapsed: float, at: float
) -> PolicyState:
    if previous is None:
        return _state(reading, None, 0.0, 0.0, ((at, 0.0),), None)
    total = previous.consumed_tokens_total
    if limits_differ(previous.reading, reading):
        # DICT re-based the balance (clamped to a lower capacity, or a new refill): not consumption.
        return _state(reading, None, total, total, ((at, total),), None, limits_changed=True)
    if elapsed <= 0:
        # A ResponseTime that does not advance (or goes back) gives no interval to measure over.
        rate = previous.consumption_rate_per_minute
        return _state(
            reading, None, total, previous.signed_total, previous.window, None if rate is None else rate / 60
        )
    estimate = interval_estimate(previous.reading, reading, elapsed)
    # The signed sum may fall below the counter by at most one refill step (what a stepped bucket can
    # show at once): a larger deficit (tokens given back by payments) is not carried against later use.
    signed = max(previous.signed_total + estimate, total - reading.refill_tokens)
    new_total = max(total, signed)
    window = _trim((*previous.window, (at, signed)), reading.refill_period_sec)
    rate = window_rate(window, reading.refill_period_sec)
    return _state(reading, new_total - total, new_total, signed, window, rate)


def counts_increase(previous: ResponseCounts, current: ResponseCounts) -> tuple[int, int]:
    """(answers, of which 404) counted between two readings, each status reset-corrected on its own.

    As Prometheus' ``increase()``: a count below the previous one means the Bridge restarted and counted
    it again from 0, so its whole value is the increase; a status not listed before counts from 0.
    """
    before = dict(previous)
    answers = not_found = 0
    for code, count in current:
        earlier = before.get(code, 0)
        increase = count - earlier if count >= earlier else count
        answers += increase
        if code == NOT_FOUND:
            not_found += increase
    return answers, not_found


def error_404_share(window: tuple[CountPoint, ...], seconds: float) -> float | None:
    """404s / answers between the window's last point and the youngest one at least ``seconds`` older
    (the oldest while the window is not full yet); None when no answer was counted in between."""
    if len(window) < 2:
        return None
    now, answers, not_found = window[-1]
    anchors = [point for point in window[:-1] if now - point[0] >= seconds]
    _, answers_then, not_found_then = anchors[-1] if anchors else window[0]
    counted = answers - answers_then
    if counted <= 0:
        return None
    return (not_found - not_found_then) / counted


def _with_counts(state: PolicyState, previous: PolicyState | None, at: float, seconds: float) -> PolicyState:
    """The state with its count window and 404 share (see :func:`error_404_share`)."""
    counts = state.reading.response_counts
    if counts is None:
        return state  # no counts this time: the window starts again when they come back
    before = previous.reading.response_counts if previous is not None else None
    if previous is None or before is None or not previous.count_window:
        return _replace_counts(state, ((at, 0.0, 0.0),), None)
    last = previous.count_window[-1]
    if at <= last[0]:
        # ResponseTime did not advance: nothing new to measure, the previous share stands.
        return _replace_counts(state, previous.count_window, previous.error_404_share)
    answers, not_found = counts_increase(before, counts)
    point = (at, last[1] + answers, last[2] + not_found)
    window = _trim_counts(previous.count_window, point, seconds)
    return _replace_counts(state, window, error_404_share(window, seconds))


def _trim_counts(window: tuple[CountPoint, ...], point: CountPoint, seconds: float) -> tuple[CountPoint, ...]:
    """``window`` plus ``point``, without the points the share over ``seconds`` no longer needs: the
    youngest point at least ``seconds`` old is kept as the anchor, older ones go. Points are kept at least
    seconds/COUNT_POINTS_PER_WINDOW apart (a last point closer than that to the one before is replaced),
    so a fast poll and a long window keep a bounded window, at the cost of an anchor at most that much
    further back than it would otherwise be."""
    step = seconds / COUNT_POINTS_PER_WINDOW
    points = list(window)
    if len(points) >= 2 and points[-1][0] - points[-2][0] < step:
        points[-1] = point  # the last point came too soon after the one before: the new one replaces it
    else:
        points.append(point)
    now = point[0]
    anchors = [index for index, past in enumerate(points[:-1]) if now - past[0] >= seconds]
    return tuple(points[anchors[-1] :] if anchors else points)


def _replace_counts(state: PolicyState, window: tuple[CountPoint, ...], share: float | None) -> PolicyState:
    return dataclasses.replace(state, count_window=window, error_404_share=share)


def _trim(window: tuple[WindowPoint, ...], period: float) -> tuple[WindowPoint, ...]:
    """Keeps the points a window of up to two refill periods needs (bounded), and always the last two."""
    now = window[-1][0]
    keep = min(MAX_WINDOW_SECONDS, 2 * period + 1)
    kept = [point for point in window[:-2] if now - point[0] <= keep]
    return (*kept, *window[-2:])[-MAX_WINDOW_POINTS:]


def _state(  # noqa: PLR0917 - private, called with the values in the order of PolicyState
    reading: PolicyReading,
    consumed: float | None,
    total: float,
    signed: float,
    window: tuple[WindowPoint, ...],
    rate_per_second: float | None,
    *,
    limits_changed: bool = False,
) -> PolicyState:
    ratio = remaining_ratio(reading)
    return PolicyState(
        reading=reading,
        remaining_ratio=ratio,
        utilization_percent=100.0 * (1.0 - ratio),
        consumed_tokens=consumed,
        consumed_tokens_total=total,
        consumption_rate_per_minute=rate_per_second * 60 if rate_per_second is not None else None,
        recovery_eta_seconds=recovery_eta_seconds(reading),
        exhaustion_projection_seconds=exhaustion_projection_seconds(reading, rate_per_second),
        signed_total=signed,
        window=window,
        limits_changed=limits_changed,
    )
