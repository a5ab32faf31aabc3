#!/usr/bin/env bash
# Regenerates the Python gRPC stubs from exporter/bridge/proto/rate_limit.proto.
# Run from anywhere; tests/test_proto_stubs.py fails when the committed stubs differ from this output.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root}
cd "$root"
python -m grpc_tools.protoc -I. --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" \
    exporter/bridge/proto/rate_limit.proto
