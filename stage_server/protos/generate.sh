#!/usr/bin/env sh
# Regenerate the Python stubs beside the protos (run from anywhere; needs grpcio-tools).
# The stubs are committed so that installing and running Moirai needs no code generation step;
# tests/serving/test_protos.py fails when they drift from the .proto files.
set -eu
cd "$(dirname "$0")/../.."
"${PYTHON:-python3}" -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. \
  stage_server/protos/stage.proto
# The OIP service is registered by hand under its specification's name (see the .proto), so only
# its messages are generated.
"${PYTHON:-python3}" -m grpc_tools.protoc -I. --python_out=. stage_server/protos/grpc_predict_v2.proto
