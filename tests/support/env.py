"""Where the repository is, whether this is CI, and the rule that a missing real tool fails under CI=true."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def require_binary(name: str) -> str:
    """Path of a real tool (promtool, amtool, prometheus...). Missing: a failure in CI, a skip elsewhere."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (run `make test`, which installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message + "; CI fails here instead of skipping")
    return path


def unavailable(what: str, exc: BaseException) -> None:
    """A real component that should run did not: a failure in CI, a skip elsewhere."""
    if IN_CI:
        pytest.fail(f"{what} did not start: {exc}")
    pytest.skip(f"{what} did not start: {exc}; CI fails here instead of skipping")
