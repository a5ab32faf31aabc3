"""One runtime for every command: the same exit code and one-line message for the same failure, and a
signal during start-up is honoured at once."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.embedded import free_port, wait_for_port
from tests.support.receiver import migrate


def _env(**values: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LOG_FORMAT": "json", **values}


@contextlib.contextmanager
def _busy_port() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def _run(command: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporter.cli", command, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _assert_cannot_start(done: subprocess.CompletedProcess[str], command: str) -> None:
    assert done.returncode == 1, done.stderr
    # grpc's C core or the logger may write before; our own line is the last one and has no traceback.
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"dict-rate-limit {command}: cannot start: "), done.stderr
    assert "in use" in last
    assert "Traceback" not in done.stderr


def test_a_busy_port_ends_the_exporter_and_the_simulator_the_same_way() -> None:
    with _busy_port() as port:
        exporter = _run(
            "exporter",
            _env(LISTEN_HOST="127.0.0.1", METRICS_PORT=str(port), BRIDGE_ADDRESS="127.0.0.1:1"),
        )
        simulator = _run("simulator", _env(), "--listen", f"127.0.0.1:{port}")
    _assert_cannot_start(exporter, "exporter")
    _assert_cannot_start(simulator, "simulator")


@pytest.mark.parametrize("command", ["receiver", "all-in-one"])
def test_a_busy_port_ends_the_receiver_and_all_in_one_the_same_way(command: str, database_url: str) -> None:
    migrate(database_url)
    with _busy_port() as port:
        done = _run(
            command,
            _env(
                DATABASE_URL=database_url,
                WEBHOOK_ALLOW_UNAUTHENTICATED="true",
                LISTEN_HOST="127.0.0.1",
                RECEIVER_PORT=str(port),
                METRICS_PORT="0",
                HEALTH_CHECK_PORT="0",
                BRIDGE_ADDRESS="127.0.0.1:1",
                PULSAR_URL="pulsar://127.0.0.1:1",
            ),
        )
    _assert_cannot_start(done, command)


class _Silent:
    """A TCP server that accepts connections and never says a word: a database that hangs start-up."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def test_sigterm_while_the_receiver_waits_for_its_database_stops_it_at_once(tmp_path: Path) -> None:
    silent = _Silent()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "exporter.cli", "receiver"],
            env=_env(
                DATABASE_URL=f"postgresql://postgres@127.0.0.1:{silent.port}/db?connect_timeout=60",
                WEBHOOK_ALLOW_UNAUTHENTICATED="true",
                LISTEN_HOST="127.0.0.1",
                RECEIVER_PORT="0",
                METRICS_PORT="0",
                HEALTH_CHECK_PORT="0",
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 20
        while not silent.held and time.monotonic() < deadline:  # it is now waiting for the database
            time.sleep(0.05)
        assert silent.held, "the receiver never connected to its database"
        time.sleep(0.5)
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=20)
        took = time.monotonic() - sent
    finally:
        silent.close()
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err.decode()
    assert took < 5.0, f"took {took:.1f} s to honour SIGTERM during start-up"


def test_a_second_simulator_on_the_port_of_a_running_one_cannot_start() -> None:
    # grpc's default SO_REUSEPORT let the second one start and share the first one's calls.
    port = free_port()
    first = subprocess.Popen(
        [sys.executable, "-m", "exporter.cli", "simulator", "--listen", f"127.0.0.1:{port}"],
        env=_env(),
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port("127.0.0.1", port, timeout=30, process=first)
        try:
            second = subprocess.run(
                [sys.executable, "-m", "exporter.cli", "simulator", "--listen", f"127.0.0.1:{port}"],
                env=_env(),
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            )
        except subprocess.TimeoutExpired:
            pytest.fail("a second simulator started on the port of a running one")
    finally:
        first.terminate()
        first.wait(timeout=20)
    _assert_cannot_start(second, "simulator")
