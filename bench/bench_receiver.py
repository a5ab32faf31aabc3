"""Benchmark of the receiver: webhook alerts/s and p99 latency with durable commits, against a no-op aiohttp
handler measured in the same run (the ratio is what the receiver's work costs), and outbox-to-Pulsar events/s.

    .venv/bin/python -m bench.bench_receiver [--requests 4000] [--concurrency 32] [--relay-events 20000]

Real parts only: an embedded PostgreSQL (fsync and synchronous_commit on, printed) unless --database-url,
a pulsar-lite broker, the servers in a child process so the load generator does not share their CPU.
Targets (issue 6): >= 500 alerts/s durable on a 2-core machine; relay >= 2,000 events/s. Issue 17: the
webhook's p99 while /metrics is scraped and every alert names a new endpoint_id, with the series bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import psycopg
from aiohttp import web

from devstack.embedded import EmbeddedPostgres, EmbeddedPulsar, free_port, wait_for_port
from exporter.config import Settings
from exporter.history import migrations
from exporter.receiver.metrics import ReceiverMetrics
from exporter.receiver.outbox import OutboxRelay, RelayTuning
from exporter.receiver.publisher import PulsarPublisher
from exporter.receiver.webhook import create_app

TOKEN = "bench-token"  # noqa: S105 - a benchmark token on loopback


def _serve(kind: str, port: int, database_url: str, pool: int) -> None:
    """Child process: the real receiver (no relay) or a no-op handler that reads the body and answers 200."""
    if kind in {"receiver", "receiver_scraped"}:
        settings = Settings(
            database_url=database_url, webhook_bearer_token=TOKEN, database_max_connections=pool
        )
        app = create_app(settings, relay=None, include_ops=kind == "receiver_scraped")
    else:

        async def noop(request: web.Request) -> web.Response:
            await request.read()
            return web.json_response({"status": "ok"})

        app = web.Application()
        app.router.add_post("/alerts", noop)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def _payload(index: int, per_request: int, distinct: bool = False) -> bytes:
    alerts = []
    for offset in range(per_request):
        # distinct: every alert a new endpoint_id (issue 17's label-cardinality attack), else 40 policies.
        number = index * per_request + offset
        policy = f"HOSTILE_{number}" if distinct else f"POLICY_{number % 40}"
        alerts.append(
            {
                "status": "firing",
                "labels": {
                    "alertname": "DICTRateLimitWarning",
                    "severity": "warning",
                    "endpoint_id": policy,
                    "psp_category": "A",
                },
                "annotations": {"summary": "bench", "available_tokens": "100", "capacity": "36000"},
                "startsAt": "2026-11-23T09:00:00Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "http://prometheus/graph",
                "fingerprint": uuid.uuid4().hex,
            }
        )
    return json.dumps({"version": "4", "status": "firing", "truncatedAlerts": 0, "alerts": alerts}).encode()


async def _load(
    port: int, requests: int, concurrency: int, per_request: int, *, scraped: bool = False
) -> dict[str, float]:
    """Posts the bodies; with ``scraped``, every endpoint_id is new and /metrics is scraped every 0.1 s."""
    bodies = [_payload(i, per_request, distinct=scraped) for i in range(requests)]
    scrapes: list[float] = []
    exposition = b""
    latencies: list[float] = []
    failures = 0
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal failures
            while not queue.empty():
                body = queue.get_nowait()
                started = time.perf_counter()
                async with session.post(
                    f"http://127.0.0.1:{port}/alerts", data=body, headers=headers
                ) as response:
                    await response.read()
                    failures += response.status != 200
                latencies.append(time.perf_counter() - started)

        async def scraper() -> None:
            nonlocal exposition
            while not queue.empty():
                begun = time.perf_counter()
                async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                    exposition = await response.read()
                scrapes.append(time.perf_counter() - begun)
                await asyncio.sleep(0.1)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)), *([scraper()] if scraped else []))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "requests_per_s": requests / elapsed,
        "alerts_per_s": requests * per_request / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "failures": failures,
        **(
            {
                "scrapes": len(scrapes),
                "scrape_p50_ms": statistics.median(scrapes) * 1000 if scrapes else 0.0,
                "exposition_bytes": len(exposition),
                "alerts_created_series": exposition.count(b"dict_rate_limit_alerts_created_total{"),
            }
            if scraped
            else {}
        ),
    }


def _measure(kind: str, database_url: str, args: argparse.Namespace) -> dict[str, float]:
    port = free_port()
    process = multiprocessing.get_context("spawn").Process(
        target=_serve, args=(kind, port, database_url, args.pool), daemon=True
    )
    process.start()
    try:
        wait_for_port("127.0.0.1", port, 30)
        scraped = kind == "receiver_scraped"
        asyncio.run(
            _load(port, min(200, args.requests), args.concurrency, args.alerts_per_request, scraped=scraped)
        )  # warm-up
        return asyncio.run(
            _load(port, args.requests, args.concurrency, args.alerts_per_request, scraped=scraped)
        )
    finally:
        process.terminate()
        process.join(10)


def _fill_outbox(database_url: str, events: int) -> None:
    """``events`` created events, queued by the outbox trigger as the receiver would have."""
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO dict_rate_limit_alerts (fingerprint, alert_name, severity, endpoint_id,"
            " psp_category, status, starts_at, available_tokens, capacity, summary, labels, annotations,"
            " payload)"
            " SELECT 'fp' || g, 'DICTRateLimitWarning', 'warning', 'POLICY_' || (g %% 40), 'A', 'firing',"
            " now(), 100, 36000, 'bench', '{}', '{}', '{}' FROM generate_series(1, %s) g",
            [events],
        )


async def _relay(database_url: str, broker_url: str, events: int) -> dict[str, float]:
    _fill_outbox(database_url, events)
    metrics = ReceiverMetrics()
    publisher = PulsarPublisher(
        broker_url, f"persistent://lb-conn/dict/bench-{uuid.uuid4().hex[:8]}", metrics
    )
    await publisher.ensure_connected()  # connection set-up is not part of the steady-state figure
    relay = OutboxRelay(database_url, publisher, metrics, RelayTuning(poll_interval=0.05))
    started = time.perf_counter()
    task = asyncio.create_task(relay.run())
    while True:
        if (metrics.registry.get_sample_value("dict_rate_limit_pulsar_publishes_total") or 0) >= events:
            break
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - started
    await relay.stop()
    await task
    await publisher.close()
    with psycopg.connect(database_url) as conn:
        unsent = conn.execute(
            "SELECT count(*) FROM dict_rate_limit_alert_outbox WHERE sent_at IS NULL"
        ).fetchone()
    return {
        "events": events,
        "events_per_s": events / elapsed,
        "seconds": elapsed,
        "unsent_after": unsent[0] if unsent else -1,
    }


def _fresh_database(admin_url: str) -> str:
    name = f"drl_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
    url = psycopg.conninfo.make_conninfo(admin_url, dbname=name)
    migrations.apply(url)
    return url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--alerts-per-request", type=int, default=1)
    parser.add_argument("--pool", type=int, default=4, help="DATABASE_MAX_CONNECTIONS of the receiver")
    parser.add_argument("--relay-events", type=int, default=20000)
    parser.add_argument(
        "--database-url", help="an administrative database URL (default: embedded PostgreSQL)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="drl-bench-") as tmp:
        embedded = None if args.database_url else EmbeddedPostgres(Path(tmp) / "pg")
        admin = args.database_url or embedded.start()  # type: ignore[union-attr]
        broker = EmbeddedPulsar(Path(tmp) / "pulsar")
        broker.start()
        try:
            database_url = _fresh_database(admin)
            with psycopg.connect(database_url) as conn:
                durability = {
                    name: conn.execute(
                        psycopg.sql.SQL("SHOW {}").format(psycopg.sql.Identifier(name))
                    ).fetchone()[0]  # type: ignore[index]
                    for name in ("fsync", "synchronous_commit", "server_version")
                }
            noop = _measure("noop", database_url, args)
            receiver = _measure("receiver", database_url, args)
            scraped = _measure("receiver_scraped", _fresh_database(admin), args)
            relay = asyncio.run(_relay(_fresh_database(admin), broker.url, args.relay_events))
        finally:
            broker.stop()
            if embedded is not None:
                embedded.stop()
    report = {
        "postgresql": durability,
        "load": {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "alerts_per_request": args.alerts_per_request,
            "pool": args.pool,
        },
        "noop_handler": noop,
        "receiver": receiver,
        "receiver_vs_noop_throughput_ratio": receiver["requests_per_s"] / noop["requests_per_s"],
        # Every alert a new endpoint_id while /metrics is scraped every 0.1 s (issue 17): p99 and series.
        "receiver_scraped_distinct_labels": scraped,
        "scraped_vs_plain_p99_ratio": scraped["p99_ms"] / receiver["p99_ms"],
        "relay": relay,
        "targets": {
            "receiver_alerts_per_s>=500": receiver["alerts_per_s"] >= 500,
            "relay_events_per_s>=2000": relay["events_per_s"] >= 2000,
            "alerts_created_series<=52": scraped["alerts_created_series"] <= 52,
        },
    }
    print(json.dumps(report, indent=2))
    return 0 if all(report["targets"].values()) and not receiver["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
