"""What every benchmark shares: interleaved rounds, per-round ratios (median and spread), CPU of a process,
and one table layout (project, peers, limit) for every figure."""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads (from /proc: works for any child process)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rotated(names: Sequence[str], round_index: int) -> list[str]:
    """The order of one round: rotated each round, so no target always runs first or after the same one."""
    shift = round_index % len(names)
    return [*names[shift:], *names[:shift]]


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@dataclass(frozen=True)
class Ratio:
    """A ratio measured round by round (each round's figures were taken minutes, not hours, apart)."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, numerators: Sequence[float], denominators: Sequence[float]) -> Ratio:
        ratios = [n / d for n, d in zip(numerators, denominators, strict=True) if d > 0]
        return cls(statistics.median(ratios), min(ratios), max(ratios))

    def __str__(self) -> str:
        return f"{self.median:6.2f}x [{self.low:.2f}-{self.high:.2f}]"


@dataclass(frozen=True)
class Row:
    """One line of a figure: ``role`` is project, peer or limit."""

    role: str
    name: str
    value: str
    ratio: Ratio | None
    extra: str = ""
    goal: str = ""


def print_figure(title: str, unit: str, rows: Sequence[Row]) -> None:
    """One figure: every target's value, its ratio to the limit (median [min-max] over rounds), a goal."""
    print(f"\n{title}")
    print(f"  {'role':<8}{'target':<46}{unit:>14}  {'ratio to limit [spread]':<25}{'goal':<14}details")
    for row in rows:
        ratio = str(row.ratio) if row.ratio is not None else "1 (the limit)" if row.role == "limit" else ""
        print(f"  {row.role:<8}{row.name:<46}{row.value:>14}  {ratio:<25}{row.goal:<14}{row.extra}")


def latency_text(latencies: Sequence[float]) -> str:
    return f"p50 {percentile(latencies, 0.5) * 1e3:.1f} ms, p99 {percentile(latencies, 0.99) * 1e3:.1f} ms"


def machine() -> str:
    """Date and machine, for the figures copied into docs/."""
    cores = os.cpu_count()
    load = os.getloadavg()[0]
    return (
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()} {cores} cores "
        f"(load {load:.1f}: shared), Python {platform.python_version()}"
    )
