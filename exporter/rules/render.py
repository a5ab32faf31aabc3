"""Renders the rules bundle (rules/*.rules.yml): the PrometheusRule manifest and the demo's fast variant.

The rule files are the only source. ``render_prometheusrule`` wraps their groups in one PrometheusRule
object for the Prometheus Operator (committed as deploy/kubernetes/prometheusrule.yaml and checked for
drift by the tests); ``render_fast_rules`` writes copies whose ``for:`` durations are shortened, so a demo
or an end-to-end test sees alerts fire in seconds with the same expressions, labels and annotations.

    python -m exporter.rules.render            # rewrite deploy/kubernetes/prometheusrule.yaml
    python -m exporter.rules.render --check    # exit 1 when the committed manifest is out of date
    python -m exporter.rules.render --fast DIR --for-scale 0.02
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES_DIR = ROOT / "rules"
MANIFEST = ROOT / "deploy" / "kubernetes" / "prometheusrule.yaml"
RULE_FILE_GLOB = "*.rules.yml"

_VERSION_LINE = re.compile(r"^# bundle-version: (\d+\.\d+\.\d+)$", re.MULTILINE)
_DURATION_PART = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
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


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (expressions) as literal blocks; nothing wrapped, so diffs stay readable."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _represent_str)


def _dump(document: object) -> str:
    return yaml.dump(document, Dumper=_BlockDumper, sort_keys=False, width=1_000_000, allow_unicode=True)


def render_prometheusrule(src_dir: Path = RULES_DIR, name: str = "dict-rate-limit") -> str:
    """The PrometheusRule manifest (text) holding every group of the bundle."""
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
    header = (
        f"# Rendered from rules/{RULE_FILE_GLOB} (bundle-version: {version})"
        " by `python -m exporter.rules.render`.\n"
        "# Do not edit: tests/rules/test_rules_bundle.py fails when this file drifts from its source.\n"
    )
    return header + _dump(manifest)


def _scaled_for(alert: str, current: str, for_scale: float | Mapping[str, str], min_for: float) -> str:
    if isinstance(for_scale, Mapping):
        if alert not in for_scale:
            return current
        return format_duration(parse_duration(for_scale[alert]))
    seconds = parse_duration(current)
    if seconds == 0:
        return "0s"
    return format_duration(max(seconds * for_scale, min_for))


def render_fast_rules(
    src_dir: Path,
    dst_dir: Path,
    for_scale: float | Mapping[str, str] = 0.02,
    *,
    min_for: str = "1s",
) -> list[Path]:
    """Writes the bundle's rule files to ``dst_dir`` with shorter ``for:`` durations; returns their paths.

    ``for_scale`` is either a factor applied to every alert's ``for:`` (0.02 turns 5m into 6s and 2m into
    3s; results are rounded up to whole seconds and never below ``min_for``) or a mapping from alert name
    to a duration (``{"DICTRateLimitWarning": "4s"}``), leaving the alerts it does not name unchanged.
    Expressions, range windows, labels and annotations are copied as they are, so the fast rules raise the
    same alerts with the same labels; only how long a condition must hold changes.
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
                if "alert" in rule and "for" in rule:
                    rule["for"] = _scaled_for(rule["alert"], rule["for"], for_scale, floor)
        target = destination / path.name
        header = (
            f"# Fast variant of rules/{path.name} for demos and end-to-end tests; for: durations shortened.\n"
            f"# bundle-version: {version}\n"
        )
        target.write_text(header + _dump(document), encoding="utf-8")
        written.append(target)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m exporter.rules.render", description="Render the rules bundle."
    )
    parser.add_argument("--rules-dir", type=Path, default=RULES_DIR, help="Directory of *.rules.yml files.")
    parser.add_argument("--output", type=Path, default=MANIFEST, help="Where to write the PrometheusRule.")
    parser.add_argument("--check", action="store_true", help="Exit 1 if --output is out of date.")
    parser.add_argument("--fast", type=Path, metavar="DIR", help="Write the fast rule files to DIR instead.")
    parser.add_argument("--for-scale", type=float, default=0.02, help="Factor for for: durations (--fast).")
    args = parser.parse_args(argv)
    try:
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


if __name__ == "__main__":
    sys.exit(main())
