"""Clocks for the simulator: the real one, and a manual one tests move forward by hand."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    """Seconds since the Unix epoch (UTC). The simulator reads time only through this."""

    def time(self) -> float: ...


class RealClock:
    def time(self) -> float:
        return time.time()


class ManualClock:
    """A clock that moves only when told to: ``advance(seconds)``. Starts at ``start`` (default: now)."""

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go backwards")
        self._now += seconds


def utc_ms(clock: Clock) -> datetime:
    """The clock's time as an aware UTC datetime truncated to milliseconds, as DICT's ResponseTime."""
    millis = int(clock.time() * 1000)
    return datetime.fromtimestamp(millis / 1000, UTC)
