"""Conformance end to end: a few diverse models served by real stage server processes on
loopback (`moirai.runtime.local.LocalDeployment`, what `moirai serve` starts) under a forced
split, every node alone on alternating devices, answer over gRPC and HTTP/JSON with what ONNX
Runtime computes on the whole model."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import pytest

from moirai.partition import build_plan
from moirai.planning import load
from moirai.runtime.local import LocalDeployment
from moirai.stageplan import StagePlan
from stage_server.client import InferenceClient

from .cases import assert_same, collect
from .check import ATOL, PLAN_DEVICES, RTOL, _input_shapes, check_structure

pytestmark = pytest.mark.timeout(300)

SERVED = [
    "corners/scopes",  # If, Loop and Scan bodies reading the outer scope; a bool output
    "corners/types",  # bool, int64 and zero-sized tensors on the wire; an empty optional input
    "corners/passthrough",  # an input that is an output; an output read inside the model
    "corners/strings",  # string (BYTES) inputs, borders and outputs, as JSON strings over HTTP
    "node/test_center_crop_pad_pad_expanded",  # sizes that come from an input's values
    "light/light_squeezenet",  # a real CNN, its fusion groups cut
]
CASES = {c.name: c for c in collect()}


def _forced_split(path: Path, case) -> StagePlan:
    loaded = load(path, _input_shapes(case))
    names = [n.name for n in loaded.proto.graph.node]
    plan = build_plan(
        loaded.proto,
        {n: PLAN_DEVICES[i % 2].name for i, n in enumerate(names)},
        PLAN_DEVICES[:2],
        dynamic=loaded.dynamic,
        model_name="conform",
        model_path=str(path),
        model_sha256=loaded.sha256,
    )
    check_structure(plan, case.name, loaded.proto)
    assert len(plan.stages) > 1
    return plan


def _http_infer(url: str, plan: StagePlan, inputs: dict) -> dict[str, np.ndarray]:
    body = {
        "inputs": [
            {
                "name": t.name,
                "datatype": t.datatype,
                "shape": list(inputs[t.name].shape),
                "data": inputs[t.name].ravel().tolist(),
            }
            for t in plan.inputs
        ]
    }
    request = urllib.request.Request(
        f"http://{url}/v2/models/{plan.model_name}/infer",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        reply = json.loads(response.read())
    dtypes = {"BOOL": np.bool_, "INT64": np.int64, "FP32": np.float32, "FP64": np.float64,
              "BYTES": object}  # fmt: skip
    return {
        o["name"]: np.array(o["data"], dtypes[o["datatype"]]).reshape(o["shape"])
        for o in reply["outputs"]
    }


@pytest.mark.parametrize("name", SERVED)
def test_served_split_answers_what_onnx_runtime_computes(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    assert not case.skip, case.skip
    assert case.want is not None
    path = tmp_path / "model.onnx"
    onnx.save(case.model, path)
    plan = _forced_split(path, case)
    deployment = LocalDeployment(plan, path, tmp_path / "run", pin_cores=False)
    with deployment, InferenceClient(deployment.grpc_url) as client:
        by_grpc = client.infer(plan.model_name, case.inputs)
        by_http = _http_infer(deployment.http_url, plan, case.inputs)
    for how, got in (("grpc", by_grpc), ("http", by_http)):
        assert set(got) == set(case.want), f"{name} ({how}): {sorted(got)}"
        for output, value in case.want.items():
            assert_same(got[output], value, f"{name} ({how}): {output}", RTOL, ATOL)
