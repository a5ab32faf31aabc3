"""Helpers of the receiver tests: webhook payloads, a real Alertmanager process, a Pulsar consumer."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pulsar

from devstack.embedded import free_port, wait_for_port
from exporter.history import migrations

TOKEN = "s3cret-webhook-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ZERO_TIME = "0001-01-01T00:00:00Z"


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def alert(
    status: str = "firing",
    *,
    name: str = "DICTRateLimitWarning",
    severity: str = "warning",
    endpoint_id: str | None = "ENTRIES_WRITE",
    psp_category: str | None = "A",
    starts_at: str = "2026-11-23T09:00:00.123456789Z",
    ends_at: str = ZERO_TIME,
    fingerprint: str | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One alert of a webhook payload, as Alertmanager 0.25 sends it."""
    labels = {"alertname": name, "severity": severity, "job": "dict-rate-limit-exporter"}
    if endpoint_id is not None:
        labels["endpoint_id"] = endpoint_id
    if psp_category is not None:
        labels["psp_category"] = psp_category
    return {
        "status": status,
        "labels": labels,
        "annotations": annotations
        if annotations is not None
        else {
            "summary": "A DICT rate-limit bucket is low.",
            "description": f"{endpoint_id} has 100 of 36000 tokens.",
        },
        "startsAt": starts_at,
        "endsAt": ends_at,
        "generatorURL": "http://prometheus:9090/graph?g0.expr=x",
        "fingerprint": fingerprint or f"{name}-{endpoint_id}-fp",
    }


def payload(*alerts: dict[str, Any], truncated: int = 0) -> dict[str, Any]:
    """A webhook notification (version 4) holding ``alerts``."""
    firing = any(isinstance(a, dict) and a.get("status") == "firing" for a in alerts)
    status = "firing" if firing else "resolved"
    return {
        "version": "4",
        "groupKey": '{}:{alertname="DICTRateLimitWarning"}',
        "truncatedAlerts": truncated,
        "status": status,
        "receiver": "dict-rate-limit-receiver",
        "groupLabels": {"alertname": "DICTRateLimitWarning"},
        "commonLabels": {},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "alerts": list(alerts),
    }


def migrate(database_url: str) -> str:
    migrations.apply(database_url)
    return database_url


def rows(database_url: str, query: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url) as conn:
        return conn.execute(query.encode(), params).fetchall()


def unique_topic() -> str:
    return f"persistent://lb-conn/dict/rate-limit-alerts-{uuid.uuid4().hex[:10]}"


@dataclass(frozen=True)
class Received:
    key: str
    properties: dict[str, str]
    event: dict[str, Any]


class EventConsumer:
    """A real ``core-dict`` subscription that deduplicates by event_id, as every consumer must."""

    def __init__(self, broker_url: str, topic: str, seen: set[str] | None = None) -> None:
        self._client = pulsar.Client(broker_url, operation_timeout_seconds=10, logger=_quiet_logger())
        self._consumer = self._client.subscribe(
            topic, "core-dict", initial_position=pulsar.InitialPosition.Earliest
        )
        self.events: list[Received] = []
        self.seen: set[str] = set(seen or ())
        self.duplicates = 0
        self.message_ids: dict[str, set[str]] = {}
        self._closed = False

    def receive(self, count: int, timeout: float) -> list[Received]:
        """Blocks until ``count`` distinct events arrived (in arrival order) or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while len(self.events) < count and time.monotonic() < deadline:
            try:
                message = self._consumer.receive(timeout_millis=200)
            except pulsar.Timeout:
                continue
            self._consumer.acknowledge(message)
            event = json.loads(message.data())
            # A redelivery has the same message id; a second publication of the event would have another.
            self.message_ids.setdefault(event["event_id"], set()).add(str(message.message_id()))
            if event["event_id"] in self.seen:
                self.duplicates += 1
                continue
            self.seen.add(event["event_id"])
            self.events.append(Received(message.partition_key(), dict(message.properties()), event))
        return list(self.events)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._consumer.close()
            self._client.close()


def _quiet_logger() -> Any:
    import logging

    logger = logging.getLogger("tests.pulsar")
    logger.setLevel(logging.WARNING)
    return logger


class Alertmanager:
    """A real ``prometheus-alertmanager`` on 127.0.0.1 with clustering off."""

    def __init__(self, binary: str, config: Path, directory: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = (directory / "alertmanager.log").open("wb")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--cluster.listen-address=",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_for_port("127.0.0.1", self.port, 20, self.process)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:  # noqa: S310
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError("Alertmanager not ready")

    def post(self, *alerts: dict[str, Any]) -> None:
        """POST /api/v2/alerts, as Prometheus does."""
        body = json.dumps(list(alerts)).encode()
        request = urllib.request.Request(  # noqa: S310
            f"{self.url}/api/v2/alerts", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            assert response.status == 200

    def alerts(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.url}/api/v2/alerts", timeout=5) as response:  # noqa: S310
            result: list[dict[str, Any]] = json.loads(response.read())
            return result

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self._log.close()


@contextmanager
def alertmanager(binary: str, config: Path, directory: Path) -> Iterator[Alertmanager]:
    manager = Alertmanager(binary, config, directory)
    try:
        yield manager
    finally:
        manager.stop()


def am_alert(
    labels: dict[str, str], *, resolved: bool = False, starts_at: datetime | None = None
) -> dict[str, Any]:
    """An alert for Alertmanager's API; resolved = endsAt in the past."""
    start = starts_at or datetime.now(UTC) - timedelta(seconds=30)
    body: dict[str, Any] = {
        "labels": labels,
        "annotations": {"summary": "test alert", "description": f"{labels.get('endpoint_id')} is low"},
        "startsAt": rfc3339(start),
        "generatorURL": "http://prometheus.test/graph",
    }
    if resolved:
        body["endsAt"] = rfc3339(datetime.now(UTC) - timedelta(seconds=1))
    return body
