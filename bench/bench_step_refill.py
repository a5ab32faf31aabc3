"""Step refill: the exporter's consumption counter and projection against the simulator's true consumption.

Runs the built-in ``step-refill`` scenario (DICT adds RefillTokens at once every RefillPeriodSec) on the
simulator's manual clock for 10 simulated minutes, lists the policies over real gRPC every 30 s as the
exporter does, and derives with :func:`exporter.service.derivation.derive`. The baseline, measured in the
same run on the same answers, is the previous derivation (per-interval gross consumption clamped at 0,
rate over the last interval). Also runs it with continuous refill, and at several phases of the polls
against DICT's steps. One command: ``.venv/bin/python -m bench.bench_step_refill`` (or the file itself).
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from datetime import UTC, datetime

from exporter.bridge.client import BridgeClient
from exporter.service.derivation import (
    DerivedSnapshot,
    derive,
    exhaustion_projection_seconds,
    gross_consumption,
)
from exporter.simulator.clock import ManualClock
from exporter.simulator.scenario import builtin_scenario
from exporter.simulator.server import SimulatorServer
from exporter.snapshot import PolicyReading

POLICIES = ("ENTRIES_WRITE", "CLAIMS_READ", "REFUNDS_READ")
#: Stays at or near its capacity: refill above capacity is discarded unseen, so balances cannot show its
#: consumption (a lower bound with continuous refill, phase-dependent with steps). Printed, not judged.
NEAR_CAPACITY = "REFUNDS_READ"
INTERVAL = 30.0
MINUTES = 10
START = datetime(2026, 3, 2, 12, 0, 0, tzinfo=UTC).timestamp()


@dataclass
class Baseline:
    """The derivation before issue 12: per-interval clamp at 0, projection from the last interval only."""

    total: float = 0.0
    previous: PolicyReading | None = None
    projections: list[float | None] = field(default_factory=list)

    def add(self, reading: PolicyReading, elapsed: float) -> None:
        if self.previous is not None:
            consumed = gross_consumption(self.previous, reading, elapsed)
            self.total += consumed
            self.projections.append(exhaustion_projection_seconds(reading, consumed / elapsed))
        self.previous = reading


def flips(projections: list[float | None]) -> int:
    """How often the projection switched between a finite value and "never"."""
    kinds = [p is None for p in projections]
    return sum(1 for a, b in itertools.pairwise(kinds) if a != b)


async def run(refill: str, offset: float) -> dict[str, tuple[float, float, float, int, int, float | None]]:
    clock = ManualClock(START)
    scenario = builtin_scenario("step-refill")
    if refill != "period":
        scenario = type(scenario)(scenario.name, scenario.traffic, scenario.events, scenario.repeat, refill)
    server = SimulatorServer(clock=clock, scenario=scenario, seed=3)
    await server.start()
    client = BridgeClient(server.address, timeout=5.0)
    derived: DerivedSnapshot | None = None
    baselines = {name: Baseline() for name in POLICIES}
    projections: dict[str, list[float | None]] = {name: [] for name in POLICIES}
    first_true: dict[str, float] = {}
    try:
        clock.advance(offset)
        for poll in range(MINUTES * 2 + 1):
            if poll:
                clock.advance(INTERVAL)
            result = await client.list_policies()
            derived = derive(result.snapshot, derived)
            for state in derived.states:
                name = state.reading.name
                if name not in POLICIES:
                    continue
                if poll == 0:
                    first_true[name] = server.engine.consumed(name)
                else:
                    projections[name].append(state.exhaustion_projection_seconds)
                baselines[name].add(state.reading, INTERVAL)
        assert derived is not None
        out = {}
        for state in derived.states:
            name = state.reading.name
            if name in POLICIES:
                true = server.engine.consumed(name) - first_true[name]
                # The first interval has no window yet; count flips once one refill period is covered.
                out[name] = (
                    true,
                    state.consumed_tokens_total,
                    baselines[name].total,
                    flips(projections[name][1:]),
                    flips(baselines[name].projections[1:]),
                    state.exhaustion_projection_seconds,
                )
        return out
    finally:
        await client.close()
        await server.stop()


def main() -> None:
    print(f"{MINUTES} simulated minutes, a list call every {INTERVAL:g} s; error = counter / true - 1")
    print(
        f"{'refill':<11}{'phase':>6}  {'policy':<14}{'true':>8}{'counter':>9}{'error':>8}"
        f"{'baseline':>10}{'error':>8}{'flips':>7}{'base flips':>11}{'projection':>12}"
    )
    worst = 0.0
    for refill in ("period", "continuous"):
        for offset in (0.0, 7.0, 15.0, 29.0):
            for name, (true, counter, base, flip, base_flip, projection) in asyncio.run(
                run(refill, offset)
            ).items():
                error = counter / true - 1
                if name != NEAR_CAPACITY:
                    worst = max(worst, abs(error))
                shown = "never" if projection is None else f"{projection:.0f} s"
                print(
                    f"{refill:<11}{offset:>5.0f}s  {name:<14}{true:>8.0f}{counter:>9.0f}{error:>+8.1%}"
                    f"{base:>10.0f}{base / true - 1:>+8.1%}{flip:>7}{base_flip:>11}{shown:>12}"
                )
    print(f"worst counter error away from capacity: {worst:.1%} ({NEAR_CAPACITY}: near capacity, see docs)")


if __name__ == "__main__":
    main()
