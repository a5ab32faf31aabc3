"""The hard ceiling on Bridge list calls: at most N attempts in any 60 s, retries included.

Every list call reaches DICT and costs a POLICIES_LIST token even when DICT answers 429 or 503, so the
ceiling counts attempts, not polls. It is a sliding window over the monotonic clock: a call is allowed only
if fewer than ``calls_per_minute`` calls were made in the last 60 s, which bounds every failure mode
(retries, slow answers, a Bridge that always fails) by the budget the operator configured.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

WINDOW_SECONDS = 60.0


class CallBudget:
    """Sliding-window ceiling of calls per minute; ``acquire()`` records a call when one is allowed."""

    def __init__(
        self,
        calls_per_minute: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        window_seconds: float = WINDOW_SECONDS,
    ) -> None:
        """``window_seconds`` other than 60 only to scale time in tests: the limit scales with it."""
        self.window = window_seconds
        self.limit = math.floor(calls_per_minute * window_seconds / WINDOW_SECONDS + 1e-9)
        if self.limit < 1:
            raise ValueError("a call budget needs at least 1 call per window")
        self._clock = clock
        self._calls: deque[float] = deque()

    def _forget(self, now: float) -> None:
        while self._calls and now - self._calls[0] >= self.window:
            self._calls.popleft()

    def available_at(self) -> float:
        """Monotonic time from which a call is allowed (now when one is allowed at once)."""
        now = self._clock()
        self._forget(now)
        if len(self._calls) < self.limit:
            return now
        return self._calls[len(self._calls) - self.limit] + self.window

    def wait_seconds(self) -> float:
        """Seconds until a call is allowed; 0 when one is allowed now."""
        return max(0.0, self.available_at() - self._clock())

    def acquire(self) -> bool:
        """Records one call and returns True, or returns False (nothing recorded) when the budget is spent."""
        now = self._clock()
        self._forget(now)
        if len(self._calls) >= self.limit:
            return False
        self._calls.append(now)
        return True

    def calls_in_window(self) -> int:
        self._forget(self._clock())
        return len(self._calls)
