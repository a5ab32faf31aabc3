"""`make bench`: runs the main() of every bench/bench_*.py in turn (scrape, history, receiver, ...).

``python -m bench.run scrape history`` (from the repository root, so the dev stack imports) runs only the
benchmarks whose names contain one of the words; ``--quick`` (``make bench-quick``) runs each in its short
form. Every figure is printed as the project, the peers where they apply and the limit, with the ratio to
the limit as median [min-max] over interleaved rounds.
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

from bench.common import machine

HERE = Path(__file__).resolve().parent


def main() -> int:
    if {"-h", "--help"} & set(sys.argv[1:]):
        names = ", ".join(path.stem.removeprefix("bench_") for path in sorted(HERE.glob("bench_*.py")))
        print(f"{__doc__}\nBenchmarks: {names}.")
        return 0
    failed = []
    words = [word for word in sys.argv[1:] if not word.startswith("-")]
    options = [word for word in sys.argv[1:] if word.startswith("-")]  # --quick: passed to every benchmark
    del sys.argv[1:]
    print(f"{machine()}; benchmarks {' '.join(options) or '(full)'}", flush=True)
    for path in sorted(HERE.glob("bench_*.py")):
        if words and not any(word in path.stem for word in words):
            continue
        print(f"\n=== {path.stem} ===", flush=True)
        started = time.monotonic()
        try:
            importlib.import_module(f"bench.{path.stem}").main(options)
        except Exception as exc:  # one broken benchmark must not hide the others' figures
            print(f"{path.stem} failed: {type(exc).__name__}: {exc}", flush=True)
            failed.append(path.stem)
        print(f"=== {path.stem}: {time.monotonic() - started:.0f} s ===", flush=True)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
