"""Dynamic batching through the real chain: stage servers and the gateway on loopback, clients
over real gRPC and HTTP, every answer checked against single-process ONNX Runtime on that
request alone. Whether requests were batched is read from the gateway's metrics."""

from __future__ import annotations

import asyncio

import aiohttp
import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc.aio as tgrpc
import tritonclient.http.aio as thttp

from moirai.errors import MoiraiError
from stage_server.batchconfig import BatchingConfig
from stage_server.client import AsyncInferenceClient
from stage_server.serve import start_gateway

from . import models
from .conftest import split_plan
from .test_serving import triton_inputs

pytestmark = pytest.mark.timeout(240)

LONG_US = 600_000_000  # a delay no test waits out: batches go when full


def reference(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in model.graph.output], session.run(None, inputs), strict=True))


def images(batch: int, seed: int, size: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"images": rng.standard_normal((batch, 3, size, size)).astype(np.float32)}


def sample(cluster_handle, name: str) -> float:
    return cluster_handle.gateway.gateway.metrics.registry.get_sample_value(name) or 0.0


async def test_concurrent_requests_of_batch_1_to_8_each_get_ort_s_answer(cluster) -> None:
    """48 requests of 1 to 8 rows, 16 in flight at once from gRPC and HTTP clients: every
    answer equals ONNX Runtime's on that request alone, and the chain ran fewer batches than
    requests."""
    model = models.cnn()
    config = BatchingConfig(max_batch_size=8, max_queue_delay_us=200_000)
    c = await cluster(model, split_plan(model, 2), batching=config)
    rng = np.random.default_rng(7)
    requests = [images(int(rng.integers(1, 9)), seed) for seed in range(48)]
    wanted = [reference(model, r) for r in requests]
    g = AsyncInferenceClient(c.grpc_url)
    h = thttp.InferenceServerClient(c.http_url)
    slots = asyncio.Semaphore(16)

    async def one(i: int) -> None:
        async with slots:
            if i % 2:
                got = await g.infer("cnn", requests[i])
            else:
                result = await h.infer("cnn", triton_inputs(thttp, requests[i]))
                got = {name: result.as_numpy(name) for name in wanted[i]}
        for name, value in wanted[i].items():
            np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6, err_msg=name)

    try:
        await asyncio.gather(*(one(i) for i in range(len(requests))))
    finally:
        await g.close()
        await h.close()
    rows = sum(len(r["images"]) for r in requests)
    assert sample(c, "moirai_batch_size_sum") == rows
    assert sample(c, "moirai_batch_requests_sum") == len(requests)
    assert sample(c, "moirai_batch_size_count") < len(requests)  # some batches held several


async def test_a_symbolic_batch_model_answers_batch_1_and_4_with_batching_on(cluster) -> None:
    """Two requests that fill a batch of 5 together, over gRPC (tritonclient) and HTTP; the
    metadata still says -1 for the batch dimension."""
    model = models.cnn()
    config = BatchingConfig(max_batch_size=5, max_queue_delay_us=LONG_US)
    c = await cluster(model, split_plan(model, 2), batching=config)
    one, four = images(1, 1), images(4, 2)
    g = tgrpc.InferenceServerClient(c.grpc_url)
    h = thttp.InferenceServerClient(c.http_url)
    try:
        meta = await g.get_model_metadata("cnn", as_json=True)
        assert meta["inputs"][0]["shape"] == ["-1", "3", "-1", "-1"]
        assert (await h.get_model_metadata("cnn"))["outputs"][0]["shape"] == [-1, 10]
        results = await asyncio.gather(
            g.infer("cnn", triton_inputs(tgrpc, one)),
            h.infer("cnn", triton_inputs(thttp, four)),
        )
        for inputs, result in zip((one, four), results, strict=True):
            for name, value in reference(model, inputs).items():
                np.testing.assert_allclose(result.as_numpy(name), value, rtol=1e-5, atol=1e-6)
    finally:
        await g.close()
        await h.close()
    assert sample(c, "moirai_batch_size_count") == 1  # both in one batch of 5


async def test_a_request_over_max_batch_size_is_invalid_argument_and_400(cluster) -> None:
    model = models.cnn()
    c = await cluster(model, split_plan(model, 1), batching=BatchingConfig(max_batch_size=4))
    client = AsyncInferenceClient(c.grpc_url)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.infer("cnn", images(5, 0))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "batch size 5" in (e.value.details() or "")
    finally:
        await client.close()
    body = {
        "inputs": [
            {"name": "images", "datatype": "FP32", "shape": [6, 3, 1, 1], "data": [0.0] * 18}
        ]
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://{c.http_url}/v2/models/cnn/infer", json=body) as response,
    ):
        assert response.status == 400
        assert "max_batch_size 4" in (await response.json())["error"]
    assert sample(c, "moirai_batch_size_count") == 0


async def test_a_deadline_passing_in_the_batch_queue_fails_it_and_it_never_runs(cluster) -> None:
    """A lone request waits for a batch that never fills: its deadline (the client's over gRPC,
    the gateway's timeout over HTTP) fails it with DEADLINE_EXCEEDED / 504, and no batch and
    no stage ever ran."""
    model = models.cnn()
    config = BatchingConfig(max_batch_size=8, max_queue_delay_us=LONG_US)
    c = await cluster(model, split_plan(model, 2), batching=config, timeout_s=0.5)
    client = AsyncInferenceClient(c.grpc_url)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.infer("cnn", images(1, 0), timeout_s=0.3)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        await client.close()
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://{c.http_url}/v2/models/cnn/infer",
            json={
                "inputs": [
                    {"name": "images", "datatype": "FP32", "shape": [1, 3, 1, 1], "data": [1, 2, 3]}
                ]
            },
        ) as response,
    ):
        assert response.status == 504
        assert "in the batch queue" in (await response.json())["error"]
    batcher = c.gateway.gateway.batcher
    while batcher.queued:  # the gRPC request leaves when its server-side deadline passes too
        await asyncio.sleep(0.05)
    assert sample(c, "moirai_batch_size_count") == 0  # nothing was sent down the chain
    assert all(s.impl.in_flight == 0 for s in c.stages.values())


async def test_a_client_cancelling_in_the_queue_is_removed_and_the_batch_goes_without_it(
    cluster,
) -> None:
    model = models.cnn()
    config = BatchingConfig(max_batch_size=4, max_queue_delay_us=LONG_US)
    c = await cluster(model, split_plan(model, 2), batching=config)
    batcher = c.gateway.gateway.batcher
    client = AsyncInferenceClient(c.grpc_url)
    try:
        gone = asyncio.create_task(client.infer("cnn", images(1, 9)))
        while batcher.queued < 1:
            await asyncio.sleep(0.01)
        gone.cancel()  # the client goes away: gRPC cancels the call on the server
        while batcher.queued:
            await asyncio.sleep(0.01)
        kept = [images(3, 1), images(1, 2)]
        got = await asyncio.gather(*(client.infer("cnn", r) for r in kept))
        for inputs, result in zip(kept, got, strict=True):
            for name, value in reference(model, inputs).items():
                np.testing.assert_allclose(result[name], value, rtol=1e-5, atol=1e-6)
    finally:
        await client.close()
    assert sample(c, "moirai_batch_size_count") == 1
    assert sample(c, "moirai_batch_size_sum") == 4  # 3 + 1, without the cancelled row


async def test_a_model_with_a_fixed_batch_refuses_batching_in_one_line() -> None:
    model = models.mlp(batch=1)
    addresses = {"cpu-0": "127.0.0.1:1", "gateway": "127.0.0.1:2"}
    with pytest.raises(MoiraiError, match=r"input 'x' has a fixed first dimension \(1\)"):
        await start_gateway(
            split_plan(model, 1), addresses, batching=BatchingConfig(max_batch_size=8)
        )
