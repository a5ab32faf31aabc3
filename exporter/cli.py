"""The ``dict-rate-limit`` command: one console script, one subcommand per entry point."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from exporter import __version__, config, logsetup

# subcommand -> (module:function taking the command's settings and returning an exit code, one-line help).
# Modules are imported only when their subcommand runs, so `simulator` never loads psycopg or pulsar.
COMMANDS: dict[str, tuple[str, str]] = {
    "exporter": (
        "exporter.service.app:run",
        "Poll the Bridge and serve /metrics, health and the policies API.",
    ),
    "receiver": (
        "exporter.receiver.webhook:run",
        "Receive Alertmanager webhooks, record them, relay them to Pulsar.",
    ),
    "all-in-one": (
        "exporter.allinone:run",
        "Exporter and receiver in one process (small installations).",
    ),
    "migrate": ("exporter.history.migrations:run", "Apply (or roll back) the sql/ migrations."),
    "outbox": (
        "exporter.receiver.outbox:run",
        "List the alert events the broker refused for good (set aside), or replay them.",
    ),
    "simulator": (
        "exporter.simulator.server:run",
        "Serve a Bridge simulator with real token-bucket dynamics.",
    ),
    # Takes its own arguments, not Settings: `rules render` only writes files.
    "rules": ("exporter.rules.render:run_render", "Render the alerting rules for your selectors."),
    "report": (
        "exporter.report.cli:run",
        "Write the capacity-planning report (HTML or JSON) from the PostgreSQL history.",
    ),
}


DEMO_HELP = "Start the whole stack on embedded defaults and show it working (from a checkout: make demo)."


def _add_demo_parser(sub: Any) -> None:
    # The demo stack (devstack/) is not shipped: this subcommand only finds it in a checkout and hands
    # over to `python -m devstack demo`, which validates these options itself.
    demo = sub.add_parser("demo", help=DEMO_HELP, description=DEMO_HELP)
    demo.add_argument("--state-dir", help="Directory holding what the demo starts (default .state/demo).")
    demo.add_argument("--duration", help="Stop after this many seconds; 0 (default) runs until Ctrl-C.")


def demo_checkout(candidates: Sequence[Path]) -> Path | None:
    """The first candidate directory holding the dev stack (a checkout of the repository), if any."""
    return next((root for root in candidates if (root / "devstack" / "__main__.py").is_file()), None)


def run_demo(args: argparse.Namespace, candidates: Sequence[Path] | None = None) -> int:
    """``dict-rate-limit demo``: becomes ``python -m devstack demo`` when a checkout is found, else exit 2.

    A checkout is looked for in ``candidates``: by default the working directory and the directory an
    editable install points into (the installed package's parent).
    """
    if candidates is None:
        installed = Path(importlib.import_module("exporter").__file__ or ".").resolve().parent.parent
        candidates = [Path.cwd(), installed]
    root = demo_checkout(candidates)
    if root is None:
        print(
            "dict-rate-limit demo: the demo stack (devstack/) is not part of the installed package:"
            " run `make demo` in a checkout of the repository",
            file=sys.stderr,
        )
        return 2
    argv = [sys.executable, "-m", "devstack", "demo"]
    for flag, value in (("--state-dir", args.state_dir), ("--duration", args.duration)):
        if value is not None:
            argv += [flag, value]
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    # Replaced, not spawned: SIGTERM and Ctrl-C reach the demo itself, and its exit code is ours.
    os.execve(sys.executable, argv, {**os.environ, "PYTHONPATH": path})  # noqa: S606 - our own interpreter
    return 0  # not reached


def _add_rules_parser(parser: argparse.ArgumentParser) -> None:
    from exporter.rules.render import add_render_arguments

    actions = parser.add_subparsers(dest="rules_action", required=True, metavar="ACTION")
    render = actions.add_parser(
        "render",
        help="Write the rule files and the PrometheusRule for given selectors.",
        description="Write the rules bundle (rule files and PrometheusRule) with your selectors and "
        "deployment labels; rules/ in the repository is the rendering with the defaults.",
    )
    add_render_arguments(render)


def _run_rules(args: argparse.Namespace) -> int:
    entry = _resolve(COMMANDS["rules"][0])
    return entry(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dict-rate-limit",
        description="Monitoring of DICT rate-limit token buckets. Configuration precedence: "
        "defaults < --config.file (or CONFIG_FILE) < environment < flags.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_target, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == "rules":
            _add_rules_parser(command_parser)
            continue
        config.add_flags(command_parser, name)
        if name == "migrate":
            command_parser.add_argument(
                "direction", nargs="?", choices=["up", "down", "status"], default="up"
            )
            command_parser.add_argument(
                "--to",
                dest="migrate_to",
                type=int,
                default=None,
                help="With down: the version to roll back to (default: one step).",
            )
        if name == "outbox":
            command_parser.add_argument("action", nargs="?", choices=["list", "replay"], default="list")
            command_parser.add_argument(
                "--id",
                dest="outbox_ids",
                type=int,
                action="append",
                help="With replay: the outbox id to replay (repeatable; default: every set-aside event).",
            )
        if name == "report":
            _add_report_flags(command_parser)
    _add_demo_parser(sub)
    check = sub.add_parser(
        "check-config",
        help="Validate the configuration of a command and print it.",
        description="Validate the configuration and print the effective values, "
        "secrets masked. Exit 2 and one line naming the key when invalid.",
    )
    check.add_argument("target", choices=sorted(set(COMMANDS) - {"rules"}), nargs="?", default="exporter")
    config.add_flags(check, "check-config")
    return parser


def _add_report_flags(parser: argparse.ArgumentParser) -> None:
    # Values are checked by the command itself, so a bad date is one line and exit 2 like a bad key.
    parser.add_argument("--since", help="Start (UTC date or ISO timestamp); default: 13 months back.")
    parser.add_argument("--until", help="End, exclusive (UTC date or ISO timestamp); default: now.")
    parser.add_argument(
        "--participant",
        help="Participant to report on: its name in a multi-participant exporter (the participant label); "
        "required when the history holds several (see docs/report.md).",
    )
    parser.add_argument("--output", help="File to write, - for stdout; default report.html / report.json.")
    parser.add_argument("--format", dest="report_format", choices=["html", "json"], default="html")


def _resolve(target: str) -> Callable[..., int]:
    module_name, _, function = target.partition(":")
    module = importlib.import_module(module_name)
    entry: Callable[..., int] = getattr(module, function)
    return entry


def _report_options(args: argparse.Namespace) -> Any:
    from exporter.report.cli import Options

    return Options(args.since, args.until, args.participant, args.output, args.report_format)


def main(argv: Sequence[str] | None = None) -> int:
    logsetup.quiet_grpc()  # before the configuration is read: a scenario's fault codes import grpc
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        return run_demo(args)
    return _run_rules(args) if args.command == "rules" else _run(args)


def _run(args: argparse.Namespace) -> int:
    flags = {k: v for k, v in vars(args).items() if k.startswith("cfg_") or k == "config_file"}
    command = args.target if args.command == "check-config" else args.command
    try:
        # Every check a command makes before it starts is part of its settings type: check-config fails
        # exactly where the command would.
        settings = config.load(command, flags)
    except config.ConfigError as exc:
        print(f"dict-rate-limit {args.command}: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        print(json.dumps(config.effective(settings), indent=2, sort_keys=True))
        return 0
    logsetup.setup(settings.log_level, settings.log_format)
    entry = _resolve(COMMANDS[args.command][0])
    arguments = {
        "migrate": lambda: {"direction": args.direction, "to": args.migrate_to},
        "outbox": lambda: {"action": args.action, "ids": args.outbox_ids},
        "report": lambda: {"options": _report_options(args)},
    }
    try:
        return entry(settings, **arguments.get(args.command, dict)())
    except config.ConfigError as exc:  # checks that need the command's own context (e.g. poll budget)
        print(f"dict-rate-limit {args.command}: invalid configuration: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
