"""Benchmark of exporter high availability: failover time over several leader kills, and Bridge list calls
per interval across replicas, against one replica alone measured in the same run (the baseline).

    .venv/bin/python -m bench.bench_failover [--replicas 3] [--kills 6] [--interval 1.0] [--lease 1.5]

Real processes (`dict-rate-limit exporter`) on one PostgreSQL (embedded unless --database-url) against a
Bridge that counts its calls (tests/support/replicas.py). Kills alternate SIGKILL (a replacement replica is
started) and SIGSTOP (thawed once another replica leads). Failover time = from the group's last call before
the kill to its first call after it; the documented bound is 2 x interval + 4/3 x lease.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg

from devstack.embedded import EmbeddedPostgres
from exporter.history import migrations
from exporter.service.leader import LeaseTiming
from tests.support.replicas import Call, CountingBridge, Replica, the_leader, wait_for


def _fresh_database(admin_url: str) -> str:
    name = f"drl_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
    url = psycopg.conninfo.make_conninfo(admin_url, dbname=name)
    migrations.apply(url)
    return url


def _env(bridge: CountingBridge, database_url: str | None, args: argparse.Namespace) -> dict[str, str]:
    env = {
        "BRIDGE_ADDRESS": bridge.address,
        "BRIDGE_TIMEOUT_SECONDS": "0.5",
        "POLL_INTERVAL_SECONDS": str(args.interval),
        "POLL_LEAD_SECONDS": str(min(0.2, args.interval / 5)),
        "POLL_BUDGET_OVERRIDE": "true",
        "POLLER_LEASE_SECONDS": str(args.lease),
        "LOG_LEVEL": "warning",
    }
    if database_url:
        env["DATABASE_URL"] = database_url
    return env


def _calls_per_interval(calls: list[Call], interval: float) -> float:
    if len(calls) < 2:
        return float(len(calls))
    return (len(calls) - 1) / ((calls[-1].at - calls[0].at) / interval)


def _doubled_intervals(calls: list[Call], interval: float, lead: float) -> int:
    slots = [round((call.at + lead) / interval) for call in calls]
    return len(slots) - len(set(slots))


def _baseline(directory: Path, args: argparse.Namespace) -> float:
    """One replica without DATABASE_URL: the calls per interval of a lone poller."""
    bridge = CountingBridge().start()
    replica = Replica("baseline", directory, _env(bridge, None, args)).start()
    try:
        wait_for(lambda: len(bridge.snapshot_calls()) >= 2, 30, "the baseline polling")
        time.sleep(args.steady * args.interval)
        return _calls_per_interval(bridge.snapshot_calls()[1:], args.interval)
    finally:
        replica.stop()
        bridge.stop()


def _one_failover(
    bridge: CountingBridge, replicas: list[Replica], *, frozen: bool, within: float
) -> tuple[float, Replica]:
    """Kills (or freezes) the leader; the seconds from the group's last call before to its first after."""
    leader = wait_for(lambda: the_leader(replicas), 30, "a leader")
    failed_at = time.time()
    if frozen:
        leader.freeze()
    else:
        leader.kill()
    others = [r for r in replicas if r is not leader]
    wait_for(lambda: the_leader(others), within, "a new leader")
    wait_for(lambda: any(c.at > failed_at for c in bridge.snapshot_calls()), 30, "a call after the failure")
    calls = bridge.snapshot_calls()
    before = max(c.at for c in calls if c.at <= failed_at)
    return min(c.at for c in calls if c.at > failed_at) - before, leader


def _failovers(directory: Path, database_url: str, args: argparse.Namespace) -> dict[str, Any]:
    timing = LeaseTiming(args.interval, args.lease)
    bridge = CountingBridge().start()
    env = _env(bridge, database_url, args)
    replicas = [Replica(f"replica-{i}", directory, env).start() for i in range(args.replicas)]
    gaps: list[float] = []
    try:
        wait_for(lambda: the_leader(replicas), 60, "a first leader")
        wait_for(lambda: len(bridge.snapshot_calls()) >= 2, 30, "first polls")
        for kill in range(args.kills):
            time.sleep(args.steady * args.interval)
            frozen = kill % 2 == 1
            gap, leader = _one_failover(bridge, replicas, frozen=frozen, within=timing.failover_bound + 30)
            gaps.append(gap)
            if frozen:
                leader.thaw()  # a follower from now on: its term is gone
            else:
                replicas = [r for r in replicas if r is not leader]
                replicas.append(Replica(f"replica-r{kill}", directory, env).start())
        time.sleep(args.steady * args.interval)
        calls = bridge.snapshot_calls()
    finally:
        for replica in replicas:
            replica.stop()
        bridge.stop()
    lead = min(0.2, args.interval / 5)
    return {
        "failover_seconds": {
            "min": round(min(gaps), 3),
            "median": round(statistics.median(gaps), 3),
            "max": round(max(gaps), 3),
            "each": [round(g, 3) for g in gaps],
        },
        "documented_bound_seconds": round(timing.failover_bound, 3),
        "calls": len(calls),
        "calls_per_interval_all_replicas": round(_calls_per_interval(calls[1:], args.interval), 4),
        "intervals_with_two_calls": _doubled_intervals(calls, args.interval, lead),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--lease", type=float, default=1.5)
    parser.add_argument("--steady", type=int, default=6, help="intervals between kills")
    parser.add_argument(
        "--database-url", help="an administrative database URL (default: embedded PostgreSQL)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="drl-bench-failover-") as tmp:
        directory = Path(tmp)
        embedded = None if args.database_url else EmbeddedPostgres(directory / "pg")
        admin = args.database_url or embedded.start()  # type: ignore[union-attr]
        try:
            baseline = _baseline(directory, args)
            failover = _failovers(directory, _fresh_database(admin), args)
        finally:
            if embedded is not None:
                embedded.stop()
    report = {
        "replicas": args.replicas,
        "kills": f"{args.kills} (alternating SIGKILL and SIGSTOP)",
        "interval_seconds": args.interval,
        "lease_seconds": args.lease,
        "baseline_one_replica_calls_per_interval": round(baseline, 4),
        **failover,
        "calls_per_interval_vs_baseline": round(failover["calls_per_interval_all_replicas"] / baseline, 3),
        "max_failover_vs_bound": round(
            failover["failover_seconds"]["max"] / failover["documented_bound_seconds"], 3
        ),
    }
    print(json.dumps(report, indent=2))
    ok = failover["intervals_with_two_calls"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())
