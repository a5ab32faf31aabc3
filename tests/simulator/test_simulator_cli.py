"""`dict-rate-limit simulator` as a user runs it: a bad scenario exits 2 with one line; a good run serves
gRPC, logs its scenario events, and stops cleanly on SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devstack.embedded import free_port, wait_for_port
from exporter.bridge.client import BridgeClient
from exporter.snapshot import Snapshot
from tests.support.certs import make_pki


async def _list(address: str) -> Snapshot:
    bridge = BridgeClient(address)
    try:
        return (await bridge.list_policies()).snapshot
    finally:
        await bridge.close()


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "exporter.cli", "simulator", *args]


def test_a_bad_scenario_exits_2_with_one_line_naming_file_line_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nevents:\n  - at: 5\n    burst: {policy: KEYS_CHECK, requests: many}\n")
    done = subprocess.run(
        _cli("--scenario", str(bad)), check=False, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert f"{bad}:4: events[0].burst.requests: must be an integer" in lines[0]
    assert done.stdout == ""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_the_simulator_serves_logs_events_and_stops_cleanly(tmp_path: Path, signum: int) -> None:
    scenario = tmp_path / "s.yaml"
    scenario.write_text("events:\n  - {at: 1, category: D}\n")
    port = free_port()
    process = subprocess.Popen(
        _cli(
            "--listen",
            f"127.0.0.1:{port}",
            "--scenario",
            str(scenario),
            "--seed",
            "9",
            "--log-format",
            "json",
        ),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_port("127.0.0.1", port, timeout=30, process=process)
        time.sleep(1.5)  # the event at 1 s has been played by the server's ticker
        snapshot = asyncio.run(_list(f"127.0.0.1:{port}"))
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert snapshot.category == "D"
    assert len(snapshot.policies) == 30
    assert process.returncode == 0
    logs = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    messages = [entry["msg"] for entry in logs]
    assert "Bridge simulator serving" in messages
    event = next(entry for entry in logs if entry["msg"] == "scenario event")
    assert (event["event"], event["category"], event["at_s"]) == ("CategoryChange", "D", 1.0)
    assert messages[-1] == "Bridge simulator stopping"


def test_json_logs_stay_json_when_a_client_fails_the_mtls_handshake(tmp_path: Path) -> None:
    # grpc's C core logs every refused handshake as its own "I1201 ..." line on stderr unless told not to.
    pki = make_pki(tmp_path)
    port = free_port()
    process = subprocess.Popen(
        _cli(
            "--listen",
            f"127.0.0.1:{port}",
            "--scenario",
            "quiet",
            "--tls-cert-file",
            pki.server_cert,
            "--tls-key-file",
            pki.server_key,
            "--tls-client-ca-file",
            pki.ca,
            "--log-format",
            "json",
        ),
        stderr=subprocess.PIPE,
        text=True,
        env={key: value for key, value in os.environ.items() if key != "GRPC_VERBOSITY"},
    )
    try:
        wait_for_port("127.0.0.1", port, timeout=30, process=process)
        refused = 0
        for _ in range(3):  # a client without a certificate
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                context = ssl.create_default_context(cafile=pki.ca)
                context.check_hostname = False
                with contextlib.suppress(ssl.SSLError, OSError), context.wrap_socket(raw) as tls:
                    tls.recv(1)
                refused += 1
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert refused == 3
    assert process.returncode == 0
    lines = stderr.strip().splitlines()
    assert [line for line in lines if not line.startswith("{")] == []
    assert json.loads(lines[-1])["msg"] == "Bridge simulator stopping"
