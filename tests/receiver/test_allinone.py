"""`dict-rate-limit all-in-one`: exporter and receiver in one process share one /metrics (the seed histogram
once, with the receiver's operations) and one readiness; the webhook records alerts as the receiver does."""

from __future__ import annotations

import asyncio

import aiohttp

from devstack.embedded import free_port
from exporter.allinone import serve
from exporter.config import Settings
from tests.support.receiver import AUTH, TOKEN, alert, migrate, payload, rows


async def test_all_in_one_serves_webhook_and_one_combined_exposition(database_url: str) -> None:
    migrate(database_url)
    ops = free_port()
    settings = Settings(
        database_url=database_url,
        webhook_bearer_token=TOKEN,
        listen_host="127.0.0.1",
        receiver_port=free_port(),
        metrics_port=ops,
        health_check_port=ops,
        bridge_address=f"127.0.0.1:{free_port()}",  # no Bridge: the exporter part reports it, nothing crashes
        bridge_timeout_seconds=0.2,
        pulsar_url=f"pulsar://127.0.0.1:{free_port()}",
    )
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop))
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                try:
                    async with session.get(f"http://127.0.0.1:{ops}/health/live") as live:
                        if live.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)
            url = f"http://127.0.0.1:{settings.receiver_port}/alerts"
            async with session.post(url, json=payload(alert()), headers=AUTH) as response:
                assert response.status == 200
                assert (await response.json())["created"] == 1
            async with session.get(f"http://127.0.0.1:{ops}/metrics") as response:
                text = await response.text()
            async with session.get(f"http://127.0.0.1:{ops}/health/ready") as response:
                readiness = await response.json()
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 30) == 0
    assert rows(database_url, "SELECT count(*) FROM dict_rate_limit_alerts") == [(1,)]
    assert text.count("# TYPE dict_rate_limit_monitoring_duration_seconds histogram") == 1
    assert 'dict_rate_limit_monitoring_duration_seconds_count{operation="webhook"} 1.0' in text
    assert "dict_rate_limit_bridge_up 0.0" in text
    labels = 'endpoint_id="ENTRIES_WRITE",psp_category="A",severity="warning"'
    assert f"dict_rate_limit_alerts_created_total{{{labels}}} 1.0" in text
    assert readiness["checks"]["receiver_database"] == "ok"
    assert readiness["status"] == "unavailable"  # the Bridge never answered
