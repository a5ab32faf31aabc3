"""``python -m devstack demo``: what ``make demo`` runs from a checkout (the dev stack is not shipped)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from exporter import logsetup


def _duration(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds (got {text!r})") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (got {text!r})")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m devstack", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="Start the whole stack on embedded defaults and show it working.")
    demo.add_argument(
        "--state-dir",
        type=Path,
        default=Path(os.environ.get("DEMO_STATE_DIR", ".state/demo")),
        help="Directory holding everything the demo starts (databases, logs, rendered configs) "
        "[env DEMO_STATE_DIR; default .state/demo]",
    )
    demo.add_argument(
        "--duration",
        type=_duration,
        default=os.environ.get("DEMO_DURATION_SECONDS", "0"),
        help="Stop after this many seconds; 0 runs until Ctrl-C or SIGTERM "
        "[env DEMO_DURATION_SECONDS; default 0]",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logsetup.setup(os.environ.get("LOG_LEVEL", "info"), os.environ.get("LOG_FORMAT", "auto"))
    from devstack import demo

    try:
        return demo.run(args.state_dir, args.duration)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
