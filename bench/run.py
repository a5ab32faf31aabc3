"""`make bench`: runs the main() of every bench/bench_*.py in turn (scrape, history, receiver, ...)."""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    failed = []
    for path in sorted(HERE.glob("bench_*.py")):
        print(f"\n=== {path.stem} ===", flush=True)
        started = time.monotonic()
        try:
            importlib.import_module(path.stem).main()
        except Exception as exc:  # one broken benchmark must not hide the others' figures
            print(f"{path.stem} failed: {type(exc).__name__}: {exc}", flush=True)
            failed.append(path.stem)
        print(f"=== {path.stem}: {time.monotonic() - started:.0f} s ===", flush=True)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
