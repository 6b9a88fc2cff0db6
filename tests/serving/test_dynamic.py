"""Dynamic shapes served: a model with a symbolic batch (and image size) answers any size it
accepts, through real gRPC and HTTP, and its metadata reports -1 for what is not fixed."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc.aio as tgrpc
import tritonclient.http.aio as thttp

from moirai.devices import local_devices
from moirai.planning import plan_model
from moirai.planning.cpu import split_cpu
from moirai.runtime.local import LocalDeployment
from stage_server.batchconfig import BatchingConfig
from stage_server.client import InferenceClient

from . import models
from .conftest import split_plan
from .test_serving import triton_inputs

pytestmark = pytest.mark.timeout(180)


def reference(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in model.graph.output], session.run(None, inputs), strict=True))


def images(batch: int, size: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + batch)
    return {"images": rng.standard_normal((batch, 3, size, size)).astype(np.float32)}


async def test_a_symbolic_model_answers_batch_1_and_4_over_grpc_and_http(cluster) -> None:
    """Two stages with a dynamic border of 256 KiB a row (the shared-memory path of dynamic
    outputs), asked twice at each size so the second run binds the remembered shapes."""
    model = models.cnn()
    c = await cluster(model, split_plan(model, 2))
    g = tgrpc.InferenceServerClient(c.grpc_url)
    h = thttp.InferenceServerClient(c.http_url)
    try:
        meta = await g.get_model_metadata("cnn", as_json=True)
        assert [(t["name"], t["shape"]) for t in meta["inputs"]] == [
            ("images", ["-1", "3", "-1", "-1"])
        ]
        assert {t["name"]: t["shape"] for t in meta["outputs"]} == {
            "probs": ["-1", "10"],
            "features": ["-1", "16", "-1", "-1"],
        }
        meta = await h.get_model_metadata("cnn")
        assert meta["inputs"][0]["shape"] == [-1, 3, -1, -1]
        assert {t["name"]: t["shape"] for t in meta["outputs"]}["probs"] == [-1, 10]
        for batch, size in [(1, 64), (4, 64), (1, 64), (4, 64), (2, 24)]:
            inputs = images(batch, size)
            want = reference(model, inputs)
            result = await g.infer("cnn", triton_inputs(tgrpc, inputs))
            for name, value in want.items():
                np.testing.assert_allclose(result.as_numpy(name), value, rtol=1e-5, atol=1e-6)
            result = await h.infer("cnn", triton_inputs(thttp, inputs))
            for name, value in want.items():
                np.testing.assert_allclose(result.as_numpy(name), value, rtol=1e-5, atol=1e-6)
    finally:
        await g.close()
        await h.close()


def test_moirai_serve_plans_at_batch_1_and_serves_batch_4(tmp_path: Path) -> None:
    """The whole path of `moirai serve`: planned without --input-shape (the symbolic batch
    priced at 1, recorded in the plan), stage servers as processes cutting their sub-models
    from the symbolic model, and the gateway process batching (its metrics count batches)."""
    model = models.cnn(size=32)
    path = tmp_path / "cnn.onnx"
    onnx.save(model, path)
    planned = plan_model(path, split_cpu(local_devices(), 2), time_limit=5)
    plan = planned.plan
    assert plan.input_shapes == {"images": (1, 3, 32, 32)}
    assert plan.inputs[0].shape == (-1, 3, 32, 32)
    batching = BatchingConfig(max_batch_size=8, max_queue_delay_us=1000)
    with (
        LocalDeployment(plan, path, tmp_path / "run", batching=batching) as deployment,
        InferenceClient(deployment.grpc_url) as client,
    ):
        for batch in (1, 4):
            inputs = images(batch, 32)
            got = client.infer("cnn", inputs)
            for name, value in reference(model, inputs).items():
                np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6)
        with urllib.request.urlopen(f"http://{deployment.http_url}/metrics") as response:
            metrics = response.read().decode()
    assert "moirai_batch_size_count 2.0" in metrics.splitlines()
    assert "moirai_batch_size_sum 5.0" in metrics.splitlines()
