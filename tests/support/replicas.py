"""Exporter replicas as real processes against a Bridge that counts its calls (tests and bench/).

:class:`CountingBridge` is a gRPC server over the project's proto, in threads of the test process: every
GetRateLimitPolicies call is recorded (time, ResponseTime) and answers a fresh snapshot whose balances
fall a little at each call, so consumption counters move. :class:`Replica` runs
``dict-rate-limit exporter`` as a child process that can be killed, frozen, thawed and scraped.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from concurrent import futures
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc
from prometheus_client.parser import text_string_to_metric_families

from exporter.bridge.proto import rate_limit_pb2 as pb
from exporter.bridge.proto import rate_limit_pb2_grpc as pb_grpc

T = TypeVar("T")
POLICIES = (
    ("ENTRIES_WRITE", 36000, 1200, 60),
    ("KEYS_CHECK", 70000, 1000, 60),
    ("CLAIMS_READ", 1800, 10, 60),
)
COMMAND = str(Path(sys.executable).with_name("dict-rate-limit"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True, slots=True)
class Call:
    at: float  # time.time() when the call arrived
    response_time: datetime


class _Servicer(pb_grpc.RateLimitServiceServicer):
    def __init__(self, bridge: CountingBridge) -> None:
        self._bridge = bridge

    def GetRateLimitPolicies(
        self, request: pb.GetRateLimitPoliciesRequest, context: grpc.ServicerContext
    ) -> pb.GetRateLimitPoliciesResponse:
        return self._bridge.answer()


class CountingBridge:
    """A Bridge that records every list call; ``calls`` is safe to read from the test thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: list[Call] = []
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_RateLimitServiceServicer_to_server(_Servicer(self), self._server)
        self.address = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"

    def start(self) -> CountingBridge:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=1).wait(5)

    def answer(self) -> pb.GetRateLimitPoliciesResponse:
        with self._lock:
            now = time.time()
            # Millisecond precision, as DICT's ResponseTime; strictly increasing even for calls 1 ms apart.
            millis = int(now * 1000)
            if self.calls:
                millis = max(millis, int(self.calls[-1].response_time.timestamp() * 1000) + 1)
            response_time = datetime.fromtimestamp(millis / 1000, tz=UTC)
            count = len(self.calls)
            self.calls.append(Call(now, response_time))
        response = pb.GetRateLimitPoliciesResponse(correlation_id=f"{count:032x}", category="A")
        response.response_time.FromDatetime(response_time)
        for name, capacity, refill, period in POLICIES:
            tokens = capacity - 50 * ((count % 40) + 1)  # drains, then refills: a saw tooth
            response.policies.append(
                pb.RateLimitPolicy(
                    name=name,
                    available_tokens=tokens,
                    capacity=capacity,
                    refill_tokens=refill,
                    refill_period_sec=period,
                )
            )
        return response

    def snapshot_calls(self) -> list[Call]:
        with self._lock:
            return list(self.calls)


class Replica:
    """One ``dict-rate-limit exporter`` child process with its own ports and log file."""

    def __init__(self, name: str, log_dir: Path, env: Mapping[str, str]) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.metrics_port, self.health_port = free_port(), free_port()
        self.env = {
            **os.environ,
            "LISTEN_HOST": "127.0.0.1",
            "METRICS_PORT": str(self.metrics_port),
            "HEALTH_CHECK_PORT": str(self.health_port),
            "LOG_FORMAT": "json",
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.frozen = False

    def start(self) -> Replica:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [COMMAND, "exporter"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        assert self.process is not None
        self.process.wait(10)

    def freeze(self) -> None:
        self.signal(signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        self.signal(signal.SIGCONT)
        self.frozen = False

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            if self.frozen:
                self.thaw()
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def get(self, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
        port = self.health_port if path.startswith("/health") else self.metrics_port
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except (OSError, urllib.error.URLError):
            return 0, b""

    def samples(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        status, body = self.get("/metrics")
        if status != 200:
            return {}
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples
        }

    def leader(self) -> float | None:
        return self.samples().get(("dict_rate_limit_poller_leader", frozenset()))

    def bucket_values(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """The series that come from the snapshot (per policy, and its ResponseTime)."""
        return {
            key: value
            for key, value in self.samples().items()
            if any(label == "endpoint_id" for label, _ in key[1])
            or key[0] == "dict_rate_limit_snapshot_response_time_seconds"
        }

    def policies(self) -> Any:
        status, body = self.get("/api/v1/policies")
        return json.loads(body) if status == 200 else None

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def wait_for(condition: Callable[[], T], timeout: float, what: str, step: float = 0.05) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(step)


def the_leader(replicas: list[Replica]) -> Replica | None:
    """The one live, unfrozen replica whose gauge says it leads (None while there is none or several)."""
    leading = [r for r in replicas if r.alive and not r.frozen and r.leader() == 1.0]
    return leading[0] if len(leading) == 1 else None


def same_buckets_everywhere(replicas: list[Replica]) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The bucket series when every given replica serves the same ones at the same moment, else {}."""
    values = [r.bucket_values() for r in replicas]
    return values[0] if values[0] and all(v == values[0] for v in values[1:]) else {}
