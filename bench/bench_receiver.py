"""Receiver benchmark: alerts/s and p99 of the webhook with durable commits, against a minimal durable
handler (one INSERT of the body, committed, then 200) on the same PostgreSQL with the same pool size, in
interleaved rounds; then the outbox relay to Pulsar.

A third server, the data model's floor, writes the rows the receiver must write for new alerts (an alert
row and its ``created`` outbox row, in copies of the two tables with the same indexes) plainly: one
autocommitted statement per notification, no validation, no locks, no episode look-up. The receiver's
ratio to it is the cost of its checks and lifecycle; the floor's ratio to the limit is the cost of the
rows themselves.

    python -m bench.bench_receiver [--quick] [--rounds 3] [--seconds 2] [--database-url URL]

Real parts only: an embedded PostgreSQL (fsync and synchronous_commit on, printed) unless --database-url,
a pulsar-lite broker; each server in its own child process, so the load generator does not share their
CPU. Every alert is new (a fresh fingerprint): the most work a notification can cost.
Goal (issue 18): >= 0.8x the minimal durable handler at 10 alerts per request, scaling with senders up to
the pool size (DATABASE_MAX_CONNECTIONS).
Issue 17: the same rounds with every alert naming a new endpoint_id while /metrics is scraped every 0.1 s:
the webhook's p50/p99, the scrape's latency, the exposition's size and its count of
dict_rate_limit_alerts_created_total series, which must stay within the label bound (known policies, 50
others, then `other`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
from aiohttp import web

from bench.common import Ratio, Row, latency_text, machine, print_figure, rotated
from devstack.embedded import EmbeddedPostgres, EmbeddedPulsar, free_port, wait_for_port
from exporter.config import ReceiverSettings
from exporter.history import migrations
from exporter.receiver.metrics import MAX_UNKNOWN_POLICIES, ReceiverMetrics
from exporter.receiver.outbox import OutboxRelay, RelayTuning
from exporter.receiver.publisher import PulsarPublisher
from exporter.receiver.webhook import create_app

TOKEN = "bench-token"  # noqa: S105 - a benchmark token on loopback
POOL = ReceiverSettings().database_max_connections
#: Pause between two scrapes of the scraped receiver: far more often than Prometheus would (15-60 s).
SCRAPE_GAP_SECONDS = 0.1
SERIES_PREFIX = b"dict_rate_limit_alerts_created_total{"
BASELINE_TABLE = (
    b"CREATE TABLE IF NOT EXISTS bench_notifications (id bigserial PRIMARY KEY, body jsonb NOT NULL)"
)
#: The floor's tables: the receiver's two tables with their indexes, defaults and checks (no triggers).
FLOOR_TABLES = (
    "CREATE TABLE bench_alerts (LIKE dict_rate_limit_alerts INCLUDING ALL)",
    "CREATE TABLE bench_outbox (LIKE dict_rate_limit_alert_outbox INCLUDING ALL,"
    " FOREIGN KEY (alert_id) REFERENCES bench_alerts (id) ON DELETE CASCADE)",
)
#: A notification's new alerts as rows, with no check: what recording them costs PostgreSQL at the least.
FLOOR_INSERT = b"""
WITH alerts AS (
    INSERT INTO bench_alerts (fingerprint, alert_name, severity, endpoint_id, psp_category, status, starts_at,
                              summary, labels, annotations, payload, generator_url)
    SELECT e ->> 'fingerprint', e -> 'labels' ->> 'alertname', e -> 'labels' ->> 'severity',
           e -> 'labels' ->> 'endpoint_id', e -> 'labels' ->> 'psp_category', e ->> 'status',
           (e ->> 'startsAt')::timestamptz, e -> 'annotations' ->> 'summary', e -> 'labels',
           e -> 'annotations', e, e ->> 'generatorURL'
      FROM jsonb_array_elements(%s::jsonb -> 'alerts') e
    RETURNING id, fingerprint, starts_at)
INSERT INTO bench_outbox (event_id, alert_id, event_type)
SELECT dict_rate_limit_alert_event_id(fingerprint, starts_at, 'rate_limit.alert.created'), id,
       'rate_limit.alert.created'
  FROM alerts
"""
BASELINE_INSERT = b"INSERT INTO bench_notifications (body) VALUES (%s::jsonb)"
#: A recent snapshot of each policy the alerts name, as in production (an alert comes from a policy the
#: exporter stores): the receiver's look-up of the bucket values finds it in the newest partition.
SNAPSHOTS = """
INSERT INTO dict_rate_limit_states (endpoint_id, psp_category, available_tokens, capacity, refill_tokens,
            refill_period_sec, utilization_percent, remaining_ratio, recovery_eta_seconds, response_time)
SELECT 'POLICY_' || g, 'A', 100, 36000, 1200, 60, 99.7, 0.003, 1795, now() - interval '10 seconds'
  FROM generate_series(0, 39) g
"""
KINDS = ("receiver", "floor", "baseline")
ROLES = {"receiver": "project", "floor": "floor", "baseline": "limit"}


def _serve(kind: str, port: int, database_url: str, pool: int) -> None:
    """Child process: the real receiver (no relay; ``scraped`` also serves /metrics), or the minimal
    durable handler."""
    if kind in {"receiver", "scraped"}:
        settings = ReceiverSettings(
            database_url=database_url, webhook_bearer_token=TOKEN, database_max_connections=pool
        )
        app = create_app(settings, relay=None, include_ops=kind == "scraped")
    else:
        app = _baseline_app(database_url, pool, FLOOR_INSERT if kind == "floor" else None)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def _baseline_app(database_url: str, size: int, statement: bytes | None = None) -> web.Application:
    """What durability costs at the least: the body stored in one autocommitted INSERT before the 200;
    with ``statement``, that statement instead, the body its one parameter (the floor)."""
    from psycopg_pool import AsyncConnectionPool

    state: dict[str, Any] = {}

    async def pool_ctx(_app: web.Application) -> Any:
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            database_url, min_size=1, max_size=size, open=False, kwargs={"autocommit": True}
        )
        await pool.open(wait=True)
        state["pool"] = pool
        yield
        await pool.close()

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        async with state["pool"].connection() as conn:
            await conn.execute(statement or BASELINE_INSERT, [body.decode()])
        return web.json_response({"status": "ok"})

    app = web.Application(client_max_size=64 * 2**20)
    app.cleanup_ctx.append(pool_ctx)
    app.router.add_post("/alerts", handle)
    return app


def _payload(per_request: int, distinct: bool = False) -> bytes:
    """New alerts for 40 policies; ``distinct``: each naming an endpoint_id never seen (issue 17's attack)."""
    alerts = []
    for offset in range(per_request):
        policy = f"HOSTILE_{uuid.uuid4().hex[:16]}" if distinct else f"POLICY_{offset % 40}"
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
    port: int,
    seconds: float,
    senders: int,
    per_request: int,
    *,
    distinct: bool = False,
    scrape: bool = False,
) -> dict[str, Any]:
    """``senders`` concurrent Alertmanager-like senders posting new notifications for ``seconds``; with
    ``scrape``, one more client GETs /metrics every SCRAPE_GAP_SECONDS meanwhile."""
    latencies: list[float] = []
    scrapes: list[float] = []
    exposition = b""
    failures = 0
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=senders + scrape)  # the scraper never waits for a sender
    async with aiohttp.ClientSession(connector=connector) as session:
        stop_at = time.perf_counter() + seconds

        async def sender() -> None:
            nonlocal failures
            while time.perf_counter() < stop_at:
                body = _payload(per_request, distinct)
                began = time.perf_counter()
                async with session.post(f"http://127.0.0.1:{port}/alerts", data=body, headers=headers) as r:
                    await r.read()
                    failures += r.status != 200
                latencies.append(time.perf_counter() - began)

        async def scraper() -> None:
            nonlocal exposition, failures
            while time.perf_counter() < stop_at:
                began = time.perf_counter()
                async with session.get(f"http://127.0.0.1:{port}/metrics") as r:
                    exposition = await r.read()
                    failures += r.status != 200
                scrapes.append(time.perf_counter() - began)
                await asyncio.sleep(SCRAPE_GAP_SECONDS)

        began = time.perf_counter()
        await asyncio.gather(*(sender() for _ in range(senders)), *([scraper()] if scrape else []))
        elapsed = time.perf_counter() - began
    return {
        "alerts_per_s": len(latencies) * per_request / elapsed,
        "alerts": len(latencies) * per_request,
        "latencies": latencies,
        "failures": failures,
        "scrapes": scrapes,
        "exposition": exposition,
    }


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes so far (processes gone meanwhile count 0)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14 and 15)
    return total


def _postgres_pids(data_directory: Path) -> list[int]:
    """The embedded server's postmaster and its children (the backends of both servers' pools)."""
    postmaster = int((data_directory / "postmaster.pid").read_text().split()[0])
    children = Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()
    return [postmaster, *map(int, children)]


def cpu_figure(servers: Servers, data_directory: Path, args: argparse.Namespace) -> None:
    """CPU per alert, in the server's process and in PostgreSQL, for the receiver, the floor and the
    baseline: what the throughput ratio is made of, measured the same on a loaded or an idle machine."""
    senders, per_request = args.pool, 10
    for kind in KINDS:
        asyncio.run(_load(servers.ports[kind], 0.3, senders, per_request))
    spent: dict[str, list[tuple[float, float, int]]] = {kind: [] for kind in KINDS}
    for index in range(args.rounds):
        for kind in rotated(list(spent), index):
            server = [servers.pids[kind]]
            postgres = _postgres_pids(data_directory)
            before = (_cpu_seconds(server), _cpu_seconds(postgres))
            result = asyncio.run(_load(servers.ports[kind], args.seconds, senders, per_request))
            after = (_cpu_seconds(server), _cpu_seconds(postgres))
            spent[kind].append((after[0] - before[0], after[1] - before[1], result["alerts"]))
    print(f"\nCPU per alert ({senders} senders x {per_request} alerts, {args.rounds} interleaved rounds):")
    per_alert = {}
    for kind, runs in spent.items():
        alerts = sum(r[2] for r in runs) or 1
        server, postgres = (sum(r[i] for r in runs) / alerts * 1e6 for i in (0, 1))
        per_alert[kind] = server + postgres
        print(
            f"  {kind:9s} server process {server:6.1f} us, PostgreSQL {postgres:6.1f} us,"
            f" total {server + postgres:6.1f} us"
        )
    baseline = per_alert["baseline"]
    print(
        f"  total CPU per alert, baseline / receiver: {baseline / per_alert['receiver']:.2f}x,"
        f" baseline / floor: {baseline / per_alert['floor']:.2f}x,"
        f" floor / receiver: {per_alert['floor'] / per_alert['receiver']:.2f}x"
    )


class Servers:
    """The receiver, the scraped receiver, the floor and the baseline, all running for the whole benchmark
    (measured one at a time). The scraped one has its own process, so its label sets start empty."""

    def __init__(self, database_url: str, pool: int) -> None:
        self.ports = {kind: free_port() for kind in (*KINDS, "scraped")}
        self.pids: dict[str, int] = {}
        context = multiprocessing.get_context("spawn")
        self.processes = [
            context.Process(target=_serve, args=(kind, port, database_url, pool), daemon=True)
            for kind, port in self.ports.items()
        ]

    def __enter__(self) -> Servers:
        for process in self.processes:
            process.start()
        self.pids = {kind: p.pid or 0 for kind, p in zip(self.ports, self.processes, strict=True)}
        for port in self.ports.values():
            wait_for_port("127.0.0.1", port, 30)
        return self

    def __exit__(self, *_exc: object) -> None:
        for process in self.processes:
            process.terminate()
            process.join(10)


def figure(servers: Servers, title: str, cases: list[tuple[int, int]], args: argparse.Namespace) -> list[Row]:
    """Rows of one figure: each case (senders, alerts per request) as receiver, floor and baseline,
    interleaved; the receiver's details give its ratio to the floor too."""
    rows: list[Row] = []
    for senders, per_request in cases:
        for kind in KINDS:  # warm-up: connections opened, code paths loaded
            asyncio.run(_load(servers.ports[kind], 0.3, senders, per_request))
        results: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
        for index in range(args.rounds):
            for kind in rotated(list(results), index):
                results[kind].append(
                    asyncio.run(_load(servers.ports[kind], args.seconds, senders, per_request))
                )
        rates = {kind: [r["alerts_per_s"] for r in runs] for kind, runs in results.items()}
        for kind, runs in results.items():
            latencies = [x for r in runs for x in r["latencies"]]
            failures = sum(r["failures"] for r in runs)
            goal = "goal >= 0.8x" if kind == "receiver" and per_request == 10 else ""
            details = latency_text(latencies) + (f", {failures} FAILED requests" if failures else "")
            if kind == "receiver":
                details += f"; {Ratio.of(rates['receiver'], rates['floor'])} of the floor"
            rows.append(
                Row(
                    ROLES[kind],
                    f"{kind}, {senders} senders x {per_request} alerts",
                    f"{sorted(rates[kind])[len(rates[kind]) // 2]:,.0f}/s",
                    None if kind == "baseline" else Ratio.of(rates[kind], rates["baseline"]),
                    details,
                    goal,
                )
            )
    print_figure(title, "alerts/s", rows)
    return rows


def scraped_figure(servers: Servers, known_policies: int, args: argparse.Namespace) -> bool:
    """Issue 17: every alert a new endpoint_id while /metrics is scraped, against the same alerts to the
    receiver that is not scraped and the baseline, in the same interleaved rounds.

    True if the exposition's series stay within the label bound."""
    senders, per_request = args.pool, 10
    loads = {
        "scraped": {"distinct": True, "scrape": True},
        "receiver": {"distinct": True, "scrape": False},
        "baseline": {"distinct": True, "scrape": False},
    }
    for kind, options in loads.items():  # warm-up (the scraped receiver's 50 free label values fill up)
        asyncio.run(_load(servers.ports[kind], 0.3, senders, per_request, **options))
    results: dict[str, list[dict[str, Any]]] = {kind: [] for kind in loads}
    for index in range(args.rounds):
        for kind in rotated(list(loads), index):
            results[kind].append(
                asyncio.run(_load(servers.ports[kind], args.seconds, senders, per_request, **loads[kind]))
            )
    rates = {kind: [r["alerts_per_s"] for r in runs] for kind, runs in results.items()}
    names = {
        "scraped": "receiver scraped, every endpoint_id new",
        "receiver": "receiver not scraped, same alerts",
        "baseline": "baseline, same alerts",
    }
    rows = []
    for kind, runs in results.items():
        latencies = [x for r in runs for x in r["latencies"]]
        failures = sum(r["failures"] for r in runs)
        rows.append(
            Row(
                "limit" if kind == "baseline" else "project",
                names[kind],
                f"{sorted(rates[kind])[len(rates[kind]) // 2]:,.0f}/s",
                None if kind == "baseline" else Ratio.of(rates[kind], rates["baseline"]),
                latency_text(latencies) + (f", {failures} FAILED requests" if failures else ""),
            )
        )
    print_figure(
        f"webhook while /metrics is scraped every {SCRAPE_GAP_SECONDS:g} s, every alert a new endpoint_id"
        f" ({senders} senders x {per_request} alerts, {args.rounds} interleaved rounds x {args.seconds:g} s)",
        "alerts/s",
        rows,
    )
    scraped = results["scraped"]
    scrapes = [x for r in scraped for x in r["scrapes"]]
    exposition: bytes = scraped[-1]["exposition"]
    series = exposition.count(SERIES_PREFIX)
    # One severity and one category in these alerts: known policies + 50 others + `other`.
    bound = known_policies + MAX_UNKNOWN_POLICIES + 1
    distinct = sum(r["alerts"] for r in scraped)
    print(
        f"  scraped receiver: {distinct:,} distinct endpoint_id values posted (and the warm-up's);"
        f" {len(scrapes)} scrapes, {latency_text(scrapes)};"
        f" exposition {len(exposition) / 1024:,.1f} KiB;"
        f" {series} {SERIES_PREFIX.decode()}...}} series, bound {bound}"
        f" ({known_policies} known policies + {MAX_UNKNOWN_POLICIES} others + `other`):"
        f" {'within the bound' if series <= bound else 'ABOVE THE BOUND'}"
    )
    return series <= bound


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
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--pool", type=int, default=POOL, help="DATABASE_MAX_CONNECTIONS of both servers")
    parser.add_argument("--relay-events", type=int, default=None)
    parser.add_argument(
        "--database-url", help="an administrative database URL (default: embedded PostgreSQL)"
    )
    args = parser.parse_args(argv)
    args.rounds = args.rounds or 3
    args.seconds = args.seconds or (1.0 if args.quick else 2.0)
    relay_events = args.relay_events if args.relay_events is not None else (0 if args.quick else 5000)
    with tempfile.TemporaryDirectory(prefix="drl-bench-") as tmp:
        embedded = None if args.database_url else EmbeddedPostgres(Path(tmp) / "pg")
        admin = args.database_url or embedded.start()  # type: ignore[union-attr]
        broker = EmbeddedPulsar(Path(tmp) / "pulsar") if relay_events else None
        try:
            database_url = _fresh_database(admin)
            with psycopg.connect(database_url, autocommit=True) as conn:
                conn.execute(BASELINE_TABLE)
                for statement in (*FLOOR_TABLES, SNAPSHOTS):
                    conn.execute(statement.encode())
                known = conn.execute(
                    "SELECT count(DISTINCT endpoint_id) FROM dict_rate_limit_policies"
                ).fetchone()
                settings = {
                    name: conn.execute(
                        psycopg.sql.SQL("SHOW {}").format(psycopg.sql.Identifier(name))
                    ).fetchone()
                    for name in ("server_version", "fsync", "synchronous_commit", "max_connections")
                }
            print(
                f"{machine()}; PostgreSQL "
                + ", ".join(f"{name} {row[0] if row else '?'}" for name, row in settings.items())
                + f"; pool {args.pool} connections each"
            )
            with Servers(database_url, args.pool) as servers:
                # First: the two receivers compared here have done the same work (none) before it.
                bounded = scraped_figure(servers, known[0] if known else 0, args)
                if embedded is not None:
                    cpu_figure(servers, embedded.directory, args)
                figure(
                    servers,
                    f"receiver, data model floor and minimal durable handler by alerts per request"
                    f" ({args.pool} senders, {args.rounds} interleaved rounds x {args.seconds:g} s)",
                    [(args.pool, 1), (args.pool, 10), (args.pool, 100)],
                    args,
                )
                figure(
                    servers,
                    f"scaling with concurrent senders, 10 alerts per request (pool {args.pool})",
                    [(senders, 10) for senders in (1, 2, 4, args.pool, 2 * args.pool)],
                    args,
                )
            if broker is not None:
                broker.start()
                relay = asyncio.run(_relay(_fresh_database(admin), broker.url, relay_events))
                print(
                    f"\noutbox relay: {relay['events']:,} events to Pulsar in {relay['seconds']:.2f} s,"
                    f" {relay['events_per_s']:,.0f} events/s, {relay['unsent_after']} unsent after"
                )
        finally:
            if broker is not None:
                broker.stop()
            if embedded is not None:
                embedded.stop()
    return 0 if bounded else 1


if __name__ == "__main__":
    sys.exit(main())
