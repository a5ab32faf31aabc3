"""The receiver's own metrics stay bounded whatever endpoint_id values arrive (real webhook, real
PostgreSQL): known policies keep their series, the first few unknown ones too, the rest share "other"."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import psycopg
from aiohttp.test_utils import TestClient

from exporter.config import Settings
from exporter.receiver.metrics import MAX_UNKNOWN_POLICIES, OVERFLOW, ReceiverMetrics
from exporter.receiver.webhook import create_app
from tests.support.receiver import AUTH, TOKEN, alert, migrate, payload

MakeClient = Callable[..., Awaitable[TestClient[Any, Any]]]
DISTINCT = 3000
PER_NOTIFICATION = 100


def created_series(metrics: ReceiverMetrics) -> dict[tuple[str, str, str], float]:
    series = {}
    for family in metrics.registry.collect():
        if family.name == "dict_rate_limit_alerts_created":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    labels = sample.labels
                    series[(labels["endpoint_id"], labels["severity"], labels["psp_category"])] = sample.value
    return series


async def test_thousands_of_distinct_endpoint_ids_make_a_bounded_number_of_series(
    aiohttp_client: MakeClient, database_url: str
) -> None:
    migrate(database_url)
    with psycopg.connect(database_url) as conn:
        now = datetime.now(UTC)
        conn.execute(
            "INSERT INTO dict_rate_limit_policies (endpoint_id, psp_category, capacity, refill_tokens,"
            " refill_period_sec, first_seen_at, last_seen_at) VALUES ('ENTRIES_WRITE', 'A', 1, 1, 1, %s, %s)",
            [now, now],
        )
    metrics = ReceiverMetrics()
    client = await aiohttp_client(
        create_app(
            Settings(database_url=database_url, webhook_bearer_token=TOKEN), metrics=metrics, relay=None
        )
    )
    for batch in range(DISTINCT // PER_NOTIFICATION):
        alerts = [
            alert(endpoint_id=f"HOSTILE_{batch}_{index}", fingerprint=f"fp-{batch}-{index}", psp_category="Z")
            for index in range(PER_NOTIFICATION)
        ]
        response = await client.post("/alerts", json=payload(*alerts), headers=AUTH)
        assert response.status == 200
    # A known policy keeps its own series even after the flood.
    response = await client.post("/alerts", json=payload(alert(endpoint_id="ENTRIES_WRITE")), headers=AUTH)
    assert response.status == 200

    series = created_series(metrics)
    assert len(series) <= MAX_UNKNOWN_POLICIES + 2, len(series)
    assert series[("ENTRIES_WRITE", "warning", "A")] == 1
    assert series[(OVERFLOW, "warning", OVERFLOW)] == DISTINCT - MAX_UNKNOWN_POLICIES
    assert sum(series.values()) == DISTINCT + 1  # every alert counted, none lost to the bound

    started = time.perf_counter()
    scrape = await client.get("/metrics")
    text = await scrape.text()
    assert scrape.status == 200
    assert time.perf_counter() - started < 2.0
    assert len(text) < 200_000
