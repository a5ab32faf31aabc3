"""The 404 share over ERROR_404_WINDOW_SECONDS from the Bridge's cumulative answer counts (issue 15).

Every expected number below is worked out by hand in the comments: the share is the increase of 404s over
the increase of all answers between the snapshot at least a window old (or the oldest) and the last one,
each status's increase reset-corrected as Prometheus' increase() does.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from exporter.service.derivation import DerivedSnapshot, counts_increase, derive
from exporter.snapshot import PolicyReading, ResponseCounts, Snapshot

T0 = datetime(2026, 1, 5, 12, 0, 0, tzinfo=UTC)
LOOKUP = "ENTRIES_READ_PARTICIPANT_ANTISCAN"


def snap(at: float, counts: ResponseCounts | None) -> Snapshot:
    reading = PolicyReading(LOOKUP, 40_000, 50_000, 25_000, 60, counts)
    return Snapshot(T0 + timedelta(seconds=at), f"{int(at):032x}", "A", (reading,))


def shares(steps: list[tuple[float, ResponseCounts | None]], window: float = 300.0) -> list[float | None]:
    derived: DerivedSnapshot | None = None
    found = []
    for at, counts in steps:
        derived = derive(snap(at, counts), derived, error_404_window=window)
        found.append(derived.states[0].error_404_share)
    return found


def test_the_share_over_the_window_with_a_bridge_restart_inside_it() -> None:
    found = shares(
        [
            (0, ((200, 1000), (404, 0))),  # the first snapshot: nothing measured yet
            (60, ((200, 1090), (404, 10))),  # +90 +10: 10 / 100
            (120, ((200, 1180), (404, 30))),  # +90 +20: 30 / 210 since t=0
            (180, ((200, 50), (404, 5))),  # Bridge restarted: both lower, +50 +5: 35 / 265
            (240, ((200, 100), (404, 5))),  # +50 +0: 35 / 315
            (300, ((200, 150), (404, 15))),  # +50 +10: 45 / 375 (t=0 is exactly a window old)
            (360, ((200, 240), (404, 15))),  # +90 +0; anchor t=60 (100 answers, 10 404s): 35 / 365
        ]
    )
    assert found == [None, 10 / 100, 30 / 210, 35 / 265, 35 / 315, 45 / 375, 35 / 365]


def test_without_reset_handling_a_restart_would_read_as_negative_traffic() -> None:
    # The restart makes the 200s fall from 1180 to 50: the increase is 50, not -1130.
    assert counts_increase(((200, 1180), (404, 30)), ((200, 50), (404, 5))) == (55, 5)
    # Per status, as Prometheus does: only the status that went back is reset.
    assert counts_increase(((200, 100), (404, 30)), ((200, 150), (404, 5))) == (55, 5)
    # A status the Bridge lists for the first time counts from 0 (its first 429s).
    assert counts_increase(((200, 100),), ((200, 110), (429, 7))) == (17, 0)


def test_no_counts_and_no_answers_in_the_window_give_no_share_never_a_zero() -> None:
    # An old-style Bridge: no counts at all.
    assert shares([(0, None), (60, None), (120, None)]) == [None, None, None]
    # Counts that do not move: no answer was counted in the window, so there is no share (not 0).
    quiet = ((200, 500), (404, 20), (429, 0))
    assert shares([(0, quiet), (60, quiet), (120, quiet)]) == [None, None, None]
    # Answers without a 404 are a true 0.
    assert shares([(0, quiet), (60, ((200, 600), (404, 20), (429, 0)))]) == [None, 0.0]


def test_counts_that_stop_and_come_back_start_a_new_window() -> None:
    found = shares(
        [
            (0, ((200, 0), (404, 0))),
            (60, ((200, 90), (404, 10))),  # 10 / 100
            (120, None),  # the Bridge sent no counts this time
            (180, ((200, 5000), (404, 4000))),  # first snapshot of a new window: nothing measured
            (240, ((200, 5090), (404, 4010))),  # 10 / 100 again, nothing carried from before the gap
        ]
    )
    assert found == [None, 0.1, None, None, 0.1]


def test_a_response_time_that_does_not_advance_keeps_the_share() -> None:
    first = derive(snap(0, ((200, 0), (404, 0))), None)
    second = derive(snap(60, ((200, 75), (404, 25))), first)
    again = derive(snap(60, ((200, 75), (404, 25))), second)
    assert second.states[0].error_404_share == again.states[0].error_404_share == 0.25
    assert again.states[0].count_window == second.states[0].count_window


@pytest.mark.parametrize("window", [300.0, 86_400.0])
def test_the_count_window_stays_bounded_whatever_the_poll_interval(window: float) -> None:
    derived: DerivedSnapshot | None = None
    for i in range(4000):  # every 0.5 s for 2000 s
        counts = ((200, 9 * i), (404, i))
        derived = derive(snap(i * 0.5, counts), derived, error_404_window=window)
    assert derived is not None
    state = derived.states[0]
    assert len(state.count_window) <= 260
    assert state.error_404_share == pytest.approx(0.1)
