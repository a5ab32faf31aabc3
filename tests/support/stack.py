"""Helpers of the tests that run the whole stack: an in-process simulator thread and Prometheus queries."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, TypeVar

from devstack.processes import http_json
from devstack.stack import Stack
from exporter.simulator.scenario import Scenario
from exporter.simulator.server import SimulatorServer

T = TypeVar("T")
POLICY = "CIDS_FILES_WRITE"  # capacity 200, refill 40 per DAY: it stays where the test puts it


class ThreadedSimulator:
    """The Bridge simulator on its own event loop thread; knobs run on that thread too (no races)."""

    def __init__(self, scenario: Scenario | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="simulator", daemon=True)
        self.server = SimulatorServer(scenario=scenario, listen="127.0.0.1:0")
        # The simulator charges each list call to POLICIES_LIST like DICT (6/min): at one poll a second
        # the test would drain it in 20 s. Without that policy, list calls are free.
        self.server.engine.remove_policy("POLICIES_LIST")

    def start(self) -> str:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(timeout=10)
        return self.server.address

    def call(self, function: Callable[[], T]) -> T:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(function())
            except BaseException as exc:  # pragma: no cover - surfaces in the test thread
                future.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return future.result(timeout=10)

    def set_tokens(self, tokens: float) -> float:
        """Sets the balance of POLICY; returns the wall-clock time it took effect."""

        def apply() -> float:
            self.server.engine.set_tokens(POLICY, tokens)
            return time.time()

        return self.call(apply)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


def prom_query(stack: Stack, expr: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{stack.ports.prometheus}/api/v1/query"
    result: list[dict[str, Any]] = http_json(f"{url}?query={_quote(expr)}")["data"]["result"]
    return result


def wait_for(condition: Callable[[], T], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _quote(text: str) -> str:
    return urllib.parse.quote(text, safe="")
