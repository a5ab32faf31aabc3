"""Renders the rules bundle: rule files for a given setup, the PrometheusRule manifest, the fast variant.

The source is the templates in ``exporter/rules/templates/``: mixin-style placeholders for how the
exporter's, the receiver's and Alertmanager's series are selected and which labels identify one
deployment. ``render_rules`` fills them (``dict-rate-limit rules render``); ``rules/`` is the default
rendering (a test fails when it drifts). ``render_prometheusrule`` wraps the rendered groups in one
PrometheusRule object for the Prometheus Operator (committed as deploy/kubernetes/base/prometheusrule.yaml and
checked for drift by the tests); ``render_fast_rules`` writes copies whose ``for:`` durations are
shortened, so a demo or an end-to-end test sees alerts fire in seconds with the same expressions,
labels and annotations.

    python -m exporter.rules.render            # rewrite deploy/kubernetes/base/prometheusrule.yaml
    python -m exporter.rules.render --check    # exit 1 when the committed manifest is out of date
    python -m exporter.rules.render --fast DIR --for-scale 0.02
    python -m exporter.rules.render --defaults  # rewrite rules/ from the templates (default selectors)
    python -m exporter.rules.render --overlays  # rewrite each Kubernetes overlay's prometheusrule.yaml
    python -m exporter.rules.render --overlays --check
    dict-rate-limit rules render --exporter-selector 'job="x"' --receiver-selector 'job="y"' --output DIR
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES_DIR = ROOT / "rules"
MANIFEST = ROOT / "deploy" / "kubernetes" / "base" / "prometheusrule.yaml"
OVERLAYS_DIR = ROOT / "deploy" / "kubernetes" / "overlays"
#: The overlay's own PrometheusRule: a patch replacing the base's (same kind and name; kustomize merges a
#: custom resource as a JSON merge patch, so ``spec.groups`` is replaced whole).
OVERLAY_MANIFEST = "prometheusrule.yaml"
#: Prometheus job names: the ServiceMonitors' job label defaults to the Service name (base/service.yaml).
EXPORTER_JOB = "dict-rate-limit-exporter"
RECEIVER_JOB = "dict-rate-limit-receiver"
RULE_FILE_GLOB = "*.rules.yml"
TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
#: Labels that identify one deployment (one participant's exporter and receiver) by default: alerts are
#: per deployment, inhibitions compare them, descriptions query with them.
DEFAULT_DEPLOYMENT_LABELS = ("cluster", "namespace", "participant", "job")

#: Key lookups (getEntry) are relayed under the participant's antiscan policy (dict-domain §3); the
#: per-end-user ENTRIES_READ_USER_ANTISCAN* buckets are charged by the same lookups, so adding them would
#: count each lookup twice.
DEFAULT_LOOKUP_POLICIES = ("ENTRIES_READ_PARTICIPANT_ANTISCAN",)
#: The 404 share of key lookups the DICT manual (§13.2) calls suspicious for a participant; BCB may change
#: it, and it could not be checked in a public copy of the manual.
DEFAULT_LOOKUP_404_SHARE_MAX = 0.07
#: Fewer lookups answered in 24 hours than this say nothing about a share (1 out of 1 is not 100 % scanning);
#: the manual's own per-user rule starts at 100 lookups.
DEFAULT_LOOKUP_MIN_ANSWERS = 100

_VERSION_LINE = re.compile(r"^# bundle-version: (\d+\.\d+\.\d+)$", re.MULTILINE)
_DURATION_PART = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
#: A label matcher; its value in any of PromQL's three string forms: "double", 'single' or `raw`.
_MATCHER = re.compile(
    r"\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"
    r'(?:"((?:[^"\\]|\\.)*)"|\'((?:[^\'\\]|\\.)*)\'|`([^`]*)`)\s*'
)
_SINGLE_QUOTED_PART = re.compile(r'\\(.)|"', re.S)
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_POLICY_NAME = re.compile(r"[A-Za-z0-9_]+")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


class RulesBundleError(ValueError):
    """The rule files disagree (versions) or an argument is not a usable duration or scale."""


def rule_files(src_dir: Path) -> list[Path]:
    """The bundle's rule files, in a stable order."""
    files = sorted(Path(src_dir).glob(RULE_FILE_GLOB))
    if not files:
        raise RulesBundleError(f"no {RULE_FILE_GLOB} file in {src_dir}")
    return files


def bundle_version(src_dir: Path) -> str:
    """The semantic version every rule file declares in its ``# bundle-version:`` header line."""
    versions: dict[str, str] = {}
    for path in rule_files(src_dir):
        match = _VERSION_LINE.search(path.read_text(encoding="utf-8"))
        if match is None:
            raise RulesBundleError(f"{path.name} has no '# bundle-version: X.Y.Z' header line")
        versions[path.name] = match.group(1)
    if len(set(versions.values())) != 1:
        raise RulesBundleError(f"rule files declare different bundle versions: {versions}")
    return next(iter(versions.values()))


def parse_duration(text: str) -> float:
    """Seconds of a Prometheus duration such as ``5m``, ``1h30m`` or ``0s``."""
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise RulesBundleError(f"not a Prometheus duration: {text!r}")
    return sum(int(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def format_duration(seconds: float) -> str:
    """A Prometheus duration in whole seconds (rounded up, so a non-zero ``for:`` never becomes 0s)."""
    whole = math.ceil(seconds)
    if whole <= 0:
        return "0s"
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "") + (f"{secs}s" if secs else "")


def load_groups(src_dir: Path) -> list[dict[str, Any]]:
    """Every rule group of the bundle, file by file, in order."""
    groups: list[dict[str, Any]] = []
    for path in rule_files(src_dir):
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
        groups.extend(document["groups"])
    return groups


@dataclass(frozen=True, slots=True)
class Selectors:
    """How one installation's series are selected and which labels identify one deployment.

    Selectors are PromQL matcher lists without braces (``job="dict-rate-limit",namespace=~"pix-.*"``); empty
    selects every series of the metric, which is enough because every metric name is the product's own.
    """

    exporter: str = ""
    receiver: str = ""
    alertmanager: str = ""
    deployment_labels: tuple[str, ...] = DEFAULT_DEPLOYMENT_LABELS


@dataclass(frozen=True, slots=True)
class Thresholds:
    """The figures of the DICT-answer alerts (the bucket thresholds come from the exporter's series).

    ``lookup_policies``: the policies whose answers are key lookups; ``lookup_404_share_max``: the share of
    them answered 404 over 24 hours above which DICTRateLimitLookupNotFoundShareHigh fires;
    ``lookup_min_answers``: lookups answered in 24 hours below which it never fires.
    """

    lookup_policies: tuple[str, ...] = DEFAULT_LOOKUP_POLICIES
    lookup_404_share_max: float = DEFAULT_LOOKUP_404_SHARE_MAX
    lookup_min_answers: int = DEFAULT_LOOKUP_MIN_ANSWERS


def parse_share(text: str, option: str) -> float:
    """A share strictly between 0 and 1 (``0.07``)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 1:
        raise RulesBundleError(f"{option}: a share between 0 and 1 is needed (0.07 for 7 %), got {text!r}")
    return value


def parse_count(text: str, option: str) -> int:
    """A whole number of at least 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise RulesBundleError(f"{option}: a whole number of at least 1 is needed, got {text!r}")
    return int(text)


def parse_policy_list(text: str, option: str) -> tuple[str, ...]:
    """DICT policy names from ``A,B``: at least one, each letters, digits and underscores."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise RulesBundleError(f"{option}: at least one policy is needed")
    for name in names:
        if not _POLICY_NAME.fullmatch(name):
            raise RulesBundleError(f"{option}: not a DICT policy name: {name!r}")
    return names


def parse_selector(text: str, option: str) -> str:
    """A normalised matcher list (``a="b",c=~"d"``) from ``{a="b", c=~"d"}`` or ``a="b"``.

    Errors name ``option`` (the command-line flag).
    """
    body = text.strip()
    if body.startswith("{") and body.endswith("}"):
        body = body[1:-1]
    matchers: list[str] = []
    position = 0
    while position < len(body.rstrip()):
        match = _MATCHER.match(body, position)
        if match is None:
            raise RulesBundleError(f'{option}: not a list of label matchers like job="x": {text!r}')
        matchers.append(f'{match[1]}{match[2]}"{_double_quoted(match)}"')
        position = match.end()
        if position < len(body) and body[position] == ",":
            position += 1
        elif position < len(body.rstrip()):
            raise RulesBundleError(f"{option}: matchers must be separated by commas: {text!r}")
    return ",".join(matchers)


def _double_quoted(match: re.Match[str]) -> str:
    """A matcher's value as the inside of a double-quoted PromQL string (the rules' own form)."""
    if match[3] is not None:
        return match[3]
    if match[4] is not None:  # 'single': \' needs no escape inside "...", a bare " does
        return _SINGLE_QUOTED_PART.sub(
            lambda part: '\\"' if part[1] is None else ("'" if part[1] == "'" else "\\" + part[1]), match[4]
        )
    return match[5].replace("\\", "\\\\").replace('"', '\\"')  # `raw`: no escapes at all


def parse_label_list(text: str, option: str) -> tuple[str, ...]:
    """Label names from ``cluster,namespace,job``; at least one, each a valid Prometheus label name."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise RulesBundleError(f"{option}: at least one label is needed")
    for name in names:
        if not _LABEL_NAME.fullmatch(name):
            raise RulesBundleError(f"{option}: not a label name: {name!r}")
    if "endpoint_id" in names:
        raise RulesBundleError(f"{option}: endpoint_id identifies a policy, not a deployment")
    return names


def _go_string(selector: str) -> str:
    """A selector inside a Go ``printf "..."`` literal of an annotation: quotes, backslashes and % escaped."""
    return selector.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")


# Annotation fragments shared by the bucket alerts (expanded before the selector placeholders they use).
_MACROS = {
    "__AVAILABLE__": (
        '{{ with printf "min(dict_rate_limit_available_tokens{__EXPORTERQ__,__IDQ__,endpoint_id=%q})"'
        ' __IDA__ $labels.endpoint_id | query }}{{ . | first | value | printf "%.0f" }}'
        "{{ else }}? (data missing){{ end }}"
    ),
    "__CAPACITY__": (
        '{{ with printf "max(dict_rate_limit_capacity{__EXPORTERQ__,__IDQ__,endpoint_id=%q})"'
        ' __IDA__ $labels.endpoint_id | query }}{{ . | first | value | printf "%.0f" }}{{ else }}?{{ end }}'
    ),
    "__RATIO__": (
        '{{ with printf "endpoint:dict_rate_limit_remaining:ratio_last{__IDQ__,endpoint_id=%q}"'
        " __IDA__ $labels.endpoint_id | query }}{{ . | first | value | humanizePercentage }}"
        "{{ else }}?{{ end }}"
    ),
    "__CATEGORY__": (
        '{{ with printf "dict_rate_limit_capacity{__EXPORTERQ__,__IDQ__,endpoint_id=%q}"'
        ' __IDA__ $labels.endpoint_id | query }}{{ . | first | label "psp_category" }}'
        "{{ else }}unknown{{ end }}"
    ),
    # "fresh" while the exporter serves the policy, "missing" while the alert holds its last known
    # state: the receiver records a resolution whose last state was "missing" as data lost.
    "__DATA_STATE__": (
        '{{ with printf "endpoint:dict_rate_limit_remaining:ratio{__IDQ__,endpoint_id=%q}"'
        " __IDA__ $labels.endpoint_id | query }}fresh{{ else }}missing{{ end }}"
    ),
}


def _tokens(selectors: Selectors, thresholds: Thresholds) -> dict[str, str]:
    labels = selectors.deployment_labels
    return {
        "__LOOKUP_POLICIES__": "|".join(thresholds.lookup_policies),
        "__LOOKUP_404_SHARE_MAX__": f"{thresholds.lookup_404_share_max:g}",
        "__LOOKUP_404_PERCENT__": f"{thresholds.lookup_404_share_max * 100:g}%",
        "__LOOKUP_MIN_ANSWERS__": str(thresholds.lookup_min_answers),
        "__EXPORTERQ__": _go_string(selectors.exporter),
        "__RECEIVERQ__": _go_string(selectors.receiver),
        "__ALERTMANAGERQ__": _go_string(selectors.alertmanager),
        "__EXPORTER__": selectors.exporter,
        "__RECEIVER__": selectors.receiver,
        "__ALERTMANAGER__": selectors.alertmanager,
        "__BY__": ", ".join(labels),
        "__IDQ__": ",".join(f"{name}=%q" for name in labels),
        "__IDA__": " ".join(f"$labels.{name}" for name in labels),
    }


def _fill(text: str, selectors: Selectors, thresholds: Thresholds) -> str:
    for token, fragment in _MACROS.items():
        text = text.replace(token, fragment)
    for token, value in _tokens(selectors, thresholds).items():
        text = text.replace(token, value)
    # An empty selector leaves `metric{}` or `{,label=...}`: both mean the same without the gap.
    return text.replace("{}", "").replace("{,", "{")


def _fill_document(node: Any, selectors: Selectors, thresholds: Thresholds) -> Any:
    if isinstance(node, str):
        return _fill(node, selectors, thresholds)
    if isinstance(node, list):
        return [_fill_document(item, selectors, thresholds) for item in node]
    if isinstance(node, dict):
        return {key: _fill_document(value, selectors, thresholds) for key, value in node.items()}
    return node


def render_rule_text(template: str, selectors: Selectors, thresholds: Thresholds = Thresholds()) -> str:
    """One rule file from its template, comments kept; refuses a selector that breaks the YAML quoting."""
    rendered = _fill(template, selectors, thresholds)
    try:
        parsed = yaml.safe_load(rendered)
    except yaml.YAMLError as exc:
        raise RulesBundleError(f"a selector breaks the rule file's YAML: {exc}") from None
    if parsed != _fill_document(yaml.safe_load(template), selectors, thresholds):
        raise RulesBundleError("a selector changes the rule file's YAML structure (quotes or ': ' in it?)")
    return rendered


def render_rules(
    dst_dir: Path,
    selectors: Selectors = Selectors(),
    src_dir: Path = TEMPLATES_DIR,
    thresholds: Thresholds = Thresholds(),
) -> list[Path]:
    """Writes the bundle's rule files for ``selectors`` and ``thresholds`` to ``dst_dir``; returns their
    paths."""
    bundle_version(src_dir)  # the templates must agree on the version before anything is written
    destination = Path(dst_dir)
    destination.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for path in rule_files(src_dir):
        target = destination / path.name
        text = render_rule_text(path.read_text(encoding="utf-8"), selectors, thresholds)
        target.write_text(text, encoding="utf-8")
        written.append(target)
    return written


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (expressions) as literal blocks; nothing wrapped, so diffs stay readable."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _represent_str)


def _dump(document: object) -> str:
    return yaml.dump(document, Dumper=_BlockDumper, sort_keys=False, width=1_000_000, allow_unicode=True)


def render_prometheusrule(
    src_dir: Path = RULES_DIR, name: str = "dict-rate-limit", *, rendered_by: str = ""
) -> str:
    """The PrometheusRule manifest (text) holding every group of the bundle.

    ``rendered_by`` replaces the header's source line (an overlay's manifest comes from the templates).
    """
    version = bundle_version(src_dir)
    manifest = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": name,
            "labels": {
                "app.kubernetes.io/name": "dict-rate-limit-exporter",
                "app.kubernetes.io/component": "alerting-rules",
                "app.kubernetes.io/part-of": "dict-rate-limit-exporter",
                "app.kubernetes.io/version": version,
            },
            "annotations": {"dict-rate-limit-exporter/rules-bundle-version": version},
        },
        "spec": {"groups": load_groups(src_dir)},
    }
    header = rendered_by or (
        f"# Rendered from rules/{RULE_FILE_GLOB} (bundle-version: {version})"
        " by `python -m exporter.rules.render`.\n"
        "# Do not edit: tests/rules/test_rules_bundle.py fails when this file drifts from its source.\n"
    )
    return header + _dump(manifest)


def overlay_selectors(overlay_dir: Path) -> Selectors:
    """The selectors of one Kubernetes overlay: the jobs its ServiceMonitors produce, in its namespace
    (read from its kustomization.yaml). Alertmanager is the cluster's, outside the overlay: not narrowed.

    The job label is the Service's name, so an overlay's ``namePrefix``/``nameSuffix`` are part of it
    (a rule selecting the unprefixed job would select nothing, and its liveness alerts would stay silent).
    """
    kustomization = yaml.safe_load((Path(overlay_dir) / "kustomization.yaml").read_text(encoding="utf-8"))
    if not isinstance(kustomization, dict):
        kustomization = {}
    namespace = kustomization.get("namespace")
    if not isinstance(namespace, str) or not namespace:
        raise RulesBundleError(f"{overlay_dir}/kustomization.yaml sets no namespace")
    prefix, suffix = str(kustomization.get("namePrefix") or ""), str(kustomization.get("nameSuffix") or "")
    return Selectors(
        exporter=f'job="{prefix}{EXPORTER_JOB}{suffix}",namespace="{namespace}"',
        receiver=f'job="{prefix}{RECEIVER_JOB}{suffix}",namespace="{namespace}"',
    )


def render_overlay_prometheusrule(overlay_dir: Path) -> str:
    """One overlay's PrometheusRule (text): the templates rendered with ``overlay_selectors``."""
    import tempfile

    selectors = overlay_selectors(overlay_dir)
    with tempfile.TemporaryDirectory(prefix="drl-rules-") as tmp:
        render_rules(Path(tmp), selectors)
        version = bundle_version(Path(tmp))
        header = (
            f"# Rendered from exporter/rules/templates (bundle-version: {version}) for this overlay by\n"
            "# `python -m exporter.rules.render --overlays` with exporter selector\n"
            f"#   {selectors.exporter}\n# and receiver selector\n#   {selectors.receiver}\n"
            "# A patch replacing the base's PrometheusRule. Do not edit: tests/deploy/test_kustomize.py\n"
            "# fails when this file drifts from its source.\n"
        )
        return render_prometheusrule(Path(tmp), rendered_by=header)


def overlay_dirs(root: Path = OVERLAYS_DIR) -> list[Path]:
    """Every overlay (a directory with a kustomization.yaml), in a stable order."""
    found = sorted(path.parent for path in Path(root).glob("*/kustomization.yaml"))
    if not found:
        raise RulesBundleError(f"no overlay (*/kustomization.yaml) in {root}")
    return found


def render_overlays(root: Path = OVERLAYS_DIR, *, check: bool = False) -> list[Path]:
    """Writes each overlay's prometheusrule.yaml and returns the files that changed; with ``check``,
    writes nothing (the stale files are returned all the same)."""
    stale: list[Path] = []
    for overlay in overlay_dirs(root):
        target = overlay / OVERLAY_MANIFEST
        rendered = render_overlay_prometheusrule(overlay)
        current = target.read_text(encoding="utf-8") if target.exists() else ""
        if current != rendered:
            stale.append(target)
            if not check:
                target.write_text(rendered, encoding="utf-8")
    return stale


# An alert whose condition is "below for half of a window" (hysteresis): the window sets its delay.
_HYSTERESIS = re.compile(r"avg_over_time\((?P<series>[^\[\]]+)\[(?P<window>\w+)\]\)\s*>=\s*0\.5")


def hysteresis_window(rule: Mapping[str, Any]) -> float | None:
    """Seconds of the averaging window of a hysteresis alert, None for a plain ``for:`` alert."""
    match = _HYSTERESIS.search(str(rule.get("expr", "")))
    return parse_duration(match["window"]) if match else None


def effective_for(rule: Mapping[str, Any]) -> float:
    """Seconds a condition that starts and stays true takes to fire the alert: ``for:`` plus, for a
    hysteresis alert, half its window (the average reaches one half then)."""
    window = hysteresis_window(rule)
    return parse_duration(str(rule.get("for", "0s"))) + (window / 2 if window else 0.0)


def _set_window(rule: dict[str, Any], seconds: float) -> None:
    match = _HYSTERESIS.search(rule["expr"])
    assert match is not None
    replacement = f"avg_over_time({match['series']}[{format_duration(seconds)}]) >= 0.5"
    rule["expr"] = rule["expr"][: match.start()] + replacement + rule["expr"][match.end() :]


def _fast_alert(rule: dict[str, Any], for_scale: float | Mapping[str, str], floor: float) -> None:
    """Shortens one alert: ``for:``, its hysteresis window and ``keep_firing_for`` alike."""
    window = hysteresis_window(rule)
    if isinstance(for_scale, Mapping):
        if rule["alert"] not in for_scale:
            return
        target = parse_duration(for_scale[rule["alert"]])
        if window is not None:  # the named duration is the effective delay: half the window
            _set_window(rule, max(2 * target, 2 * floor))
            rule["for"] = "0s"
        else:
            rule["for"] = format_duration(target)
        if "keep_firing_for" in rule:
            rule["keep_firing_for"] = format_duration(max(target, floor))
        return
    if "for" in rule and parse_duration(rule["for"]) > 0:
        rule["for"] = format_duration(max(parse_duration(rule["for"]) * for_scale, floor))
    if window is not None:
        _set_window(rule, max(window * for_scale, 2 * floor))
    if "keep_firing_for" in rule:
        rule["keep_firing_for"] = format_duration(
            max(parse_duration(rule["keep_firing_for"]) * for_scale, floor)
        )


def render_fast_rules(
    src_dir: Path,
    dst_dir: Path,
    for_scale: float | Mapping[str, str] = 0.02,
    *,
    min_for: str = "1s",
) -> list[Path]:
    """Writes the bundle's rule files to ``dst_dir`` with shorter hold durations; returns their paths.

    ``for_scale`` is either a factor applied to every alert's ``for:``, hysteresis window and
    ``keep_firing_for`` (0.02 turns the WARNING's 10-minute window into 12s, so it fires after 6s below;
    results are rounded up to whole seconds and never below ``min_for``) or a mapping from alert name to
    its effective delay (``{"DICTRateLimitWarning": "4s"}``: the window becomes 8s, ``keep_firing_for``
    4s), leaving the alerts it does not name unchanged. Expressions otherwise, recording rules, labels and
    annotations are copied as they are, so the fast rules raise the same alerts with the same labels.
    """
    if not isinstance(for_scale, Mapping) and not 0 < for_scale <= 1:
        raise RulesBundleError(f"for_scale must be in (0, 1], got {for_scale}")
    floor = parse_duration(min_for)
    destination = Path(dst_dir)
    destination.mkdir(parents=True, exist_ok=True)
    version = bundle_version(src_dir)
    written: list[Path] = []
    for path in rule_files(src_dir):
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
        for group in document["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    _fast_alert(rule, for_scale, floor)
        target = destination / path.name
        header = (
            f"# Fast variant of rules/{path.name} for demos and end-to-end tests; holds shortened.\n"
            f"# bundle-version: {version}\n"
        )
        target.write_text(header + _dump(document), encoding="utf-8")
        written.append(target)
    return written


def add_render_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``dict-rate-limit rules render``."""
    parser.add_argument(
        "--exporter-selector",
        default="",
        metavar="MATCHERS",
        help="Label matchers selecting the exporter's series, e.g. 'job=\"x\"' (default: all).",
    )
    parser.add_argument(
        "--receiver-selector",
        default="",
        metavar="MATCHERS",
        help="Label matchers selecting the receiver's series (default: all).",
    )
    parser.add_argument(
        "--alertmanager-selector",
        default="",
        metavar="MATCHERS",
        help="Label matchers selecting Alertmanager's own series (default: all).",
    )
    parser.add_argument(
        "--deployment-labels",
        default=",".join(DEFAULT_DEPLOYMENT_LABELS),
        metavar="LABELS",
        help="Comma-separated labels that identify one deployment (default: %(default)s).",
    )
    parser.add_argument(
        "--lookup-policies",
        default=",".join(DEFAULT_LOOKUP_POLICIES),
        metavar="POLICIES",
        help="Comma-separated policies whose DICT answers are key lookups (default: %(default)s).",
    )
    parser.add_argument(
        "--lookup-404-share-max",
        default=str(DEFAULT_LOOKUP_404_SHARE_MAX),
        metavar="SHARE",
        help="Share of key lookups answered 404 over 24 h above which DICTRateLimitLookupNotFoundShareHigh"
        " fires (default: %(default)s, DICT manual section 13.2).",
    )
    parser.add_argument(
        "--lookup-min-answers",
        default=str(DEFAULT_LOOKUP_MIN_ANSWERS),
        metavar="N",
        help="Key lookups answered in 24 h below which the 404 share never alerts (default: %(default)s).",
    )
    parser.add_argument("--output", type=Path, required=True, metavar="DIR", help="Directory to write to.")


def run_render(args: argparse.Namespace) -> int:
    """Writes the rule files and the PrometheusRule for the given selectors; 2 and one line when invalid."""
    try:
        selectors = Selectors(
            exporter=parse_selector(args.exporter_selector, "--exporter-selector"),
            receiver=parse_selector(args.receiver_selector, "--receiver-selector"),
            alertmanager=parse_selector(args.alertmanager_selector, "--alertmanager-selector"),
            deployment_labels=parse_label_list(args.deployment_labels, "--deployment-labels"),
        )
        thresholds = Thresholds(
            lookup_policies=parse_policy_list(args.lookup_policies, "--lookup-policies"),
            lookup_404_share_max=parse_share(args.lookup_404_share_max, "--lookup-404-share-max"),
            lookup_min_answers=parse_count(args.lookup_min_answers, "--lookup-min-answers"),
        )
        written = render_rules(args.output, selectors, thresholds=thresholds)
        manifest = Path(args.output) / "prometheusrule.yaml"
        manifest.write_text(render_prometheusrule(Path(args.output)), encoding="utf-8")
    except (RulesBundleError, OSError, yaml.YAMLError) as exc:
        print(f"dict-rate-limit rules render: {exc}", file=sys.stderr)
        return 2
    for path in [*written, manifest]:
        print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m exporter.rules.render", description="Render the rules bundle."
    )
    parser.add_argument("--rules-dir", type=Path, default=RULES_DIR, help="Directory of *.rules.yml files.")
    parser.add_argument("--output", type=Path, default=MANIFEST, help="Where to write the PrometheusRule.")
    parser.add_argument("--check", action="store_true", help="Exit 1 if --output is out of date.")
    parser.add_argument("--fast", type=Path, metavar="DIR", help="Write the fast rule files to DIR instead.")
    parser.add_argument("--for-scale", type=float, default=0.02, help="Factor for for: durations (--fast).")
    parser.add_argument(
        "--defaults", action="store_true", help="Rewrite --rules-dir from the templates (default selectors)."
    )
    parser.add_argument(
        "--overlays",
        action="store_true",
        help="Rewrite (with --check: check) each Kubernetes overlay's prometheusrule.yaml, rendered with"
        " the overlay's namespace and job selectors.",
    )
    args = parser.parse_args(argv)
    if args.overlays:
        return _overlays_command(check=args.check)
    try:
        if args.defaults:
            render_rules(args.rules_dir)
        if args.fast is not None:
            for path in render_fast_rules(args.rules_dir, args.fast, args.for_scale):
                print(path)
            return 0
        rendered = render_prometheusrule(args.rules_dir)
    except (RulesBundleError, OSError, yaml.YAMLError) as exc:
        print(f"rules_render: {exc}", file=sys.stderr)
        return 2
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != rendered:
            print(f"{args.output} is out of date: run python -m exporter.rules.render", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(rendered, encoding="utf-8")
    return 0


def _overlays_command(*, check: bool) -> int:
    try:
        stale = render_overlays(check=check)
    except (RulesBundleError, OSError, yaml.YAMLError) as exc:
        print(f"rules_render: {exc}", file=sys.stderr)
        return 2
    for path in stale:
        if check:
            print(f"{path} is out of date: run python -m exporter.rules.render --overlays", file=sys.stderr)
        else:
            print(path)
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
