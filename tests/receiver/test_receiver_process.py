"""`dict-rate-limit receiver` as a real process: killed (SIGKILL) after commit and before publishing, the
event is published after the restart; it stops cleanly on SIGTERM and refuses to start without a token."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from devstack.embedded import EmbeddedPulsar, free_port, wait_for_port
from tests.support.receiver import AUTH, TOKEN, EventConsumer, alert, migrate, payload, rows, unique_topic

UNSENT = "SELECT count(*) FROM dict_rate_limit_alert_outbox WHERE sent_at IS NULL"


def receiver_env(
    database_url: str, token_file: Path | None, pulsar_url: str, topic: str, port: int
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WEBHOOK_", "PULSAR_", "CONFIG_FILE"))}
    ops = free_port()
    env.update(
        DATABASE_URL=database_url,
        LISTEN_HOST="127.0.0.1",
        RECEIVER_PORT=str(port),
        METRICS_PORT=str(ops),
        HEALTH_CHECK_PORT=str(ops),
        PULSAR_URL=pulsar_url,
        PULSAR_TOPIC=topic,
        LOG_FORMAT="json",
    )
    if token_file is not None:
        env["WEBHOOK_BEARER_TOKEN_FILE"] = str(token_file)
    return env


@contextmanager
def receiver_process(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "exporter.cli", "receiver"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_for_port("127.0.0.1", int(env["RECEIVER_PORT"]), 30, process)
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def post(port: int, body: object) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/alerts",
        data=json.dumps(body).encode(),
        headers={**AUTH, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        return int(response.status)


def test_receiver_killed_between_commit_and_publish_publishes_after_restart(
    tmp_path: Path, database_url: str, pulsar_broker: EmbeddedPulsar
) -> None:
    migrate(database_url)
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    topic, port = unique_topic(), free_port()
    dead_broker = f"pulsar://127.0.0.1:{free_port()}"  # nothing listens: publishing cannot happen
    with receiver_process(
        receiver_env(database_url, token, dead_broker, topic, port), tmp_path / "r.log"
    ) as first:
        assert post(port, payload(alert("firing"))) == 200
        assert post(port, payload(alert("resolved", ends_at="2026-11-23T09:05:00Z"))) == 200
        assert rows(database_url, UNSENT) == [(2,)]
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    consumer = EventConsumer(pulsar_broker.url, topic)
    try:
        env = receiver_env(database_url, token, pulsar_broker.url, topic, port)
        with receiver_process(env, tmp_path / "r.log") as second:
            events = consumer.receive(2, 30)
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=20) == 0
    finally:
        consumer.close()
    assert [e.event["event_type"] for e in events] == [
        "rate_limit.alert.created",
        "rate_limit.alert.resolved",
    ]
    assert rows(database_url, UNSENT) == [(0,)]
    assert rows(database_url, "SELECT count(*) FROM dict_rate_limit_alerts") == [(1,)]


def start_once(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A receiver expected to exit at start-up."""
    command = [sys.executable, "-m", "exporter.cli", "receiver"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)


def test_receiver_refuses_to_start_without_a_token(tmp_path: Path, database_url: str) -> None:
    env = receiver_env(database_url, None, "pulsar://127.0.0.1:1", unique_topic(), free_port())
    result = start_once(env)
    assert result.returncode == 2
    assert "WEBHOOK_BEARER_TOKEN_FILE" in result.stderr


def test_receiver_exits_1_with_one_clear_line_on_an_unmigrated_database(
    tmp_path: Path, database_url: str
) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    env = receiver_env(database_url, token, "pulsar://127.0.0.1:1", unique_topic(), free_port())
    result = start_once(env)
    assert result.returncode == 1
    assert "run `dict-rate-limit migrate` first" in result.stderr
    assert "Traceback" not in result.stderr
