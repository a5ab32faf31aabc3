"""The committed gRPC stubs are exactly what scripts/gen-proto.sh generates from the .proto."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STUBS = ("rate_limit_pb2.py", "rate_limit_pb2.pyi", "rate_limit_pb2_grpc.py")


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    # The script calls `python`: put this interpreter (with grpcio-tools) first on PATH.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run([str(ROOT / "scripts" / "gen-proto.sh"), str(tmp_path)], check=True, env=env, timeout=60)
    for name in STUBS:
        generated = (tmp_path / "exporter" / "proto" / name).read_text(encoding="utf-8")
        committed = (ROOT / "exporter" / "proto" / name).read_text(encoding="utf-8")
        assert generated == committed, f"{name} is stale: run `make proto` and commit the result"


@pytest.mark.parametrize("name", STUBS)
def test_stubs_are_importable_and_name_the_service(name: str) -> None:
    text = (ROOT / "exporter" / "proto" / name).read_text(encoding="utf-8")
    assert "RateLimit" in text
