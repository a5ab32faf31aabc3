"""Scenario files: what a valid one means, and errors that name the file, the line and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from exporter.simulator import scenario as sc
from exporter.simulator.policy_table import ANTISCAN
from tests.support.env import ROOT


def _error(text: str) -> sc.ScenarioError:
    with pytest.raises(sc.ScenarioError) as caught:
        sc.parse_scenario(text, "bad.yaml")
    return caught.value


@pytest.mark.parametrize(
    ("text", "line", "key", "reason"),
    [
        ("name: x\nrepeat: -5\n", 2, "repeat", "must be > 0.0"),
        ("name: x\nspeed: 3\n", 2, "speed", "unknown key"),
        ("traffic:\n  ENTRIES_WRITE: {rate: fast}\n", 2, "traffic.ENTRIES_WRITE.rate", "must be a number"),
        ("traffic:\n  ENTRIES_WRTIE: {rate: 5}\n", 2, "traffic.ENTRIES_WRTIE", "unknown policy"),
        (
            "traffic:\n  ENTRIES_WRITE: {rate: 5, jitter: 2}\n",
            2,
            "traffic.ENTRIES_WRITE.jitter",
            "between 0 and 1",
        ),
        (
            "events:\n  - at: 5\n    burst: {policy: KEYS_CHECK}\n",
            3,
            "events[0].burst.requests",
            "is required",
        ),
        ("events:\n  - at: 5\n", 2, "events[0]", "exactly one action"),
        ("events:\n  - {at: 1, category: B}\n  - {at: 2, category: Z}\n", 3, "events[1].category", "A-H"),
        (
            "events:\n  - at: 10\n    drain: {policy: ENTRIES_WRITE, to_ratio: 0.1, by: 5}\n",
            3,
            "events[0].drain.by",
            "after",
        ),
        (
            "events:\n  - at: 1\n    drain: {policy: ENTRIES_WRITE, for: 5}\n",
            3,
            "events[0].drain",
            "rate or to_ratio",
        ),
        (
            "events:\n  - at: 1\n    error: {code: TEAPOT, count: 1}\n",
            3,
            "events[0].error.code",
            "gRPC status",
        ),
        ("events:\n  - at: 1\n    error: {code: OK, count: 1}\n", 3, "events[0].error.code", "other than OK"),
        (
            "events:\n  - at: 1\n    remove_policy: lower_case\n",
            3,
            "events[0].remove_policy",
            "UPPER_SNAKE_CASE",
        ),
        ("repeat: 10\nevents:\n  - {at: 30, category: B}\n", 1, "repeat", "after the last event"),
        ("events: {at: 1}\n", 1, "events", "must be a list"),
        (
            "events:\n  - at: 1\n    error: {code: INTERNAL, count: 1, for: 5}\n",
            3,
            "events[0].error",
            "exactly one",
        ),
        (
            "events:\n  - at: 1\n    latency: {seconds: 1, for: 5,\n      by: 9}\n",
            4,
            "events[0].latency.by",
            "not both",
        ),
        ("name: [unclosed\n", 2, "(yaml)", ""),
    ],
)
def test_errors_name_the_file_line_and_key(text: str, line: int, key: str, reason: str) -> None:
    error = _error(text)
    assert (error.source, error.line, error.key) == ("bad.yaml", line, key)
    assert reason in error.reason
    assert str(error).startswith(f"bad.yaml:{line}: {key}: ")
    assert "\n" not in str(error)


def test_a_duplicate_key_is_an_error() -> None:
    error = _error("events:\n  - at: 1\n    at: 2\n    category: B\n")
    assert (error.line, error.key, error.reason) == (3, "events[0].at", "duplicate key")


def test_a_policy_added_by_the_scenario_is_a_known_name() -> None:
    text = """
traffic:
  EVENT_LIST: {rate: 5}
events:
  - at: 30
    add_policy: {name: EVENT_LIST, capacity: 100, refill_tokens: 10, refill_period_sec: 60}
  - at: 60
    remove_policy: EVENT_LIST
"""
    scenario = sc.parse_scenario(text, "ok.yaml")
    assert scenario.traffic == (sc.Traffic("EVENT_LIST", 5.0),)
    assert [type(e.action) for e in scenario.events] == [sc.AddPolicy, sc.RemovePolicy]


def test_every_action_parses_into_its_dataclass_with_absolute_end_times() -> None:
    text = """
name: everything
repeat: 600
events:
  - {at: 70, storm_404: {rate: 3000, for: 60}}
  - {at: 10, drain: {policy: ENTRIES_WRITE, to_ratio: 0.05, by: 70}}
  - {at: 20, drain: {policy: CLAIMS_READ, rate: 5000, for: 30}}
  - {at: 80, latency: {seconds: 1.5, for: 20}}
  - {at: 90, error: {code: UNAVAILABLE, count: 3}}
  - {at: 95, error: {code: DEADLINE_EXCEEDED, for: 10}}
  - {at: 100, traffic: {policy: ENTRIES_WRITE, rate: 0}}
  - {at: 100, burst: {policy: KEYS_CHECK, requests: 80, cost: 3}}
"""
    scenario = sc.parse_scenario(text, "all.yaml")
    assert scenario.name == "everything"
    assert scenario.repeat == 600.0
    assert [e.at for e in scenario.events] == [10, 20, 70, 80, 90, 95, 100, 100]  # sorted, stable
    assert [e.action for e in scenario.events] == [
        sc.Drain("ENTRIES_WRITE", until=70.0, to_ratio=0.05),
        sc.Drain("CLAIMS_READ", until=50.0, rate=5000.0),
        sc.Storm404(ANTISCAN, 3000.0, until=130.0),
        sc.Latency(1.5, until=100.0),
        sc.InjectError("UNAVAILABLE", count=3),
        sc.InjectError("DEADLINE_EXCEEDED", until=105.0),
        sc.Traffic("ENTRIES_WRITE", 0.0),
        sc.Burst("KEYS_CHECK", 80, 3),
    ]


@pytest.mark.parametrize("name", sc.BUILTIN)
def test_built_in_scenarios_are_valid_and_packaged(name: str) -> None:
    scenario = sc.builtin_scenario(name)
    assert scenario.name == name
    assert sc.resolve_scenario(name) == scenario


def test_resolve_defaults_to_the_built_in_default_and_reads_files(tmp_path: Path) -> None:
    assert sc.resolve_scenario(None).name == "default"
    assert sc.resolve_scenario("").name == "default"
    path = tmp_path / "mine.yaml"
    path.write_text("traffic: {KEYS_CHECK: {rate: 3}}\n")
    assert sc.resolve_scenario(str(path)) == sc.Scenario("mine", traffic=(sc.Traffic("KEYS_CHECK", 3.0),))
    with pytest.raises(sc.ScenarioError) as caught:
        sc.resolve_scenario(str(tmp_path / "missing.yaml"))
    assert "cannot be read" in str(caught.value)


def test_an_unknown_scenario_name_lists_the_built_in_ones() -> None:
    with pytest.raises(sc.ScenarioError) as caught:
        sc.resolve_scenario("404-storm")  # the built-in is 404_storm
    assert "cannot be read" in str(caught.value)
    assert "no built-in scenario has this name" in str(caught.value)
    assert all(name in str(caught.value) for name in sc.BUILTIN)


def test_refill_and_fault_parse_and_are_checked() -> None:
    scenario = sc.parse_scenario(
        "refill: period\nevents:\n  - at: 5\n    fault: {kind: nan_404, for: 10}\n"
        "  - at: 1\n    fault: {kind: empty, count: 2}\n",
        "t.yaml",
    )
    assert scenario.refill == "period"
    assert [e.action for e in scenario.events] == [
        sc.Fault("empty", count=2),
        sc.Fault("nan_404", until=15.0),
    ]
    with pytest.raises(sc.ScenarioError) as caught:
        sc.parse_scenario("refill: steps\n", "t.yaml")
    assert str(caught.value) == "t.yaml:1: refill: must be continuous or period (got 'steps')"
    with pytest.raises(sc.ScenarioError) as caught:
        sc.parse_scenario("events:\n  - at: 1\n    fault: {kind: loud, count: 1}\n", "t.yaml")
    assert "events[0].fault.kind: must be one of" in str(caught.value)


def test_the_example_in_docs_simulator_md_is_valid() -> None:
    text = (ROOT / "docs" / "simulator.md").read_text(encoding="utf-8")
    example = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    scenario = sc.parse_scenario(example, "docs/simulator.md")
    assert scenario.name == "incident-42"
    assert {type(e.action).__name__ for e in scenario.events} == {
        "Drain", "Burst", "Storm404", "CategoryChange", "AddPolicy", "RemovePolicy", "Traffic", "Latency",
        "InjectError", "Fault", "BridgeRestart",
    }  # fmt: skip
    assert scenario.refill == "period"
