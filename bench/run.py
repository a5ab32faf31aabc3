"""`make bench`: runs the main() of every bench/bench_*.py in turn (scrape, history, receiver, ...).

``python -m bench.run scrape history`` (from the repository root, so the dev stack imports) runs only the
benchmarks whose names contain one of the words.
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    failed = []
    words = sys.argv[1:]
    del sys.argv[1:]  # each benchmark's main() parses its own (empty) command line
    for path in sorted(HERE.glob("bench_*.py")):
        if words and not any(word in path.stem for word in words):
            continue
        print(f"\n=== {path.stem} ===", flush=True)
        started = time.monotonic()
        try:
            importlib.import_module(f"bench.{path.stem}").main()
        except Exception as exc:  # one broken benchmark must not hide the others' figures
            print(f"{path.stem} failed: {type(exc).__name__}: {exc}", flush=True)
            failed.append(path.stem)
        print(f"=== {path.stem}: {time.monotonic() - started:.0f} s ===", flush=True)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
