"""History of known scenarios for the report tests, written with COPY like a real history (not the writer:
a quarter of 30-second snapshots is 470 000 rows).

The exact scenario (2026-01-01 .. 2026-04-01, one snapshot every 30 s, poll interval 30 s):

* ENTRIES_READ_PARTICIPANT_ANTISCAN: category A (capacity 1000, 10 tokens/min) until 2026-02-15 00:00,
  then B (2000, 20/min); half full except: 2026-01-20 08:00-09:00 at 15 % (WARNING only),
  2026-03-10 12:00-15:00 at 5 % (CRITICAL, exactly 3 h) of which 12:00-12:30 at 0 tokens; a history gap
  2026-02-03 10:00-12:00 (last snapshot before it at 09:59:30, at 5 %: counts 60 s, not 2 h). It consumes
  per snapshot 1.0 token in January, 1.1 in February, 1.21 in March (+10 % a month), twice that on weekdays
  09:00-18:00 UTC.
* ENTRIES_WRITE: appears 2026-02-01 00:00, always at 90 %, 0.5 token per snapshot (no growth).
* CLAIMS_READ: vanishes after 2026-01-15 23:59:30; 2026-01-05 00:00-02:00 at 15 % (WARNING).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import psycopg

STATE_COLUMNS = (
    "endpoint_id", "psp_category", "available_tokens", "capacity", "refill_tokens", "refill_period_sec",
    "utilization_percent", "remaining_ratio", "consumption_rate_per_minute", "consumed_tokens",
    "recovery_eta_seconds", "exhaustion_projection_seconds", "error_404_rate", "response_time",
    "correlation_id",
)  # fmt: skip
SINCE = datetime(2026, 1, 1, tzinfo=UTC)
UNTIL = datetime(2026, 4, 1, tzinfo=UTC)
STEP = timedelta(seconds=30)
ANTISCAN, WRITE, CLAIMS = "ENTRIES_READ_PARTICIPANT_ANTISCAN", "ENTRIES_WRITE", "CLAIMS_READ"
CHANGE_AT = datetime(2026, 2, 15, tzinfo=UTC)
GAP = (datetime(2026, 2, 3, 10, tzinfo=UTC), datetime(2026, 2, 3, 12, tzinfo=UTC))
BUCKETS = {"A": (1000, 10, 60), "B": (2000, 20, 60)}

#: (category, available tokens, tokens consumed since the previous snapshot) at t, or None: no snapshot.
State = Callable[[datetime], tuple[str, int, float] | None]


def _between(t: datetime, start: tuple[int, ...], end: tuple[int, ...]) -> bool:
    return datetime(*start, tzinfo=UTC) <= t < datetime(*end, tzinfo=UTC)


def antiscan(t: datetime) -> tuple[str, int, float] | None:
    if GAP[0] <= t < GAP[1]:
        return None
    category = "A" if t < CHANGE_AT else "B"
    capacity = BUCKETS[category][0]
    share = 0.5
    if _between(t, (2026, 1, 20, 8), (2026, 1, 20, 9)):
        share = 0.15
    if _between(t, (2026, 3, 10, 12), (2026, 3, 10, 15)) or t == GAP[0] - STEP:
        share = 0.05
    if _between(t, (2026, 3, 10, 12), (2026, 3, 10, 12, 30)):
        share = 0.0
    base = {1: 1.0, 2: 1.1, 3: 1.21}[t.month]
    busy = t.weekday() < 5 and 9 <= t.hour < 18
    return category, round(capacity * share), base * (2 if busy else 1)


def entries_write(t: datetime) -> tuple[str, int, float] | None:
    if t < datetime(2026, 2, 1, tzinfo=UTC):
        return None
    return "A", 900, 0.5


def claims(t: datetime) -> tuple[str, int, float] | None:
    if t >= datetime(2026, 1, 16, tzinfo=UTC):
        return None
    return "A", 150 if _between(t, (2026, 1, 5, 0), (2026, 1, 5, 2)) else 800, 0.2


SCENARIO: dict[str, State] = {ANTISCAN: antiscan, WRITE: entries_write, CLAIMS: claims}


def state_rows(
    name: str, state: State, since: datetime, until: datetime, step: timedelta
) -> Iterator[tuple[object, ...]]:
    t, index = since, 0
    while t < until:
        found = state(t)
        if found is not None:
            category, available, consumed = found
            capacity, refill, period = BUCKETS[category]
            ratio = available / capacity
            rate = consumed * 60 / step.total_seconds()
            yield (
                name, category, available, capacity, refill, period, round(100 * (1 - ratio), 4), ratio,
                rate, consumed, max(0.0, (capacity - available) / refill * period), None, 0.0, t,
                f"corr-{index}",
            )  # fmt: skip
        t += step
        index += 1


def write_history(
    url: str,
    scenario: dict[str, State],
    since: datetime,
    until: datetime,
    step: timedelta = STEP,
) -> None:
    """COPY every policy's rows and upsert dict_rate_limit_policies the way the writer does."""
    with psycopg.connect(url) as conn:
        month = since.replace(day=1)
        while month < until:
            conn.execute("SELECT create_dict_rate_limit_state_partition(%s::date)", [month.date()])
            month = (month + timedelta(days=32)).replace(day=1)
        with (
            conn.cursor() as cur,
            cur.copy(f"COPY dict_rate_limit_states ({', '.join(STATE_COLUMNS)}) FROM STDIN") as copy,
        ):
            for name, state in scenario.items():
                for row in state_rows(name, state, since, until, step):
                    copy.write_row(row)
        conn.execute(
            """
            INSERT INTO dict_rate_limit_policies (endpoint_id, psp_category, capacity, refill_tokens,
                   refill_period_sec, first_seen_at, last_seen_at)
            SELECT endpoint_id, psp_category, max(capacity), max(refill_tokens), max(refill_period_sec),
                   min(response_time), max(response_time)
              FROM dict_rate_limit_states GROUP BY endpoint_id, psp_category
            """
        )


def insert_alert(
    url: str, name: str, severity: str, endpoint: str | None, *, starts: datetime, ends: datetime | None
) -> None:
    with psycopg.connect(url) as conn:
        conn.execute(
            """
            INSERT INTO dict_rate_limit_alerts (fingerprint, alert_name, severity, endpoint_id, status,
                   starts_at, ends_at, resolved_at, resolved_by, summary, labels, annotations, payload)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, '{}', '{}', '{}')
            """,
            [
                f"fp-{name}-{starts.isoformat()}", name, severity, endpoint,
                "resolved" if ends else "firing", starts, ends, ends, "alertmanager" if ends else None,
                f"{name} on {endpoint or 'the exporter'}",
            ],
        )  # fmt: skip


def load_exact_scenario(url: str) -> None:
    write_history(url, SCENARIO, SINCE, UNTIL)
    critical = (datetime(2026, 3, 10, 12, 0, 30, tzinfo=UTC), datetime(2026, 3, 10, 15, 1, tzinfo=UTC))
    insert_alert(url, "DICTRateLimitCritical", "critical", ANTISCAN, starts=critical[0], ends=critical[1])
    down = (datetime(2026, 2, 3, 10, 1, tzinfo=UTC), datetime(2026, 2, 3, 12, tzinfo=UTC))
    insert_alert(url, "DICTRateLimitExporterDown", "critical", None, starts=down[0], ends=down[1])
    # Before the period: must not be listed.
    before = (datetime(2025, 12, 1, tzinfo=UTC), datetime(2025, 12, 1, 1, tzinfo=UTC))
    insert_alert(url, "DICTRateLimitWarning", "warning", ANTISCAN, starts=before[0], ends=before[1])


def demo_state(name: str, capacity: int, base: float, growth: float, dip: float) -> State:
    """A year of a realistic-looking bucket: daily and weekly rhythm, growth, the odd bad afternoon."""
    start = datetime(2025, 11, 1, tzinfo=UTC)

    def state(t: datetime) -> tuple[str, int, float] | None:
        months = (t - start).days / 30.44
        hour = t.hour + t.minute / 60
        daily = 0.35 + 0.65 * max(0.0, math.sin(math.pi * (hour - 7) / 13)) if 7 <= hour < 20 else 0.25
        weekly = 1.0 if t.weekday() < 5 else 0.45
        seed = (t.toordinal() * 7919 + len(name) * 104729) % 1000 / 1000
        burst = 1.35 if seed > 0.985 and 13 <= t.hour < 16 else 1.0
        pressure = min(1.0, daily * weekly * burst * (1 + growth) ** months * dip)
        available = round(capacity * max(-0.02, 1 - pressure))
        return "A", available, base * daily * weekly * burst * (1 + growth) ** months

    return state


DEMO_SINCE, DEMO_UNTIL = datetime(2025, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)
DEMO_STEP = timedelta(minutes=5)


def _with_outage(state: State, start: datetime, end: datetime) -> State:
    def wrapped(t: datetime) -> tuple[str, int, float] | None:
        return None if start <= t < end else state(t)

    return wrapped


def load_demo(url: str) -> None:
    """Thirteen months of four policies at one snapshot every 5 minutes (run the report with
    --poll-interval-seconds 300): one growing towards trouble, one with a history outage, two calm."""
    demo = {
        "ENTRIES_READ_PARTICIPANT_ANTISCAN": demo_state("antiscan", 1000, 9.0, 0.035, 0.5),
        "ENTRIES_WRITE": _with_outage(
            demo_state("write", 1000, 4.0, 0.02, 0.5),
            datetime(2026, 6, 12, 3, tzinfo=UTC),
            datetime(2026, 6, 14, 9, tzinfo=UTC),
        ),
        "CLAIMS_READ": demo_state("claims", 1000, 2.0, 0.01, 0.35),
        "KEYS_CHECK": demo_state("keys", 1000, 1.0, 0.0, 0.2),
    }
    write_history(url, demo, DEMO_SINCE, DEMO_UNTIL, DEMO_STEP)
    alert = (datetime(2026, 9, 14, 13, 5, tzinfo=UTC), datetime(2026, 9, 14, 15, 40, tzinfo=UTC))
    insert_alert(url, "DICTRateLimitWarning", "warning", "ENTRIES_READ_PARTICIPANT_ANTISCAN",
                 starts=alert[0], ends=alert[1])  # fmt: skip
