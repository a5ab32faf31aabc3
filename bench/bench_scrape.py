"""Scrape benchmark: server CPU per /metrics scrape of the exporter (history off and on), of the designs a
user would write instead (bench/peers.py) and of the raw-socket floor, in interleaved rounds; then the
exporter (history off) behind its web configuration file: basic auth (bcrypt cost 10, checks cached), TLS
and TLS + basic auth, each also as a ratio to the open exporter of the same round.

Every server runs in its own process against its own Bridge simulator (which enforces DICT's budget) and
its real poll loop or per-scrape calls; the load generator and the simulators share this process, so a
server's CPU (all its threads, from /proc) is its own. Each round runs every target once, in an order
rotated each round; a ratio is taken within a round and reported as median [min-max] over the rounds.

    python -m bench.bench_scrape [--quick] [--rounds 3] [--seconds 2] [--clients 10] [--database-url URL]

To add a case (client certificates...): one more entry in ``targets()`` (a server with its settings, the
client's headers or SSL context); everything else is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import multiprocessing
import ssl
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import yaml
from psycopg import sql

from bench.common import Ratio, Row, cpu_seconds, latency_text, machine, print_figure, rotated
from devstack.embedded import EmbeddedPostgres, free_port, wait_for_port

#: 3x production's 30 s: the most DICT's POLICIES_LIST refill (6/min) allows, so the poll loop's cost is
#: in every round and the simulator never refuses a poll.
POLL_INTERVAL = 10.0
SERIES_PER_POLICY = 14
CASES = (("30 policies", 30), ("715 policies", 715))
GOALS = {("30 policies", "exporter, history on"): 4.0, ("715 policies", "exporter, history on"): 2.0}
#: The multi-participant case (issue 15): this many participants, each its own simulator of this many
#: policies, against the floor serving the same bytes and one participant with as many policies in all.
PARTICIPANTS, PARTICIPANT_POLICIES = 10, 30
PARTICIPANTS_LABEL = f"{PARTICIPANTS} participants x {PARTICIPANT_POLICIES} policies"


# --- servers (child processes; module-level functions so that spawn can start them)


def _serve_exporter(
    port: int, bridge: str, database_url: str | None, overrides: dict[str, Any] | None = None
) -> None:
    """The exporter as deployed; ``overrides`` are Settings fields of a case (TLS files, basic auth...)."""
    from exporter.config import ExporterSettings
    from exporter.service.app import ExporterService

    settings = ExporterSettings(
        bridge_address=bridge,
        listen_host="127.0.0.1",
        metrics_port=port,
        health_check_port=port,
        poll_interval_seconds=POLL_INTERVAL,
        poll_budget_override=True,
        database_url=database_url,
        log_level="warning",
        **(overrides or {}),
    )

    async def main() -> None:
        service = ExporterService(settings)
        await service.start()
        await asyncio.Event().wait()

    asyncio.run(main())


def _serve_participants(port: int, bridges: list[str]) -> None:
    """The exporter with a ``participants:`` list, one entry per Bridge (history off)."""
    from exporter.config import ExporterSettings, participants_of
    from exporter.service.app import ExporterService

    base = ExporterSettings(
        listen_host="127.0.0.1",
        metrics_port=port,
        health_check_port=port,
        poll_interval_seconds=POLL_INTERVAL,
        poll_budget_override=True,
        log_level="warning",
    )
    entries = [{"name": f"participant-{i:02d}", "bridge_address": bridge} for i, bridge in enumerate(bridges)]
    settings = base.replace(participants=participants_of(entries, base))

    async def main() -> None:
        service = ExporterService(settings)
        await service.start()
        await asyncio.Event().wait()

    asyncio.run(main())


def _serve_peer(kind: str, port: int, bridge: str) -> None:
    from bench import peers

    if kind == "per-scrape":
        peers.serve_per_scrape(port, bridge)
    else:
        peers.serve_gauges(port, bridge, POLL_INTERVAL)


def _serve_floor(port: int, body: bytes) -> None:
    from bench import peers

    peers.serve_floor(port, body)


@dataclass
class Server:
    """A server process and, when it talks to a Bridge, its own simulator (its calls counted apart)."""

    name: str
    start: Callable[[int, str], tuple[Callable[..., None], tuple[Any, ...]]]
    needs_bridge: bool = True
    port: int = 0
    process: Any = None
    simulator: Any = None

    async def launch(self, policies: int) -> None:
        address = ""
        if self.needs_bridge:
            self.simulator = await _simulator(policies)
            address = self.simulator.address
        self.port = free_port()
        target, args = self.start(self.port, address)
        self.process = multiprocessing.get_context("spawn").Process(target=target, args=args, daemon=True)
        self.process.start()
        await asyncio.to_thread(wait_for_port, "127.0.0.1", self.port, 60, None)

    @property
    def bridge_calls(self) -> int:
        return int(self.simulator.list_calls) if self.simulator is not None else 0

    async def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            await asyncio.to_thread(self.process.join, 10)
        if self.simulator is not None:
            await self.simulator.stop()


@dataclass
class ParticipantsServer(Server):
    """The multi-participant exporter and its PARTICIPANTS simulators (their calls counted together)."""

    simulators: list[Any] = field(default_factory=list)

    async def launch(self, policies: int) -> None:
        self.simulators = [await _simulator(policies) for _ in range(PARTICIPANTS)]
        self.port = free_port()
        bridges = [simulator.address for simulator in self.simulators]
        self.process = multiprocessing.get_context("spawn").Process(
            target=_serve_participants, args=(self.port, bridges), daemon=True
        )
        self.process.start()
        await asyncio.to_thread(wait_for_port, "127.0.0.1", self.port, 60, None)

    @property
    def bridge_calls(self) -> int:
        return sum(int(simulator.list_calls) for simulator in self.simulators)

    async def stop(self) -> None:
        await super().stop()
        for simulator in self.simulators:
            await simulator.stop()


@dataclass(frozen=True)
class Target:
    """What one row measures: a server, scraped with these headers (and SSL context)."""

    name: str
    role: str  # project, peer or limit
    server: str
    headers: dict[str, str] = field(default_factory=lambda: {"Accept-Encoding": "identity"})
    ssl: ssl.SSLContext | None = None
    scheme: str = "http"
    #: The target this one is also compared with, round by round (the open exporter for the secured ones).
    baseline: str | None = None


@dataclass(frozen=True)
class Secure:
    """Web configuration files (basic auth, TLS, both) and what the load generator presents to them."""

    files: dict[str, str]
    auth: dict[str, str]
    tls: ssl.SSLContext


def secure_setup(directory: Path) -> Secure:
    """A PKI (tests/support/certs.py), one bcrypt hash (cost 10, the exporter-toolkit's usual) and the
    three web configuration files of the secured cases."""
    import bcrypt

    from tests.support.certs import make_pki

    pki = make_pki(directory)
    users = {"prometheus": bcrypt.hashpw(b"bench-password", bcrypt.gensalt(10)).decode()}
    tls_section = {"cert_file": pki.server_cert, "key_file": pki.server_key}
    contents = {
        "basic": {"basic_auth_users": users},
        "tls": {"tls_server_config": tls_section},
        "tls-basic": {"tls_server_config": tls_section, "basic_auth_users": users},
    }
    files = {}
    for name, content in contents.items():
        path = directory / f"web-{name}.yml"
        path.write_text(yaml.safe_dump(content), encoding="utf-8")
        files[name] = str(path)
    auth = {"Authorization": "Basic " + base64.b64encode(b"prometheus:bench-password").decode()}
    return Secure(files, auth, ssl.create_default_context(cafile=pki.ca))


def _secured_exporter(name: str, web_config: str) -> Server:
    overrides = {"web_config_file": web_config}
    return Server(name, lambda port, bridge: (_serve_exporter, (port, bridge, None, overrides)))


def servers(database_url: str, floor_body: list[bytes], secure: Secure) -> dict[str, Server]:
    return {
        "floor": Server("floor", lambda port, _: (_serve_floor, (port, floor_body[0])), needs_bridge=False),
        "exporter-off": Server("exporter-off", lambda port, bridge: (_serve_exporter, (port, bridge, None))),
        "exporter-on": Server(
            "exporter-on", lambda port, bridge: (_serve_exporter, (port, bridge, _fresh(database_url)))
        ),
        "per-scrape": Server("per-scrape", lambda port, bridge: (_serve_peer, ("per-scrape", port, bridge))),
        "gauges": Server("gauges", lambda port, bridge: (_serve_peer, ("gauges", port, bridge))),
        **{f"exporter-{n}": _secured_exporter(f"exporter-{n}", path) for n, path in secure.files.items()},
    }


def targets(secure: Secure) -> list[Target]:
    gzip = {"Accept-Encoding": "gzip"}
    open_ = "exporter, history off"
    auth = {**_IDENTITY, **secure.auth}
    return [
        Target("raw asyncio socket, pre-rendered bytes", "limit", "floor"),
        Target("exporter, history on", "project", "exporter-on"),
        Target("exporter, history on, gzip", "project", "exporter-on", headers=gzip),
        Target("exporter, history off", "project", "exporter-off"),
        Target("per-scrape collector (calls the Bridge)", "peer", "per-scrape"),
        Target("global Gauges + poll thread", "peer", "gauges"),
        Target(
            "exporter, off, basic auth (bcrypt cached)", "project", "exporter-basic", auth, baseline=open_
        ),
        Target(
            "exporter, off, TLS", "project", "exporter-tls", ssl=secure.tls, scheme="https", baseline=open_
        ),
        Target(
            "exporter, off, TLS + basic auth",
            "project",
            "exporter-tls-basic",
            auth,
            ssl=secure.tls,
            scheme="https",
            baseline=open_,
        ),
    ]


async def _simulator(policies: int) -> Any:
    from exporter.simulator.server import SimulatorServer

    simulator = SimulatorServer(category="A", seed=3)
    names = set(simulator.engine.policy_names())
    for i in range(policies - len(names)):
        simulator.engine.add_policy(f"POLICY_{i:05d}", 36_000, 1200, 60, available=30_000 - i % 700)
    await simulator.start()
    return simulator


def _fresh(admin_url: str) -> str:
    from exporter.history import migrations

    name = f"drl_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = psycopg.conninfo.make_conninfo(admin_url, dbname=name)
    migrations.apply(url)
    return url


# --- load


@dataclass
class Sample:
    cpu: float = 0.0
    scrapes: int = 0
    with_data: int = 0
    bridge_calls: int = 0
    size: int = 0
    latencies: list[float] = field(default_factory=list)

    @property
    def cpu_per_scrape(self) -> float:
        return self.cpu / max(1, self.scrapes)


async def _load(target: Target, server: Server, seconds: float, clients: int) -> Sample:
    url = f"{target.scheme}://127.0.0.1:{server.port}/metrics"
    sample = Sample()
    connector = aiohttp.TCPConnector(limit=clients, ssl=target.ssl or False)
    # auto_decompress off: the load generator's CPU is not spent inflating gzip bodies.
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as http:
        cpu_before, calls_before = cpu_seconds(server.process.pid), server.bridge_calls
        stop_at = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < stop_at:
                began = time.perf_counter()
                async with http.get(url, headers=target.headers) as response:
                    body = await response.read()
                    if response.status != 200:  # a refused scrape is cheap: it must not count as one
                        raise RuntimeError(f"{target.name}: HTTP {response.status} from {url}")
                sample.latencies.append(time.perf_counter() - began)
                sample.scrapes += 1
                sample.size = len(body)
                sample.with_data += b"available_tokens{" in body  # identity bodies only (see _print_case)

        await asyncio.gather(*(worker() for _ in range(clients)))
        sample.cpu = cpu_seconds(server.process.pid) - cpu_before
        sample.bridge_calls = server.bridge_calls - calls_before
    return sample


_IDENTITY = {"Accept-Encoding": "identity"}


async def _full_exposition(port: int) -> bytes:
    """The exporter's body once two polls are behind it (rates and projections present): the floor then
    serves these very bytes. Waits up to a poll interval and a half."""
    deadline = time.monotonic() + 1.5 * POLL_INTERVAL + 5
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
                body = await response.read()
            if b"dict_rate_limit_consumption_rate_per_minute{" in body or time.monotonic() > deadline:
                return body
            await asyncio.sleep(0.5)


async def run_case(
    label: str, policies: int, args: argparse.Namespace, admin_url: str, secure: Secure
) -> dict[str, Any]:
    floor_body: list[bytes] = [b""]
    pool = servers(admin_url, floor_body, secure)
    chosen = targets(secure)
    try:
        for key in pool:
            if key != "floor":
                await pool[key].launch(policies)
        floor_body[0] = await _full_exposition(pool["exporter-on"].port)
        await pool["floor"].launch(policies)
        for target in chosen:  # warm-up
            await _load(target, pool[target.server], 0.3, args.clients)
        rounds: dict[str, list[Sample]] = {t.name: [] for t in chosen}
        # Bridge calls are counted over the whole measured span, not only each target's own windows:
        # a poll loop calls on its own clock, whoever is being scraped at that moment.
        began, calls = time.perf_counter(), {key: server.bridge_calls for key, server in pool.items()}
        for index in range(args.rounds):
            for name in rotated([t.name for t in chosen], index):
                target = next(t for t in chosen if t.name == name)
                rounds[name].append(await _load(target, pool[target.server], args.seconds, args.clients))
        span = time.perf_counter() - began
        calls = {key: server.bridge_calls - calls[key] for key, server in pool.items()}
    finally:
        for server in pool.values():
            await server.stop()
    _print_case(label, policies, chosen, rounds, args, calls=calls, span=span)
    return {name: [s.cpu_per_scrape for s in samples] for name, samples in rounds.items()}


async def run_participants_case(args: argparse.Namespace) -> dict[str, Any]:
    """10 participants x 30 policies in one exporter, against the floor serving its very bytes and one
    participant with the same number of policies (what merging the labelled parts costs per scrape)."""
    floor_body: list[bytes] = [b""]
    total = PARTICIPANTS * PARTICIPANT_POLICIES
    pool: dict[str, Server] = {
        "floor": Server("floor", lambda port, _: (_serve_floor, (port, floor_body[0])), needs_bridge=False),
        "exporter-participants": ParticipantsServer(
            "exporter-participants", lambda port, bridge: (print, ())
        ),
        "exporter-single": Server(
            "exporter-single", lambda port, bridge: (_serve_exporter, (port, bridge, None))
        ),
    }
    chosen = [
        Target("raw asyncio socket, pre-rendered bytes", "limit", "floor"),
        Target(f"exporter, {PARTICIPANTS} participants, history off", "project", "exporter-participants"),
        Target(
            f"exporter, {PARTICIPANTS} participants, gzip",
            "project",
            "exporter-participants",
            headers={"Accept-Encoding": "gzip"},
        ),
        Target(
            f"exporter, 1 participant x {total} policies",
            "project",
            "exporter-single",
            baseline=f"exporter, {PARTICIPANTS} participants, history off",
        ),
    ]
    try:
        await pool["exporter-participants"].launch(PARTICIPANT_POLICIES)
        await pool["exporter-single"].launch(total)
        floor_body[0] = await _full_exposition(pool["exporter-participants"].port)
        await pool["floor"].launch(0)
        for target in chosen:  # warm-up
            await _load(target, pool[target.server], 0.3, args.clients)
        rounds: dict[str, list[Sample]] = {t.name: [] for t in chosen}
        began, calls = time.perf_counter(), {key: server.bridge_calls for key, server in pool.items()}
        for index in range(args.rounds):
            for name in rotated([t.name for t in chosen], index):
                target = next(t for t in chosen if t.name == name)
                rounds[name].append(await _load(target, pool[target.server], args.seconds, args.clients))
        span = time.perf_counter() - began
        calls = {key: server.bridge_calls - calls[key] for key, server in pool.items()}
    finally:
        for server in pool.values():
            await server.stop()
    _print_case(PARTICIPANTS_LABEL, total, chosen, rounds, args, calls=calls, span=span)
    return {name: [s.cpu_per_scrape for s in samples] for name, samples in rounds.items()}


def _print_case(
    label: str,
    policies: int,
    chosen: list[Target],
    rounds: dict[str, list[Sample]],
    args: argparse.Namespace,
    *,
    calls: dict[str, int],
    span: float,
) -> None:
    limit = next(t for t in chosen if t.role == "limit")
    floor = [s.cpu_per_scrape for s in rounds[limit.name]]
    rows = []
    for target in chosen:
        samples = rounds[target.name]
        cpu = [s.cpu_per_scrape for s in samples]
        latencies = [x for s in samples for x in s.latencies]
        scrapes = sum(s.scrapes for s in samples)
        server_scrapes = sum(s.scrapes for _, runs in _by_server(chosen, rounds, target) for s in runs)
        data = sum(s.with_data for s in samples)
        goal = GOALS.get((label, target.name.removesuffix(", gzip")))
        versus = (
            f", {str(Ratio.of(cpu, [s.cpu_per_scrape for s in rounds[target.baseline]])).strip()} of open"
            if target.baseline
            else ""
        )
        rows.append(
            Row(
                target.role,
                target.name,
                f"{statistics.median(cpu) * 1e6:,.0f} us",
                None if target is limit else Ratio.of(cpu, floor),
                latency_text(latencies)
                + versus
                + f", {scrapes / (args.seconds * len(samples)):,.0f} req/s, {samples[-1].size / 1000:,.0f} kB"
                + (
                    f", Bridge calls in {span:.0f} s: {calls[target.server]}"
                    f" ({calls[target.server] * 1000 / max(1, server_scrapes):,.1f} per 1,000 scrapes),"
                    f" data in {data}/{scrapes} scrapes"
                    if target.server != "floor" and target.headers.get("Accept-Encoding") == "identity"
                    else ""
                ),
                f"goal <= {goal:g}x" if goal else "",
            )
        )
    print_figure(
        f"/metrics, {label} ({policies * SERIES_PER_POLICY:,} bucket series): server CPU per scrape, "
        f"{args.clients} clients, {args.rounds} interleaved rounds x {args.seconds:g} s",
        "CPU/scrape",
        rows,
    )


def _by_server(
    chosen: list[Target], rounds: dict[str, list[Sample]], target: Target
) -> list[tuple[Target, list[Sample]]]:
    """Every target served by the same server as ``target`` (gzip and identity scrapes of one process)."""
    return [(other, rounds[other.name]) for other in chosen if other.server == target.server]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds (~1 minute)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--database-url", help="administrative database URL (default: embedded PostgreSQL)")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.seconds = args.seconds or (1.0 if args.quick else 2.0)
    print(f"{machine()}; poll interval {POLL_INTERVAL:g} s against the simulator")
    with tempfile.TemporaryDirectory(prefix="drl-bench-") as tmp:
        embedded = None if args.database_url else EmbeddedPostgres(Path(tmp) / "pg")
        admin = args.database_url or embedded.start()  # type: ignore[union-attr]
        secure = secure_setup(Path(tmp))
        try:
            for label, policies in CASES:
                asyncio.run(run_case(label, policies, args, admin, secure))
            asyncio.run(run_participants_case(args))
        finally:
            if embedded is not None:
                embedded.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
