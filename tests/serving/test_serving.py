"""The gateway and stage servers in this process, over real loopback gRPC/HTTP, with the real
tritonclient package as the Open Inference Protocol client."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import aiohttp
import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc.aio as tgrpc
import tritonclient.http.aio as thttp

from moirai.errors import MoiraiError
from moirai.partition import build_plan
from moirai.stageplan import DeviceSpec
from stage_server import codec, samehost, sessions
from stage_server.chain import ChainServicer
from stage_server.client import AsyncInferenceClient
from stage_server.errors import InvalidInput
from stage_server.protos import grpc_predict_v2_pb2 as oip
from stage_server.serve import start_gateway, start_stage

from . import models
from .conftest import free_ports, split_plan

pytestmark = pytest.mark.timeout(120)


def reference(model, inputs):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in model.graph.output], session.run(None, inputs), strict=True))


def triton_inputs(module, inputs, binary=True):
    out = []
    for name, array in inputs.items():
        i = module.InferInput(name, list(array.shape), codec.datatype_of(array))
        if module is thttp:
            i.set_data_from_numpy(array, binary_data=binary)
        else:
            i.set_data_from_numpy(array)
        out.append(i)
    return out


async def test_tritonclient_grpc_and_http_get_the_models_outputs(cluster) -> None:
    model = models.branchy()
    c = await cluster(model, split_plan(model, 3))
    inputs = models.random_inputs(model, seed=3)
    want = reference(model, inputs)

    g = tgrpc.InferenceServerClient(c.grpc_url)
    try:
        assert await g.is_server_live()
        assert await g.is_server_ready()
        assert await g.is_model_ready("branchy")
        meta = await g.get_model_metadata("branchy", as_json=True)
        assert [i["name"] for i in meta["inputs"]] == ["x", "z"]
        result = await g.infer("branchy", triton_inputs(tgrpc, inputs))
        for name, value in want.items():
            np.testing.assert_allclose(result.as_numpy(name), value, rtol=1e-5, atol=1e-6)
        only = await g.infer(
            "branchy", triton_inputs(tgrpc, inputs), outputs=[tgrpc.InferRequestedOutput("q1")]
        )
        np.testing.assert_allclose(only.as_numpy("q1"), want["q1"], rtol=1e-5, atol=1e-6)
        assert only.as_numpy("y") is None
    finally:
        await g.close()

    h = thttp.InferenceServerClient(c.http_url)
    try:
        assert await h.is_server_ready()
        for binary in (True, False):
            result = await h.infer("branchy", triton_inputs(thttp, inputs, binary))
            for name, value in want.items():
                np.testing.assert_allclose(result.as_numpy(name), value, rtol=1e-5, atol=1e-6)
        outputs = [thttp.InferRequestedOutput("out", binary_data=True)]
        result = await h.infer("branchy", triton_inputs(thttp, inputs), outputs=outputs)
        np.testing.assert_allclose(result.as_numpy("out"), want["out"], rtol=1e-5, atol=1e-6)
    finally:
        await h.close()


async def test_a_one_stage_plan_answers_and_in_the_stage_process_crosses_no_process(
    cluster, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A one-stage plan answers like ONNX Runtime over gRPC and HTTP; with the front end in the
    stage server's process, no push crosses to another process (nor comes back)."""
    received: list[int] = []
    receive = ChainServicer.receive

    def counted(self: ChainServicer, payload: bytes, mappings: object = None) -> None:
        received.append(len(payload))
        receive(self, payload, mappings)  # type: ignore[arg-type]

    monkeypatch.setattr(ChainServicer, "receive", counted)
    model = models.branchy()
    c = await cluster(model, split_plan(model, 1))
    inputs = models.random_inputs(model, seed=5)
    want = reference(model, inputs)
    g = tgrpc.InferenceServerClient(c.grpc_url)
    h = thttp.InferenceServerClient(c.http_url)
    try:
        for result in [
            await g.infer("branchy", triton_inputs(tgrpc, inputs)),
            await h.infer("branchy", triton_inputs(thttp, inputs)),
        ]:
            for name, value in want.items():
                np.testing.assert_allclose(result.as_numpy(name), value, rtol=1e-5, atol=1e-6)
    finally:
        await g.close()
        await h.close()
    fused = request.node.callspec.params["cluster"] == "fused"
    assert len(received) == (0 if fused else 4)  # in, and out, for each request


async def test_typed_contents_and_json_data(cluster) -> None:
    model = models.gather()
    c = await cluster(model, split_plan(model, 2))
    inputs = models.random_inputs(model)
    want = reference(model, inputs)["y"]
    request = oip.ModelInferRequest(model_name="gather")
    request.inputs.add(name="x", datatype="FP32", shape=[16, 32]).contents.fp32_contents.extend(
        inputs["x"].ravel().tolist()
    )
    request.inputs.add(name="idx", datatype="INT64", shape=[4]).contents.int64_contents.extend(
        inputs["idx"].tolist()
    )
    async with grpc.aio.insecure_channel(c.grpc_url) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=oip.ModelInferRequest.SerializeToString,
        )
        got = codec.decode_infer_response(await call(request, timeout=10))
    np.testing.assert_allclose(got["y"], want, rtol=1e-5, atol=1e-5)
    body = {
        "inputs": [
            {"name": k, "shape": list(v.shape), "datatype": codec.datatype_of(v),
             "data": v.tolist()}
            for k, v in inputs.items()
        ]
    }  # fmt: skip
    url = f"http://{c.http_url}/v2/models/gather/infer"
    async with aiohttp.ClientSession() as s, s.post(url, json=body) as r:
        assert r.status == 200, await r.text()
        out = (await r.json())["outputs"][0]
    np.testing.assert_allclose(np.array(out["data"]).reshape(out["shape"]), want, rtol=1e-5)


BAD_REQUESTS = [
    ("unknown input 'nope'", {"nope": np.zeros((16, 32), np.float32)}),
    ("input 'x' is FP64, expected FP32", {"x": np.zeros((16, 32), np.float64)}),
    ("input 'x' has shape [16, 31], expected [16, 32]", {"x": np.zeros((16, 31), np.float32)}),
    ("input 'idx' is missing", {"x": np.zeros((16, 32), np.float32)}),
]


async def test_invalid_inputs_are_invalid_argument_and_servers_stay_healthy(cluster) -> None:
    model = models.gather()
    c = await cluster(model, split_plan(model, 2))
    good = models.random_inputs(model)
    idx = good["idx"]
    client = AsyncInferenceClient(c.grpc_url)
    try:
        for message, inputs in BAD_REQUESTS:
            full = {"idx": idx, **inputs} if "missing" not in message else inputs
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await client.infer("gather", full)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in e.value.details()
        # Raw contents of the wrong length (truncated) and garbage lengths.
        async with grpc.aio.insecure_channel(c.grpc_url) as channel:
            call = channel.unary_unary(
                "/inference.GRPCInferenceService/ModelInfer",
                request_serializer=oip.ModelInferRequest.SerializeToString,
                response_deserializer=oip.ModelInferResponse.FromString,
            )
            for raw_x in (good["x"].tobytes()[:-3], b"\x00garbage"):
                request = oip.ModelInferRequest.FromString(
                    codec.encode_infer_request("gather", good)
                )
                request.raw_input_contents[0] = raw_x
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await call(request, timeout=10)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "input 'x': raw contents hold" in e.value.details()
            wrong_model = oip.ModelInferRequest.FromString(
                codec.encode_infer_request("other", good)
            )
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call(wrong_model, timeout=10)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
        async with aiohttp.ClientSession() as s:
            url = f"http://{c.http_url}/v2/models/gather/infer"
            async with s.post(url, data=b"{not json") as r:
                assert r.status == 400 and "not valid JSON" in (await r.json())["error"]
            bad = {"inputs": [{"name": "x", "shape": [16, 32], "datatype": "FP32", "data": [1]}]}
            async with s.post(url, json=bad) as r:
                assert r.status == 400 and "'x'" in (await r.json())["error"]
            async with s.get(f"http://{c.http_url}/v2/health/ready") as r:
                assert r.status == 200
        got = await client.infer("gather", good)
        np.testing.assert_allclose(got["y"], reference(model, good)["y"], rtol=1e-5, atol=1e-5)
    finally:
        await client.close()


async def test_request_size_limit(cluster) -> None:
    model = models.gather(rows=4096)
    c = await cluster(model, split_plan(model, 2), max_request_bytes=128 * 1024)
    inputs = models.random_inputs(model)  # x is 512 KiB
    client = AsyncInferenceClient(c.grpc_url)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.infer("gather", inputs)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await client.close()
    body = {"inputs": [{"name": k, "shape": list(v.shape), "datatype": codec.datatype_of(v),
                        "data": v.ravel().tolist()} for k, v in inputs.items()]}  # fmt: skip
    url = f"http://{c.http_url}/v2/models/gather/infer"
    async with aiohttp.ClientSession() as s:
        async with s.post(url, json=body) as r:
            assert r.status == 413
            assert "max-request-bytes" in (await r.json())["error"]
        async with s.get(f"http://{c.http_url}/metrics") as r:
            assert 'moirai_request_errors_total{code="RESOURCE_EXHAUSTED"}' in await r.text()


async def test_tensors_of_64_mib_travel_the_chain(cluster) -> None:
    from onnx import TensorProto, helper

    n = 16 * 1024 * 1024  # 64 MiB of FP32
    nodes = [helper.make_node("Neg", ["x"], ["a"], name="Neg_0"),
             helper.make_node("Abs", ["a"], ["y"], name="Abs_1")]  # fmt: skip
    graph = helper.make_graph(
        nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    plan = build_plan(model, {"Neg_0": "cpu-0", "Abs_1": "cpu-1"},
                      [DeviceSpec("cpu-0", threads=1), DeviceSpec("cpu-1", threads=1)])  # fmt: skip
    c = await cluster(model, plan)
    x = np.linspace(-1, 1, n, dtype=np.float32)
    client = AsyncInferenceClient(c.grpc_url)
    try:
        got = await client.infer("big", {"x": x}, timeout_s=60)
    finally:
        await client.close()
    np.testing.assert_array_equal(got["y"], np.abs(x))


async def test_metrics_show_latency_stages_and_in_flight(cluster) -> None:
    model = models.mlp()
    c = await cluster(model, split_plan(model, 2))
    client = AsyncInferenceClient(c.grpc_url)
    try:
        for _ in range(5):
            await client.infer("mlp", models.random_inputs(model))
    finally:
        await client.close()
    async with aiohttp.ClientSession() as s, s.get(f"http://{c.http_url}/metrics") as r:
        text = await r.text()
    assert "moirai_request_duration_seconds_count 5.0" in text
    for kind in ("compute", "queue", "transfer"):
        assert f'moirai_stage_seconds_count{{device="cpu-1",kind="{kind}",stage="s1"}} 5.0' in text
    assert "moirai_requests_in_flight 0.0" in text
    assert 'moirai_stage_server_up{device="cpu-0"} 1.0' in text


async def test_a_thousand_requests_with_failures_leave_nothing_behind(cluster) -> None:
    """Stage failures (out-of-range Gather indices), expired deadlines and client
    cancellations, interleaved with good requests: afterwards no server holds any state. (x
    and the tensor between the stages are 128 KiB, so on the same-host path they travel in
    shared memory; the `cluster` fixture checks that none is left once the servers stop.)"""
    model = models.gather(rows=1024)
    c = await cluster(model, split_plan(model, 2))
    good = models.random_inputs(model)
    bad = {**good, "idx": np.array([0, 1, 4099, 2], np.int64)}
    want = reference(model, good)["y"]
    client = AsyncInferenceClient(c.grpc_url)
    codes: dict[str, int] = {}
    semaphore = asyncio.Semaphore(32)

    async def one(i: int) -> None:
        async with semaphore:
            kind = i % 4
            try:
                if kind == 3:  # cancelled by the client mid-flight
                    task = asyncio.ensure_future(client.infer("gather", good))
                    await asyncio.sleep(0.0005 * (i % 7))
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    codes["CANCELLED"] = codes.get("CANCELLED", 0) + 1
                    return
                timeout = 0.002 if kind == 2 else 10.0
                got = await client.infer("gather", bad if kind == 1 else good, timeout_s=timeout)
                np.testing.assert_allclose(got["y"], want, rtol=1e-5, atol=1e-5)
                codes["OK"] = codes.get("OK", 0) + 1
            except grpc.aio.AioRpcError as e:
                codes[e.code().name] = codes.get(e.code().name, 0) + 1

    try:
        await asyncio.gather(*(one(i) for i in range(1000)))
    finally:
        await client.close()
    assert codes.get("OK", 0) >= 250 and codes.get("INTERNAL", 0) == 250, codes
    assert codes.get("DEADLINE_EXCEEDED", 0) + codes.get("OK", 0) >= 450, codes
    gateway = c.gateway.gateway
    stages = [s.impl for s in c.stages.values()]
    for _ in range(100):  # deadlines of at most 10 s ago expire; the sweeper runs every 0.25 s
        if not gateway.pending and all(not s.in_flight for s in stages):
            break
        await asyncio.sleep(0.1)
    assert not gateway.pending
    assert [s.in_flight for s in stages] == [0, 0]
    assert gateway.metrics.in_flight._value.get() == 0


@pytest.mark.parametrize("cluster", ["same-host"], indirect=True)
async def test_a_failure_too_late_to_report_pins_no_shared_memory(
    cluster, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A first stage that outruns the request's deadline can neither push its output nor report
    that to the gateway, and logs it. The log record used to hold the exception, whose frames
    held the output in its shared memory file and the input in its mapping: while pytest kept
    the record, the `cluster` fixture found the file held after the servers stopped."""
    model = models.gather(rows=1024)  # x and the tensor between the stages: 128 KiB
    run = sessions.StageSession.run

    def slow_first_stage(
        self: sessions.StageSession, feeds: dict[str, np.ndarray], places: object = None
    ) -> list[np.ndarray]:
        if "x" in feeds:
            time.sleep(0.2)
        return run(self, feeds, places)

    monkeypatch.setattr(sessions.StageSession, "run", slow_first_stage)
    c = await cluster(model, split_plan(model, 2))
    client = AsyncInferenceClient(c.grpc_url)
    try:
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await client.infer("gather", models.random_inputs(model), timeout_s=0.1)
            assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        for _ in range(100):  # the first stage logs once its run is over
            if "cannot report failure" in caplog.text:
                break
            await asyncio.sleep(0.05)
    finally:
        await client.close()
    assert "cannot report failure" in caplog.text


@pytest.mark.parametrize("cluster", ["same-host", "fused"], indirect=True)
async def test_a_port_in_use_is_refused_in_one_line_and_its_server_keeps_serving(cluster) -> None:
    """gRPC's default SO_REUSEPORT let a second server bind a port in use, which then died on
    the same-host socket of that port with an OSError traceback."""
    model = models.mlp(width=8, depth=2)
    plan = split_plan(model, 2)
    c = await cluster(model, plan)
    x = models.random_inputs(model)["x"]
    client = AsyncInferenceClient(c.grpc_url)
    before = (await client.infer("mlp", {"x": x}, timeout_s=10))["y"]
    device = plan.used_devices[0]
    taken = [
        (start_stage(model, plan, device, c.addresses, port=c.stages[device].port),
         f"127.0.0.1:{c.stages[device].port}"),
        (start_gateway(plan, c.addresses, grpc_port=c.gateway.grpc_port),
         f"127.0.0.1:{c.gateway.grpc_port}"),
        (start_gateway(plan, c.addresses, http_port=c.gateway.http_port),
         f"127.0.0.1:{c.gateway.http_port}"),
    ]  # fmt: skip
    for start, address in taken:
        with pytest.raises(MoiraiError, match=f"cannot listen on {address}") as e:
            await start
        assert "\n" not in str(e.value)
    after = (await client.infer("mlp", {"x": x}, timeout_s=10))["y"]
    np.testing.assert_array_equal(after, before)
    await client.close()


@pytest.mark.skipif(not samehost.SUPPORTED, reason="no same-host fast path here")
async def test_a_same_host_socket_in_use_is_refused_in_one_line() -> None:
    """Something else holding the chain port's same-host socket raised an unhandled OSError."""
    model = models.mlp(width=8, depth=2)
    plan = split_plan(model, 2)
    (port,) = free_ports(1)
    device = plan.used_devices[0]
    addresses = {d: f"127.0.0.1:{port}" for d in [*plan.used_devices, "gateway"]}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as holder:
        holder.bind(samehost.socket_name(port))
        with pytest.raises(MoiraiError, match=f"same-host socket of chain port {port}"):
            await start_stage(model, plan, device, addresses, port=port)
    # The failed server gave its gRPC port back.
    handle = await start_stage(model, plan, device, addresses, port=port)
    await handle.stop(0)


def test_codec_rejects_bad_bool_bytes() -> None:
    with pytest.raises(InvalidInput, match="BOOL"):
        codec.from_bytes("b", "BOOL", [2], b"\x00\x07")
    assert json.dumps(codec.encode_json_outputs("m", "", {"y": np.zeros(2, np.int8)}, False)[0])
