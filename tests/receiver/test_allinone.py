"""`dict-rate-limit all-in-one`: exporter and receiver in one process share one /metrics (the seed histogram
once, with the receiver's operations) and one readiness; the webhook records alerts as the receiver does."""

from __future__ import annotations

import asyncio
import gzip
import re

import aiohttp

from devstack.embedded import free_port
from exporter.allinone import serve
from exporter.config import AllInOneSettings
from tests.support.receiver import AUTH, TOKEN, alert, migrate, payload, rows


async def test_all_in_one_serves_webhook_and_one_combined_exposition(database_url: str) -> None:
    migrate(database_url)
    ops = free_port()
    settings = AllInOneSettings(
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
            async with session.get(
                f"http://127.0.0.1:{ops}/metrics", headers={"Accept-Encoding": "gzip"}, auto_decompress=False
            ) as response:
                assert response.headers["Content-Encoding"] == "gzip"
                zipped = gzip.decompress(await response.read()).decode()
            async with session.get(f"http://127.0.0.1:{ops}/health/ready") as response:
                readiness = await response.json()
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 30) is None
    assert rows(database_url, "SELECT count(*) FROM dict_rate_limit_alerts") == [(1,)]
    assert text.count("# TYPE dict_rate_limit_monitoring_duration_seconds histogram") == 1
    assert text.count("# TYPE process_cpu_seconds_total counter") == 1  # once, though two parts export
    assert not re.search(r"(?m)^[a-z_]+_created[{ ]", text)  # no client_python _created series
    # The compressed body is the same exposition (the cached bucket prefix plus this scrape's tail).
    assert zipped.split("\n")[:40] == text.split("\n")[:40]
    assert "dict_rate_limit_alerts_created_total" in zipped
    assert 'dict_rate_limit_monitoring_duration_seconds_count{operation="webhook"} 1.0' in text
    assert "dict_rate_limit_bridge_up 0.0" in text
    labels = 'endpoint_id="ENTRIES_WRITE",psp_category="A",severity="warning"'
    assert f"dict_rate_limit_alerts_created_total{{{labels}}} 1.0" in text
    assert readiness["checks"]["receiver_database"] == "ok"
    assert readiness["status"] == "unavailable"  # the Bridge never answered


async def test_all_in_one_with_participants_keeps_one_family_each_and_the_process_series_unlabelled(
    database_url: str,
) -> None:
    from exporter.config import participants_of

    migrate(database_url)
    ops = free_port()
    base = AllInOneSettings(
        database_url=database_url,
        webhook_bearer_token=TOKEN,
        listen_host="127.0.0.1",
        receiver_port=free_port(),
        metrics_port=ops,
        health_check_port=ops,
        bridge_timeout_seconds=0.2,
        pulsar_url=f"pulsar://127.0.0.1:{free_port()}",
    )
    entries = [{"name": n, "bridge_address": f"127.0.0.1:{free_port()}"} for n in ("bank-a", "bank-b")]
    settings = base.replace(participants=participants_of(entries, base))
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop))
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                try:
                    async with session.get(f"http://127.0.0.1:{ops}/health/startup") as started:
                        if started.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.1)
            url = f"http://127.0.0.1:{settings.receiver_port}/alerts"
            async with session.post(url, json=payload(alert()), headers=AUTH) as response:
                assert response.status == 200
            async with session.get(f"http://127.0.0.1:{ops}/metrics") as response:
                text = await response.text()
            async with session.get(f"http://127.0.0.1:{ops}/health/ready") as response:
                readiness = await response.json()
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 30) is None
    assert text.count("# TYPE dict_rate_limit_monitoring_duration_seconds histogram") == 1
    assert text.count("# TYPE process_cpu_seconds_total counter") == 1
    assert text.count("# TYPE dict_rate_limit_bridge_up gauge") == 1
    assert 'dict_rate_limit_bridge_up{participant="bank-a"} 0.0' in text
    assert 'dict_rate_limit_bridge_up{participant="bank-b"} 0.0' in text
    assert 'dict_rate_limit_monitoring_duration_seconds_count{operation="webhook"} 1.0' in text
    assert 'dict_rate_limit_monitoring_duration_seconds_count{participant="bank-a",operation="poll"}' in text
    assert not re.search(
        r"(?m)^(process_|dict_rate_limit_history_|dict_rate_limit_alerts_)\S*participant=", text
    )
    assert readiness["checks"]["bridge:bank-a"].startswith("no successful poll yet")
    assert readiness["status"] == "unavailable"  # no participant's Bridge ever answered
