"""Several participants in one exporter: two Bridge simulators over real gRPC, one exporter, real HTTP."""

from __future__ import annotations

import asyncio
import collections
import gzip
import logging
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from devstack.embedded import free_port
from exporter import config, logsetup
from exporter.config import ConfigError, ExporterSettings
from exporter.service import exposition
from exporter.service.app import ExporterService
from exporter.simulator.scenario import parse_scenario
from exporter.simulator.server import SimulatorServer
from tests.service.test_exporter_service import Running, settings_for
from tests.support.env import require_binary

SLOW = "CLAIMS_LIST_WITHOUT_ROLE"


def write_config(tmp_path: Path, document: dict[str, Any]) -> str:
    path = tmp_path / "exporter.yml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return str(path)


def load(tmp_path: Path, document: dict[str, Any], environ: dict[str, str] | None = None) -> Any:
    return config.load("exporter", {"config_file": write_config(tmp_path, document)}, environ or {})


def two_participants(a: str, b: str, **top: Any) -> dict[str, Any]:
    return {
        "listen_host": "127.0.0.1",
        "metrics_port": free_port(),
        "health_check_port": free_port(),
        "poll_interval_seconds": 1.0,
        "poll_lead_seconds": 0.25,
        "poll_budget_override": True,
        "stale_after_intervals": 2,
        "bridge_timeout_seconds": 0.5,
        **top,
        "participants": [
            {"name": "bank-a", "bridge_address": a},
            # Its own thresholds, and a longer timeout than the top level's.
            {
                "name": "bank-b",
                "bridge_address": b,
                "warning_remaining_ratio": 0.5,
                "critical_remaining_ratio": 0.3,
                "bridge_timeout_seconds": 0.8,
            },
        ],
    }


@pytest.fixture
async def sims() -> AsyncIterator[tuple[SimulatorServer, SimulatorServer]]:
    a, b = SimulatorServer(category="A", seed=1), SimulatorServer(category="C", seed=2)
    await a.start()
    await b.start()
    yield a, b
    await a.stop()
    await b.stop()


@pytest.fixture
async def start() -> AsyncIterator[Callable[[ExporterSettings], Any]]:
    services: list[ExporterService] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:

        async def starter(settings: ExporterSettings) -> Running:
            service = ExporterService(settings)
            await service.start()
            services.append(service)
            return Running(service, session)

        yield starter
        for service in services:
            await service.stop()


async def _both_polled(running: Running) -> bool:
    samples = await running.samples()
    return all(
        samples.get(
            ("dict_rate_limit_polls_total", frozenset({("result", "success"), ("participant", p)})), 0
        )
        >= 2
        for p in ("bank-a", "bank-b")
    )


def _participants_of(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str) -> set[str]:
    return {dict(labels).get("participant", "") for (metric, labels) in samples if metric == name}


# --- configuration


def test_entries_inherit_the_top_level_and_override_their_own_keys(tmp_path: Path) -> None:
    settings = load(tmp_path, two_participants("127.0.0.1:1", "127.0.0.1:2", bridge_timeout_seconds=0.4))
    a, b = settings.participants
    assert (a.name, a.settings.bridge_address, a.settings.bridge_timeout_seconds) == (
        "bank-a",
        "127.0.0.1:1",
        0.4,
    )
    assert (b.name, b.settings.bridge_address, b.settings.bridge_timeout_seconds) == (
        "bank-b",
        "127.0.0.1:2",
        0.8,
    )
    assert b.settings.threshold_for("ENTRIES_WRITE").warning == 0.5
    assert a.settings.threshold_for("ENTRIES_WRITE").warning == 0.2
    assert a.settings.participants == ()
    # Without the list: today's single participant, from the environment as before.
    single = config.load("exporter", {}, {"BRIDGE_ADDRESS": "127.0.0.1:3"})
    assert (single.participants, single.bridge_address) == ((), "127.0.0.1:3")


def test_every_bridge_key_is_a_participant_key() -> None:
    # Taken from the dataclasses, so a key added to BridgeKeys (participant_ispb...) is accepted per entry.
    allowed = config.participant_keys()
    for group in (config.BridgeKeys, config.PollKeys, config.ThresholdKeys):
        assert {k.name for k in config.keys_of(group)} <= set(allowed)
    assert "database_url" not in allowed
    assert "metrics_port" not in allowed


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([{"name": "a", "bridge_address": "nope"}], "participants[0].bridge_address: must be HOST:PORT"),
        ([{"bridge_address": "127.0.0.1:1"}], "participants[0].name: required"),
        ([{"name": "a"}, {"name": "bad name"}], "participants[1].name: 'bad name' is not a participant name"),
        ([{"name": "a"}, {"name": "a"}], "participants[1].name: 'a' is already the name of participants[0]"),
        ([{"name": "a", "metrics_port": 1}], "participants[0].metrics_port: unknown key for a participant"),
        (
            [{"name": "a"}, {"name": "b", "bridge_tls_cert_file": "/etc/hostname"}],
            "participants[1].bridge_tls_cert_file: mTLS needs both",
        ),
        (
            [{"name": "a", "poll_interval_seconds": 1, "poll_budget_override": False}],
            "participants[0].poll_interval_seconds: 1 s means 60 Bridge list calls per minute",
        ),
        (
            [{"name": "a", "critical_remaining_ratio": 0.9}],
            "participants[0].critical_remaining_ratio: must be",
        ),
        ([], "participants: must be a non-empty list"),
        (["a"], "participants[0]: must be a mapping"),
    ],
)
def test_a_bad_entry_is_one_line_naming_its_path(tmp_path: Path, entries: list[Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, {"participants": entries})
    assert str(caught.value).startswith(message), str(caught.value)


def test_check_config_names_the_path_and_exits_2(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"participants": [{"name": "a"}, {"name": "b", "bridge_address": "x"}]})
    result = subprocess.run(
        [".venv/bin/dict-rate-limit", "check-config", "exporter", "--config.file", path],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith("participants[1].bridge_address: must be HOST:PORT (got 'x')")
    )
    ok = write_config(tmp_path, two_participants("127.0.0.1:1", "127.0.0.1:2"))
    shown = subprocess.run(
        [".venv/bin/dict-rate-limit", "check-config", "exporter", "--config.file", ok],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert '"name": "bank-b"' in shown.stdout
    assert '"warning_remaining_ratio": 0.5' in shown.stdout


# --- the exposition


def test_merge_writes_each_family_once_with_every_part_labelled() -> None:
    text = (
        b"# HELP m A gauge.\n# TYPE m gauge\nm 1.0\n"
        b'# HELP c A counter.\n# TYPE c counter\nc_total{code="OK"} 2.0\n'
    )
    parts = [exposition.split(text, exposition.label_pair("participant", name)) for name in ("a", "b")]
    merged = exposition.merge([*parts, exposition.split(b"# HELP p Process.\n# TYPE p gauge\np 3.0\n")])
    assert merged == (
        b'# HELP m A gauge.\n# TYPE m gauge\nm{participant="a"} 1.0\nm{participant="b"} 1.0\n'
        b'# HELP c A counter.\n# TYPE c counter\nc_total{participant="a",code="OK"} 2.0\n'
        b'c_total{participant="b",code="OK"} 2.0\n# HELP p Process.\n# TYPE p gauge\np 3.0\n'
    )


async def test_series_are_separated_by_participant_and_the_exposition_is_valid(
    sims: tuple[SimulatorServer, SimulatorServer], start: Any, tmp_path: Path
) -> None:
    promtool = require_binary("promtool")
    a, b = sims
    b.engine.set_tokens(SLOW, 10)
    running = await start(load(tmp_path, two_participants(a.address, b.address)))
    await running.until(lambda: _both_polled(running))
    text = await running.text()
    helps = collections.Counter(line.split()[2] for line in text.splitlines() if line.startswith("# HELP"))
    assert [name for name, n in helps.items() if n > 1] == []
    assert helps["dict_rate_limit_available_tokens"] == 1
    samples = await running.samples()
    slow_b = frozenset({("participant", "bank-b"), ("endpoint_id", SLOW), ("psp_category", "C")})
    assert 10.0 <= samples[("dict_rate_limit_available_tokens", slow_b)] < 13.0  # refills 10/min
    assert samples[("dict_rate_limit_warning_remaining_ratio", slow_b)] == 0.5  # bank-b's own threshold
    slow_a = frozenset({("participant", "bank-a"), ("endpoint_id", SLOW), ("psp_category", "A")})
    assert samples[("dict_rate_limit_warning_remaining_ratio", slow_a)] == 0.2
    for name in (
        "dict_rate_limit_available_tokens",
        "dict_rate_limit_bridge_up",
        "dict_rate_limit_polls_total",
    ):
        assert _participants_of(samples, name) == {"bank-a", "bank-b"}, name
    # Process-wide series stay unlabelled, once.
    for name in (
        "dict_rate_limit_exporter_build_info",
        "process_start_time_seconds",
        "dict_rate_limit_history_enabled",
    ):
        assert _participants_of(samples, name) == {""}, name
    result = await asyncio.to_thread(
        subprocess.run,
        [promtool, "check", "metrics"],
        input=text.encode(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert (result.returncode, result.stderr.decode()) == (0, "")
    list(text_string_to_metric_families(text))
    async with running.http.get(
        running.base + "/metrics", headers={"Accept-Encoding": "gzip"}, auto_decompress=False
    ) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        body = gzip.decompress(await response.read()).decode()
    assert body.count("# HELP dict_rate_limit_available_tokens ") == 1
    # Each its own Bridge and budget: both simulators were called, each about once per interval.
    assert a.list_calls >= 2
    assert b.list_calls >= 2


async def test_one_bridge_down_leaves_the_other_healthy_ready_and_fresh(
    sims: tuple[SimulatorServer, SimulatorServer],
    start: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.handler.addFilter(logsetup.ContextFilter())  # as logsetup.setup() installs it
    a, b = sims
    running = await start(load(tmp_path, two_participants(a.address, b.address)))
    await running.until(lambda: _both_polled(running))
    await b.stop()

    async def b_withdrawn() -> bool:
        samples = await running.samples()
        return _participants_of(samples, "dict_rate_limit_available_tokens") == {"bank-a"}

    await running.until(b_withdrawn, within=10.0)
    samples = await running.samples()
    assert samples[("dict_rate_limit_bridge_up", frozenset({("participant", "bank-b")}))] == 0.0
    assert samples[("dict_rate_limit_stale", frozenset({("participant", "bank-b")}))] == 1.0
    assert samples[("dict_rate_limit_bridge_up", frozenset({("participant", "bank-a")}))] == 1.0
    assert samples[("dict_rate_limit_stale", frozenset({("participant", "bank-a")}))] == 0.0
    polls_a = samples[
        ("dict_rate_limit_polls_total", frozenset({("participant", "bank-a"), ("result", "success")}))
    ]
    await running.until(lambda: _successes(running, "bank-a", polls_a + 1))  # bank-a keeps polling
    status, body = await running.status("/health/ready")
    assert status == 200, body
    assert body["checks"]["bridge:bank-a"] == "ok"
    assert body["checks"]["bridge:bank-b"].startswith("no successful poll for 2 intervals (data withdrawn)")
    status, policies = await running.status("/api/v1/policies")
    assert status == 200
    assert policies["participants"]["bank-a"]["stale"] is False
    assert policies["participants"]["bank-b"]["stale"] is True
    assert policies["participants"]["bank-b"]["bridge_up"] is False
    failed = [r for r in caplog.records if r.msg == "poll of the Bridge failed: %s"]
    assert failed
    assert {r.ctx["participant"] for r in failed} == {"bank-b"}  # type: ignore[attr-defined]


def test_the_same_failure_of_two_participants_is_logged_for_each() -> None:
    # RepeatFilter lets one line per template through per 10 s: per participant, or bank-a's outage
    # would hide bank-b's (their polls are aligned, so their failures come within milliseconds).
    context, repeat = logsetup.ContextFilter(), logsetup.RepeatFilter(clock=lambda: 0.0)
    passed = []
    for name in ("bank-a", "bank-b", "bank-a"):
        token = logsetup.log_context.set({"participant": name})
        try:
            record = logging.LogRecord("p", logging.ERROR, __file__, 1, "poll failed: %s", ("x",), None)
            passed.append(context.filter(record) and repeat.filter(record) and record.ctx["participant"])
        finally:
            logsetup.log_context.reset(token)
    assert passed == ["bank-a", "bank-b", False]


async def _successes(running: Running, participant: str, at_least: float) -> bool:
    labels = frozenset({("participant", participant), ("result", "success")})
    return (await running.samples()).get(("dict_rate_limit_polls_total", labels), 0) >= at_least


async def test_every_bridge_down_is_unready(
    sims: tuple[SimulatorServer, SimulatorServer], start: Any, tmp_path: Path
) -> None:
    a, b = sims
    running = await start(load(tmp_path, two_participants(a.address, b.address)))
    await running.until(lambda: _both_polled(running))
    await a.stop()
    await b.stop()

    async def unready() -> bool:
        return (await running.status("/health/ready"))[0] == 503

    await running.until(unready, within=10.0)


async def test_policies_api_reports_each_participant(
    sims: tuple[SimulatorServer, SimulatorServer], start: Any, tmp_path: Path
) -> None:
    a, b = sims
    running = await start(load(tmp_path, two_participants(a.address, b.address)))
    await running.until(lambda: _both_polled(running))
    status, payload = await running.status("/api/v1/policies")
    assert status == 200
    assert set(payload) == {"participants"}
    assert set(payload["participants"]) == {"bank-a", "bank-b"}
    assert payload["participants"]["bank-a"]["category"] == "A"
    assert payload["participants"]["bank-b"]["category"] == "C"
    warning_b = {p["warning_remaining_ratio"] for p in payload["participants"]["bank-b"]["policies"]}
    assert warning_b == {0.5}
    status, started = await running.status("/health/startup")
    assert (status, started["checks"]) == (200, {"first_poll:bank-a": "done", "first_poll:bank-b": "done"})


async def test_history_rows_carry_the_participant(
    sims: tuple[SimulatorServer, SimulatorServer], start: Any, tmp_path: Path, database_url: str
) -> None:
    from exporter.history import migrations

    await asyncio.to_thread(migrations.apply, database_url)
    a, b = sims
    running = await start(load(tmp_path, two_participants(a.address, b.address, database_url=database_url)))
    await running.until(lambda: _both_polled(running))
    per_policy = len(a.engine.policy_names())

    def count() -> dict[str, int]:
        with psycopg.connect(database_url) as conn:
            rows = conn.execute(
                "SELECT participant, count(*) FROM dict_rate_limit_states GROUP BY 1"
            ).fetchall()
        return {str(name): int(n) for name, n in rows}

    async def written() -> bool:
        counted = await asyncio.to_thread(count)
        return counted.get("bank-a", 0) >= per_policy and counted.get("bank-b", 0) >= per_policy

    await running.until(written)
    assert "" not in await asyncio.to_thread(count)
    with psycopg.connect(database_url) as conn:
        latest = conn.execute(
            "SELECT participant, psp_category, warning_threshold_percent FROM v_dict_rate_limit_latest_states"
            " WHERE endpoint_id = %s ORDER BY participant",
            [SLOW],
        ).fetchall()
        leases = conn.execute("SELECT poller_group FROM dict_rate_limit_poller_lease ORDER BY 1").fetchall()
    assert latest == [("bank-a", "A", 20.0), ("bank-b", "C", 50.0)]  # latest per policy and participant
    assert leases == [("default/bank-a",), ("default/bank-b",)]  # one poller lease per participant

    async def ready() -> bool:
        status, body = await running.status("/health/ready")
        return status == 200 and body["checks"]["database"] == "ok"

    await running.until(ready)  # a lease renewal slowed by a loaded machine may flap it for a moment


async def test_single_participant_exports_no_participant_label(
    sims: tuple[SimulatorServer, SimulatorServer], start: Any
) -> None:
    a, _ = sims
    running = await start(settings_for(a.address))
    await running.until(lambda: _successes_single(running))
    text = await running.text()
    assert "participant=" not in text
    status, payload = await running.status("/api/v1/policies")
    assert status == 200
    assert "participants" not in payload
    assert payload["category"] == "A"
    status, body = await running.status("/health/ready")
    assert (status, body["checks"]) == (200, {"bridge": "ok"})


async def _successes_single(running: Running) -> bool:
    return (await running.value("dict_rate_limit_polls_total", result="success") or 0) >= 2


async def test_two_replicas_elect_one_poller_per_participant_and_both_serve_both(
    sims: tuple[SimulatorServer, SimulatorServer], start: Any, tmp_path: Path, database_url: str
) -> None:
    from exporter.history import migrations

    await asyncio.to_thread(migrations.apply, database_url)
    a, b = sims
    replicas = []
    for index in range(2):  # the same participants, each replica its own ports
        directory = tmp_path / f"replica-{index}"
        directory.mkdir()
        document = two_participants(a.address, b.address, database_url=database_url, poller_lease_seconds=2.0)
        replicas.append(await start(load(directory, document)))
    for running in replicas:
        await running.until(lambda running=running: _both_polled_or_adopted(running), within=15.0)
    for index in range(2):  # exactly one leader per participant, whichever replica it is
        leaders = [running.service.participants[index].lease.is_leader for running in replicas]
        assert leaders.count(True) == 1, leaders
    calls = a.list_calls, b.list_calls
    await asyncio.sleep(3.0)  # three intervals: one poller each, never one per replica
    assert a.list_calls - calls[0] <= 4
    assert b.list_calls - calls[1] <= 4
    for running in replicas:
        samples = await running.samples()
        assert _participants_of(samples, "dict_rate_limit_available_tokens") == {"bank-a", "bank-b"}


async def _both_polled_or_adopted(running: Running) -> bool:
    samples = await running.samples()
    return _participants_of(samples, "dict_rate_limit_available_tokens") == {"bank-a", "bank-b"}


async def test_a_restart_remembers_each_participants_policies_apart(
    sims: tuple[SimulatorServer, SimulatorServer], start: Any, tmp_path: Path, database_url: str
) -> None:
    from exporter.history import migrations

    await asyncio.to_thread(migrations.apply, database_url)
    a, b = sims
    b.engine.add_policy("EVENT_LIST", 50, 1, 60, available=10)  # only bank-b ever had it
    document = two_participants(a.address, b.address, database_url=database_url)
    first = await start(load(tmp_path, document))
    await first.until(lambda: _both_polled(first))
    await first.until(lambda: _rows_at_least(first, 2 * (len(a.engine.policy_names()) + 1)))
    await first.service.stop()
    b.engine.remove_policy("EVENT_LIST")
    b.engine.remove_policy("KEYS_CHECK")
    second = await start(
        load(tmp_path, {**document, "metrics_port": free_port(), "health_check_port": free_port()})
    )
    await second.until(lambda: _both_polled(second))
    samples = await second.samples()
    missing = {
        (labels["participant"], labels["endpoint_id"]): value
        for (name, frozen) in samples
        if name == "dict_rate_limit_policy_missing"
        for labels in [dict(frozen)]
        for value in [samples[(name, frozen)]]
    }
    assert missing[("bank-b", "KEYS_CHECK")] == 1.0
    assert missing[("bank-b", "EVENT_LIST")] == 1.0
    assert missing[("bank-a", "KEYS_CHECK")] == 0.0
    assert ("bank-a", "EVENT_LIST") not in missing  # bank-b's history is not bank-a's


async def _rows_at_least(running: Running, rows: int) -> bool:
    return (await running.value("dict_rate_limit_history_rows_written_total") or 0) >= rows


# --- one Bridge serving several participants (PI-RequestingParticipant), the usual direct-participant case

ONE_BRIDGE_TWO_ISPBS = """
participants:
  - ispb: "11111111"
    category: A
    traffic: {ENTRIES_READ_PARTICIPANT_ANTISCAN: {rate: 600, not_found: 0.5}}
  - ispb: "22222222"
    category: H
"""


async def test_one_bridge_serves_two_participants_apart_by_their_ispb(start: Any, tmp_path: Path) -> None:
    bridge = SimulatorServer(scenario=parse_scenario(ONE_BRIDGE_TWO_ISPBS, "two.yaml"), seed=3)
    await bridge.start()
    try:
        document = two_participants(bridge.address, bridge.address)
        document["participants"][0]["participant_ispb"] = "11111111"
        document["participants"][1]["participant_ispb"] = "22222222"
        running = await start(load(tmp_path, document))
        await running.until(lambda: _both_polled(running))
        capacity = "dict_rate_limit_capacity"
        antiscan = "ENTRIES_READ_PARTICIPANT_ANTISCAN"
        a = frozenset({("participant", "bank-a"), ("endpoint_id", antiscan), ("psp_category", "A")})
        h = frozenset({("participant", "bank-b"), ("endpoint_id", antiscan), ("psp_category", "H")})
        answers = "dict_rate_limit_dict_responses_total"
        a404 = frozenset({*a, ("code", "404")})
        h404 = frozenset({*h, ("code", "404")})

        async def lookups_counted() -> bool:
            return (await running.samples()).get((answers, a404), 0) > 0

        await running.until(lookups_counted)
        samples = await running.samples()
        # Each participant's own category and buckets, from the one address.
        assert samples[(capacity, a)] > samples[(capacity, h)]
        # Only bank-a has lookup traffic: none of its 404s is counted under bank-b.
        assert samples[(answers, a404)] > 0
        assert samples[(answers, h404)] == 0
        async with running.http.get(running.base + "/api/v1/policies") as response:
            body = await response.json()
        ispbs = {name: p["participant_ispb"] for name, p in body["participants"].items()}
        assert ispbs == {"bank-a": "11111111", "bank-b": "22222222"}
    finally:
        await bridge.stop()
