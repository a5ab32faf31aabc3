"""Simulator scenarios: the YAML format, its strict validation (file, line and key named), built-ins."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

import grpc
import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from exporter.simulator.policy_table import ANTISCAN, CATEGORY_LIMITS, POLICY_NAMES

BUILTIN = (
    "default",
    "quiet",
    "drain-entries-write",
    "category-change",
    "step-refill",
    "empty-policies-list",
    "invalid-answers",
    "policy-disappears",
    "404_storm",
    "429_on_one_policy",
)
#: What a ``fault`` event makes the list answers look like (a broken Bridge or DICT, as seen by the exporter).
FAULT_KINDS = frozenset(
    {
        "empty",  # no policy at all
        "zero_capacity",  # every policy with capacity 0
        "bad_category",  # category "?" (policies intact)
        "future_time",  # ResponseTime 9999-12-31
        "nan_404",  # error_404_rate NaN on every policy
        "nul_name",  # the first policy's name carries a NUL
        "bad_counts",  # every policy's response_counts list 404 twice
    }
)
_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
ERROR_CODES = frozenset(code.name for code in grpc.StatusCode if code is not grpc.StatusCode.OK)


class ScenarioError(Exception):
    """A scenario file is invalid; ``str()`` is one line: ``file:line: key: reason``."""

    def __init__(self, source: str, line: int, key: str, reason: str) -> None:
        super().__init__(f"{source}:{line}: {key}: {reason}")
        self.source, self.line, self.key, self.reason = source, line, key, reason


@dataclass(frozen=True, slots=True)
class Traffic:
    """Steady requests on one policy: ``rate`` per minute, ±``jitter`` share, ``not_found`` share of 404s."""

    policy: str
    rate: float
    jitter: float = 0.0
    not_found: float = 0.0


@dataclass(frozen=True, slots=True)
class Burst:
    policy: str
    requests: int
    cost: int = 1


@dataclass(frozen=True, slots=True)
class Drain:
    """Extra load until ``until``: ``rate``/min, or the rate that takes the bucket to ``to_ratio`` by then."""

    policy: str
    until: float
    rate: float | None = None
    to_ratio: float | None = None


@dataclass(frozen=True, slots=True)
class Storm404:
    """Lookups answered 404 at ``rate``/min until ``until``, each costing 3 antiscan tokens."""

    policy: str
    rate: float
    until: float


@dataclass(frozen=True, slots=True)
class CategoryChange:
    category: str


@dataclass(frozen=True, slots=True)
class AddPolicy:
    name: str
    capacity: int
    refill_tokens: int
    refill_period_sec: int
    available: int | None = None


@dataclass(frozen=True, slots=True)
class RemovePolicy:
    name: str


@dataclass(frozen=True, slots=True)
class Latency:
    """Delay every Bridge answer by ``seconds`` (until ``until``, or for good when None)."""

    seconds: float
    until: float | None = None


@dataclass(frozen=True, slots=True)
class InjectError:
    """Answer Bridge calls with ``code``: the next ``count`` calls, or every call until ``until``."""

    code: str
    count: int | None = None
    until: float | None = None


@dataclass(frozen=True, slots=True)
class Fault:
    """Answer list calls with a broken answer of ``kind``: the next ``count`` answers, or until ``until``."""

    kind: str
    count: int | None = None
    until: float | None = None


@dataclass(frozen=True, slots=True)
class BridgeRestart:
    """The simulated Bridge restarts: its answer counts go back to 0 (DICT's buckets are not touched)."""


Action = (
    Traffic
    | Burst
    | Drain
    | Storm404
    | CategoryChange
    | AddPolicy
    | RemovePolicy
    | Latency
    | InjectError
    | Fault
    | BridgeRestart
)


@dataclass(frozen=True, slots=True)
class ScenarioEvent:
    at: float
    action: Action


@dataclass(frozen=True, slots=True)
class Participant:
    """One participant the simulator serves: its ISPB, its category, and its own traffic and events."""

    ispb: str
    #: None: the simulator's --category.
    category: str | None = None
    #: None: the scenario's top-level traffic; events likewise.
    traffic: tuple[Traffic, ...] | None = None
    events: tuple[ScenarioEvent, ...] | None = None


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    traffic: tuple[Traffic, ...] = ()
    events: tuple[ScenarioEvent, ...] = ()
    #: Seconds after which the scenario starts again (traffic reset, events replayed); None: play once.
    repeat: float | None = None
    #: "continuous" or "period" to fix the refill mode whatever --refill says; None: --refill decides.
    refill: str | None = None
    #: The participants served, selected by the request's ISPB; the first answers an empty ISPB. Empty:
    #: one participant that answers for whichever ISPB it is asked about.
    participants: tuple[Participant, ...] = ()

    def for_participant(self, participant: Participant) -> Scenario:
        """The single-participant scenario one participant plays (its traffic and events, else these)."""
        return Scenario(
            name=f"{self.name}[{participant.ispb}]",
            traffic=self.traffic if participant.traffic is None else participant.traffic,
            events=self.events if participant.events is None else participant.events,
            repeat=self.repeat,
            refill=self.refill,
        )


class _Reader:
    """Typed access to a composed YAML tree; every failure names the file, the node's line and the key."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._constructor = SafeConstructor()
        self.added: set[str] = set()

    def fail(self, node: Node, key: str, reason: str) -> NoReturn:
        raise ScenarioError(self.source, node.start_mark.line + 1, key, reason)

    def mapping(self, node: Node, key: str, allowed: set[str], required: set[str]) -> dict[str, Node]:
        if not isinstance(node, MappingNode):
            self.fail(node, key, "must be a mapping")
        items: dict[str, Node] = {}
        for key_node, value_node in node.value:
            name = str(key_node.value)
            path = f"{key}.{name}" if key else name
            if name not in allowed:
                self.fail(key_node, path, f"unknown key (expected one of {', '.join(sorted(allowed))})")
            if name in items:
                self.fail(key_node, path, "duplicate key")
            items[name] = value_node
        for name in sorted(required - items.keys()):
            self.fail(node, f"{key}.{name}" if key else name, "is required")
        return items

    def scalar(self, node: Node, key: str) -> Any:
        if not isinstance(node, ScalarNode):
            self.fail(node, key, "must be a single value")
        return self._constructor.construct_object(node)

    def number(
        self, node: Node, key: str, minimum: float, *, above: bool = False, integer: bool = False
    ) -> Any:
        value = self.scalar(node, key)
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            self.fail(node, key, f"must be {'an integer' if integer else 'a number'} (got {value!r})")
        if value < minimum or (above and value == minimum):
            self.fail(node, key, f"must be {'>' if above else '>='} {minimum} (got {value!r})")
        return value

    def ratio(self, node: Node, key: str) -> float:
        value = float(self.number(node, key, 0.0))
        if value > 1:
            self.fail(node, key, f"must be between 0 and 1 (got {value!r})")
        return value

    def name(self, node: Node, key: str, *, known: bool = True) -> str:
        value = self.scalar(node, key)
        if not isinstance(value, str) or not _NAME.match(value):
            self.fail(node, key, f"must be a policy name in UPPER_SNAKE_CASE (got {value!r})")
        if known and value not in POLICY_NAMES and value not in self.added:
            self.fail(node, key, f"unknown policy {value!r} (not in the DICT table nor added by add_policy)")
        return value

    def until(self, items: dict[str, Node], key: str, at: float) -> float:
        """End time from ``for`` (a duration) or ``by`` (a scenario time after ``at``)."""
        if "for" in items and "by" in items:
            self.fail(items["by"], f"{key}.by", "give a duration (for) or an end time (by), not both")
        if "for" in items:
            return at + float(self.number(items["for"], f"{key}.for", 0.0, above=True))
        by = float(self.number(items["by"], f"{key}.by", 0.0))
        if by <= at:
            self.fail(items["by"], f"{key}.by", f"must be after the event's time {at:g}")
        return by


def _traffic(r: _Reader, policy: str, node: Node, key: str) -> Traffic:
    return _traffic_fields(r, policy, r.mapping(node, key, {"rate", "jitter", "not_found"}, {"rate"}), key)


def _traffic_fields(r: _Reader, policy: str, items: dict[str, Node], key: str) -> Traffic:
    return Traffic(
        policy=policy,
        rate=float(r.number(items["rate"], f"{key}.rate", 0.0)),
        jitter=r.ratio(items["jitter"], f"{key}.jitter") if "jitter" in items else 0.0,
        not_found=r.ratio(items["not_found"], f"{key}.not_found") if "not_found" in items else 0.0,
    )


def _one_of(r: _Reader, node: Node, items: dict[str, Node], key: str, *names: str) -> None:
    present = [name for name in names if name in items]
    if len(present) != 1:
        r.fail(node, key, f"needs exactly one of {' or '.join(names)}")


def _parse_traffic(r: _Reader, node: Node, key: str, at: float) -> Action:
    items = r.mapping(node, key, {"policy", "rate", "jitter", "not_found"}, {"policy", "rate"})
    return _traffic_fields(r, r.name(items["policy"], f"{key}.policy"), items, key)


def _parse_burst(r: _Reader, node: Node, key: str, at: float) -> Action:
    items = r.mapping(node, key, {"policy", "requests", "cost"}, {"policy", "requests"})
    cost = int(r.number(items["cost"], f"{key}.cost", 1, integer=True)) if "cost" in items else 1
    requests = int(r.number(items["requests"], f"{key}.requests", 1, integer=True))
    return Burst(r.name(items["policy"], f"{key}.policy"), requests, cost)


def _parse_drain(r: _Reader, node: Node, key: str, at: float) -> Action:
    items = r.mapping(node, key, {"policy", "rate", "to_ratio", "for", "by"}, {"policy"})
    _one_of(r, node, items, key, "rate", "to_ratio")
    _one_of(r, node, items, key, "for", "by")
    return Drain(
        policy=r.name(items["policy"], f"{key}.policy"),
        until=r.until(items, key, at),
        rate=float(r.number(items["rate"], f"{key}.rate", 0.0, above=True)) if "rate" in items else None,
        to_ratio=r.ratio(items["to_ratio"], f"{key}.to_ratio") if "to_ratio" in items else None,
    )


def _parse_storm_404(r: _Reader, node: Node, key: str, at: float) -> Action:
    items = r.mapping(node, key, {"policy", "rate", "for", "by"}, {"rate"})
    _one_of(r, node, items, key, "for", "by")
    policy = r.name(items["policy"], f"{key}.policy") if "policy" in items else ANTISCAN
    rate = float(r.number(items["rate"], f"{key}.rate", 0.0, above=True))
    return Storm404(policy, rate, r.until(items, key, at))


def _parse_category(r: _Reader, node: Node, key: str, at: float) -> Action:
    letter = r.scalar(node, key)
    if not isinstance(letter, str) or letter not in CATEGORY_LIMITS:
        r.fail(node, key, f"must be one DICT category letter A-H (got {letter!r})")
    return CategoryChange(letter)


def _parse_add_policy(r: _Reader, node: Node, key: str, at: float) -> Action:
    allowed = {"name", "capacity", "refill_tokens", "refill_period_sec", "available"}
    items = r.mapping(node, key, allowed, allowed - {"available"})
    name = r.name(items["name"], f"{key}.name", known=False)
    r.added.add(name)

    def integer(field: str, minimum: float) -> int:
        return int(r.number(items[field], f"{key}.{field}", minimum, integer=True))

    return AddPolicy(
        name=name,
        capacity=integer("capacity", 1),
        refill_tokens=integer("refill_tokens", 0),
        refill_period_sec=integer("refill_period_sec", 1),
        available=integer("available", -(10**12)) if "available" in items else None,
    )


def _parse_remove_policy(r: _Reader, node: Node, key: str, at: float) -> Action:
    return RemovePolicy(r.name(node, key))


def _parse_latency(r: _Reader, node: Node, key: str, at: float) -> Action:
    items = r.mapping(node, key, {"seconds", "for", "by"}, {"seconds"})
    seconds = float(r.number(items["seconds"], f"{key}.seconds", 0.0))
    return Latency(seconds, r.until(items, key, at) if {"for", "by"} & items.keys() else None)


def _parse_error(r: _Reader, node: Node, key: str, at: float) -> Action:
    items = r.mapping(node, key, {"code", "count", "for", "by"}, {"code"})
    code = r.scalar(items["code"], f"{key}.code")
    if code not in ERROR_CODES:
        r.fail(items["code"], f"{key}.code", f"must be a gRPC status name other than OK (got {code!r})")
    _one_of(r, node, items, key, "count", "for", "by")
    if "count" in items:
        return InjectError(code, count=int(r.number(items["count"], f"{key}.count", 1, integer=True)))
    return InjectError(code, until=r.until(items, key, at))


def _parse_fault(r: _Reader, node: Node, key: str, at: float) -> Action:
    items = r.mapping(node, key, {"kind", "count", "for", "by"}, {"kind"})
    kind = r.scalar(items["kind"], f"{key}.kind")
    if kind not in FAULT_KINDS:
        kinds = ", ".join(sorted(FAULT_KINDS))
        r.fail(items["kind"], f"{key}.kind", f"must be one of {kinds} (got {kind!r})")
    _one_of(r, node, items, key, "count", "for", "by")
    if "count" in items:
        return Fault(kind, count=int(r.number(items["count"], f"{key}.count", 1, integer=True)))
    return Fault(kind, until=r.until(items, key, at))


def _parse_bridge_restart(r: _Reader, node: Node, key: str, at: float) -> Action:
    r.mapping(node, key, set(), set())  # `bridge_restart: {}`: nothing to say but when
    return BridgeRestart()


#: Event kind (its YAML key) -> parser of its body.
_PARSERS: dict[str, Callable[[_Reader, Node, str, float], Action]] = {
    "traffic": _parse_traffic,
    "burst": _parse_burst,
    "drain": _parse_drain,
    "storm_404": _parse_storm_404,
    "category": _parse_category,
    "add_policy": _parse_add_policy,
    "remove_policy": _parse_remove_policy,
    "latency": _parse_latency,
    "error": _parse_error,
    "fault": _parse_fault,
    "bridge_restart": _parse_bridge_restart,
}
ACTIONS = tuple(_PARSERS)


def _events(r: _Reader, node: Node, prefix: str = "") -> list[ScenarioEvent]:
    if not isinstance(node, SequenceNode):
        r.fail(node, f"{prefix}events", "must be a list of events")
    events = []
    for index, event_node in enumerate(node.value):
        key = f"{prefix}events[{index}]"
        items = r.mapping(event_node, key, {"at", *ACTIONS}, {"at"})
        at = float(r.number(items.pop("at"), f"{key}.at", 0.0))
        if len(items) != 1:
            r.fail(event_node, key, f"needs exactly one action ({', '.join(ACTIONS)})")
        ((kind, action_node),) = items.items()
        events.append(ScenarioEvent(at, _PARSERS[kind](r, action_node, f"{key}.{kind}", at)))
    return sorted(events, key=lambda e: e.at)


_ISPB = re.compile(r"^[0-9]{8}$")


def _participants(r: _Reader, node: Node) -> list[Participant]:
    if not isinstance(node, SequenceNode) or not node.value:
        r.fail(node, "participants", "must be a non-empty list of {ispb, category, traffic, events}")
    found: list[Participant] = []
    for index, item in enumerate(node.value):
        key = f"participants[{index}]"
        items = r.mapping(item, key, {"ispb", "category", "traffic", "events"}, {"ispb"})
        ispb = r.scalar(items["ispb"], f"{key}.ispb")
        if not isinstance(ispb, str) or not _ISPB.match(ispb):
            r.fail(items["ispb"], f"{key}.ispb", f"must be a quoted string of 8 digits (got {ispb!r})")
        if any(p.ispb == ispb for p in found):
            r.fail(items["ispb"], f"{key}.ispb", f"{ispb} is listed twice")
        category = None
        if "category" in items:
            category = _parse_category(r, items["category"], f"{key}.category", 0.0)
        events = _events(r, items["events"], f"{key}.") if "events" in items else None
        traffic = _traffic_table(r, items["traffic"], f"{key}.") if "traffic" in items else None
        found.append(
            Participant(
                ispb=ispb,
                category=category.category if isinstance(category, CategoryChange) else None,
                traffic=None if traffic is None else tuple(traffic),
                events=None if events is None else tuple(events),
            )
        )
    return found


def parse_scenario(text: str, source: str) -> Scenario:
    """Parses and validates scenario YAML; ``source`` names the file in errors."""
    r = _Reader(source)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        raise ScenarioError(source, line, "(yaml)", str(getattr(exc, "problem", exc))) from None
    if root is None:
        raise ScenarioError(source, 1, "(file)", "is empty")
    allowed = {"name", "description", "repeat", "refill", "traffic", "events", "participants"}
    items = r.mapping(root, "", allowed, set())
    # Events first: add_policy there makes a new name valid in traffic too.
    events = _events(r, items["events"]) if "events" in items else []
    participants = _participants(r, items["participants"]) if "participants" in items else []
    traffic = _traffic_table(r, items["traffic"]) if "traffic" in items else []
    repeat = float(r.number(items["repeat"], "repeat", 0.0, above=True)) if "repeat" in items else None
    last = max((e.at for p in participants for e in p.events or ()), default=None)
    last = max(last if last is not None else -1.0, events[-1].at if events else -1.0)
    if repeat is not None and last >= repeat:
        r.fail(items["repeat"], "repeat", f"must be after the last event ({last:g} s)")
    name = str(r.scalar(items["name"], "name")) if "name" in items else Path(source).stem
    refill = None
    if "refill" in items:
        refill = r.scalar(items["refill"], "refill")
        if refill not in ("continuous", "period"):
            r.fail(items["refill"], "refill", f"must be continuous or period (got {refill!r})")
    return Scenario(
        name=name,
        traffic=tuple(traffic),
        events=tuple(events),
        repeat=repeat,
        refill=refill,
        participants=tuple(participants),
    )


def _traffic_table(r: _Reader, node: Node, prefix: str = "") -> list[Traffic]:
    if not isinstance(node, MappingNode):
        r.fail(node, f"{prefix}traffic", "must be a mapping of policy name to {rate, jitter, not_found}")
    seen: set[str] = set()
    table = []
    for key_node, value_node in node.value:
        policy = r.name(key_node, f"{prefix}traffic.{key_node.value}")
        if policy in seen:
            r.fail(key_node, f"{prefix}traffic.{policy}", "duplicate key")
        seen.add(policy)
        table.append(_traffic(r, policy, value_node, f"{prefix}traffic.{policy}"))
    return table


def load_scenario(path: str | Path) -> Scenario:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(str(path), 0, "(file)", f"cannot be read: {exc.strerror}") from None
    return parse_scenario(text, str(path))


def builtin_scenario(name: str) -> Scenario:
    """One of the scenarios shipped in ``exporter/simulator/scenarios/`` (BUILTIN)."""
    resource = resources.files("exporter.simulator").joinpath("scenarios", f"{name}.yaml")
    return parse_scenario(resource.read_text(encoding="utf-8"), f"{name}.yaml (built-in)")


def resolve_scenario(spec: str | None) -> Scenario:
    """A file path, or a built-in name; None or empty means the built-in ``default``."""
    if not spec:
        return builtin_scenario("default")
    if Path(spec).exists() or spec not in BUILTIN:
        try:
            return load_scenario(spec)
        except ScenarioError as exc:
            if Path(spec).exists():
                raise
            # A mistyped built-in name reads as a missing file: say which names exist.
            names = ", ".join(BUILTIN)
            reason = f"{exc.reason}, and no built-in scenario has this name ({names})"
            raise ScenarioError(spec, 0, "(file)", reason) from None
    return builtin_scenario(spec)
