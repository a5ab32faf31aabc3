"""The committed gRPC stubs are exactly what scripts/gen-proto.sh generates from the .proto."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support.env import ROOT

STUBS = ("rate_limit_pb2.py", "rate_limit_pb2.pyi", "rate_limit_pb2_grpc.py")


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    # The script calls `python`: put this interpreter (with grpcio-tools) first on PATH.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run([str(ROOT / "scripts" / "gen-proto.sh"), str(tmp_path)], check=True, env=env, timeout=60)
    for name in STUBS:
        generated = (tmp_path / "exporter" / "bridge" / "proto" / name).read_text(encoding="utf-8")
        committed = (ROOT / "exporter" / "bridge" / "proto" / name).read_text(encoding="utf-8")
        assert generated == committed, f"{name} is stale: run `make proto` and commit the result"


def test_the_stubs_carry_the_contract_the_docs_describe() -> None:
    from exporter.bridge.proto import rate_limit_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["RateLimitService"]
    assert [m.name for m in service.methods] == ["GetRateLimitPolicies", "GetRateLimitPolicy"]
    assert pb.DESCRIPTOR.package == "dict.ratelimit.v1"
    policy = pb.RateLimitPolicy()
    assert not policy.HasField("error_404_rate")  # optional: absent and 0.0 are different answers
    policy.error_404_rate = 0.0
    assert policy.HasField("error_404_rate")
    fields = pb.RateLimitPolicy.DESCRIPTOR.fields_by_name
    assert fields["available_tokens"].type == fields["available_tokens"].TYPE_INT64  # signed balances
