"""Several models behind one front end (`stage_server.repository`): real stage servers of two
different models on loopback, one standalone front end holding a gateway per model, clients
over real gRPC and HTTP. Every answer is checked against single-process ONNX Runtime."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import grpc
import numpy as np
import onnx
import pytest
import tritonclient.grpc.aio as tgrpc
import tritonclient.http.aio as thttp
from prometheus_client.parser import text_string_to_metric_families

from moirai.stageplan import GATEWAY, StagePlan
from stage_server.batchconfig import BatchingConfig
from stage_server.client import AsyncInferenceClient
from stage_server.serve import GatewayHandle, ServedModel, StageHandle, start_front_end, start_stage

from . import models
from .conftest import free_ports, split_plan
from .test_batching import images
from .test_serving import reference

pytestmark = pytest.mark.timeout(180)


@dataclass
class Served:
    front: GatewayHandle
    stages: dict[str, dict[str, StageHandle]]
    """Model name -> device -> its stage server."""
    same_host: bool

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.front.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.front.http_port}"


def _renamed(plan: StagePlan, name: str) -> StagePlan:
    data = plan.to_dict()
    data["model"]["name"] = name
    return StagePlan.from_dict(data)


@pytest.fixture(params=["same-host", "grpc"])
async def serve_two(request: pytest.FixtureRequest) -> AsyncIterator:
    """`await serve_two({name: (model, plan, batching)})`: each model's stage servers, and one
    front end of them all, pushing over the same-host path or over gRPC only."""
    same_host = request.param == "same-host"
    started: list[Served] = []

    async def launch(
        specs: dict[str, tuple[onnx.ModelProto, StagePlan, BatchingConfig | None]],
    ) -> Served:
        devices = sum(len(p.used_devices) for _, p, _ in specs.values())
        front_port, chain_port, *ports = free_ports(2 + devices)
        served, stages = [], {}
        for name, (model, plan, batching) in specs.items():
            plan = _renamed(plan, name)
            addresses = {d: f"127.0.0.1:{ports.pop()}" for d in plan.used_devices}
            addresses[GATEWAY] = f"127.0.0.1:{chain_port}"
            stages[name] = {
                d: await start_stage(
                    model,
                    plan,
                    d,
                    addresses,
                    port=int(addresses[d].rsplit(":", 1)[1]),
                    same_host=same_host,
                )
                for d in plan.used_devices
            }
            served.append(ServedModel(plan, addresses, batching))
        front = await start_front_end(
            served, grpc_port=front_port, chain_port=chain_port, same_host=same_host
        )
        s = Served(front, stages, same_host)
        started.append(s)
        assert await front.repository.wait_ready(10)
        return s

    yield launch
    for s in started:
        await s.front.stop(0)
        for by_device in s.stages.values():
            for handle in by_device.values():
                await handle.stop(0)


async def _until(condition, what: str, timeout_s: float = 15.0) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, f"not {what} within {timeout_s} s"
        await asyncio.sleep(0.05)


async def test_two_models_answer_as_onnx_runtime_and_are_listed_with_their_metadata(
    serve_two,
) -> None:
    """Two different models (a chain split over two stage servers, a branchy graph over three)
    behind one endpoint: each answers as ONNX Runtime over gRPC and HTTP, `/v2/models` and the
    repository index list both, each has its own metadata and readiness, and the metrics label
    every series with its model."""
    mlp, branchy = models.mlp(), models.branchy()
    s = await serve_two(
        {
            "chain": (mlp, split_plan(mlp, 2), None),
            "branches": (branchy, split_plan(branchy, 3), None),
        }
    )
    chain_in, branch_in = models.random_inputs(mlp, 1), models.random_inputs(branchy, 2)
    g = tgrpc.InferenceServerClient(s.grpc_url)
    h = thttp.InferenceServerClient(s.http_url.removeprefix("http://"))
    client = AsyncInferenceClient(s.grpc_url)
    try:
        for name, model, inputs in (("chain", mlp, chain_in), ("branches", branchy, branch_in)):
            want = reference(model, inputs)
            got = await client.infer(name, inputs)
            for output, value in want.items():
                np.testing.assert_allclose(got[output], value, rtol=1e-5, atol=1e-6)
            result = await h.infer(name, _triton(thttp, inputs))
            for output, value in want.items():
                np.testing.assert_allclose(result.as_numpy(output), value, rtol=1e-5, atol=1e-6)
            assert await g.is_model_ready(name) and await h.is_model_ready(name)
            metadata = await g.get_model_metadata(name)
            assert metadata.name == name
            assert [i.name for i in metadata.inputs] == [i.name for i in model.graph.input]
            assert [o.name for o in metadata.outputs] == [o.name for o in model.graph.output]
        assert await g.is_server_ready()
        index = await h.get_model_repository_index()
        assert [(m["name"], m["state"]) for m in index] == [
            ("chain", "READY"),
            ("branches", "READY"),
        ]
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{s.http_url}/v2/models") as r:
                assert r.status == 200 and await r.json() == {"models": ["chain", "branches"]}
            async with http.get(f"{s.http_url}/metrics") as r:
                text = await r.text()
    finally:
        await g.close()
        await h.close()
        await client.close()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    served = {
        sample.labels["model"]
        for sample in families["moirai_request_duration_seconds"].samples
        if sample.name.endswith("_count") and sample.value == 2
    }
    assert served == {"chain", "branches"}


def _triton(module, inputs):
    from .test_serving import triton_inputs

    return triton_inputs(module, inputs)


async def test_an_unknown_model_is_not_found_naming_the_models_served(serve_two) -> None:
    mlp, cnn = models.mlp(), models.cnn(size=8)
    s = await serve_two(
        {"a": (mlp, split_plan(mlp, 1), None), "b": (cnn, split_plan(cnn, 1), None)}
    )
    client = AsyncInferenceClient(s.grpc_url)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.infer("c", models.random_inputs(mlp))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert e.value.details() == "model 'c' is not served here; this endpoint serves 'a', 'b'"
    finally:
        await client.close()
    async with aiohttp.ClientSession() as http:
        for path in ("/v2/models/c", "/v2/models/c/ready", "/v2/models/a/versions/2"):
            async with http.get(f"{s.http_url}{path}") as r:
                assert r.status == 404, path
                assert "error" in await r.json()
        async with http.post(f"{s.http_url}/v2/models/c/infer", json={"inputs": []}) as r:
            assert r.status == 404
            assert "this endpoint serves 'a', 'b'" in (await r.json())["error"]


async def test_one_models_stage_server_gone_makes_only_that_model_not_ready(serve_two) -> None:
    """A stage server of model a stops: a is not ready (gRPC ModelReady, HTTP 503, index
    UNAVAILABLE) and its requests fail UNAVAILABLE; b stays ready and answers; the server is
    not ready (every model must be). Started again, a serves again."""
    a, b = models.mlp(), models.gather()
    s = await serve_two({"a": (a, split_plan(a, 2), None), "b": (b, split_plan(b, 2), None)})
    a_in, b_in = models.random_inputs(a), models.random_inputs(b)
    gateway_a = s.front.repository.get("a")
    victim = s.stages["a"]["cpu-1"]
    port = victim.port
    await victim.stop(0)
    await _until(lambda: not gateway_a.ready(), "a not ready")
    g = tgrpc.InferenceServerClient(s.grpc_url)
    client = AsyncInferenceClient(s.grpc_url)
    try:
        assert not await g.is_model_ready("a")
        assert await g.is_model_ready("b")
        assert not await g.is_server_ready()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.infer("a", a_in)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        for _ in range(3):
            got = await client.infer("b", b_in)
            np.testing.assert_allclose(got["y"], reference(b, b_in)["y"], rtol=1e-5)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{s.http_url}/v2/models/a/ready") as r:
                assert r.status == 503
            async with http.get(f"{s.http_url}/v2/models/b/ready") as r:
                assert r.status == 200
            async with http.post(f"{s.http_url}/v2/repository/index") as r:
                states = {m["name"]: m["state"] for m in await r.json()}
                assert states == {"a": "UNAVAILABLE", "b": "READY"}
        plan = gateway_a.plan
        addresses = {d: gateway_a.peers.address(d) for d in plan.used_devices}
        addresses[GATEWAY] = f"127.0.0.1:{s.front.chain_port}"
        s.stages["a"]["cpu-1"] = await start_stage(
            a, plan, "cpu-1", addresses, port=port, same_host=s.same_host
        )
        await _until(gateway_a.ready, "a ready again")
        got = await client.infer("a", a_in)
        np.testing.assert_allclose(got["y"], reference(a, a_in)["y"], rtol=1e-5)
        assert await g.is_server_ready()
    finally:
        await g.close()
        await client.close()


async def test_batching_is_per_model(serve_two) -> None:
    """Model `batched` batches (max 8, long delay: batches go when full), model `single` does
    not: 8 concurrent one-row requests to each answer as ONNX Runtime, `batched` ran them as one
    batch, and `single` has no batch metrics at all."""
    cnn = models.cnn(size=8)
    s = await serve_two(
        {
            "batched": (cnn, split_plan(cnn, 2), BatchingConfig(8, (), 600_000_000)),
            "single": (cnn, split_plan(cnn, 2), None),
        }
    )
    requests = [images(1, seed, size=8) for seed in range(8)]
    client = AsyncInferenceClient(s.grpc_url)
    try:
        for name in ("batched", "single"):
            answers = await asyncio.gather(*(client.infer(name, r) for r in requests))
            for r, got in zip(requests, answers, strict=True):
                np.testing.assert_allclose(
                    got["probs"], reference(cnn, r)["probs"], rtol=1e-5, atol=1e-6
                )
    finally:
        await client.close()
    batched = s.front.repository.get("batched")
    single = s.front.repository.get("single")
    assert batched.batcher.metrics.batch_size.collect()[0].samples  # it batches
    registry = batched.metrics.registry
    assert registry.get_sample_value("moirai_batch_requests_count") == 1
    assert registry.get_sample_value("moirai_batch_size_sum") == 8
    assert not hasattr(single, "batcher")
    assert single.metrics.registry.get_sample_value("moirai_batch_size_count") is None


async def test_a_model_name_given_twice_is_refused() -> None:
    mlp = models.mlp()
    plan = split_plan(mlp, 1)
    with pytest.raises(ValueError, match="model 'mlp' is given twice"):
        await start_front_end(
            [
                ServedModel(plan, {"cpu-0": "127.0.0.1:1"}),
                ServedModel(plan, {"cpu-0": "127.0.0.1:2"}),
            ]
        )
