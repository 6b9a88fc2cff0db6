"""A model with string inputs and outputs (ONNX `tensor(string)`, OIP `BYTES`), served over the
real chain: a string input pushed from the front end, a string tensor crossing a stage border, a
string output, a numeric branch beside them; answered as in-process ONNX Runtime answers, to
tritonclient over gRPC and HTTP (binary data and JSON), to Moirai's client, with dynamic
batching; bad string contents refused in one line, and the servers serve on."""

from __future__ import annotations

import asyncio
import struct

import aiohttp
import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc.aio as tgrpc
import tritonclient.http.aio as thttp

from stage_server import codec, shm
from stage_server.batchconfig import BatchingConfig
from stage_server.client import AsyncInferenceClient
from stage_server.protos import grpc_predict_v2_pb2 as oip
from stage_server.sessions import StageSession

from . import models
from .conftest import split_plan
from .test_serving import triton_inputs

pytestmark = pytest.mark.timeout(180)


def reference(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    model = models.strings()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(["upper", "score"], session.run(None, inputs), strict=True))


def check(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    upper = got["upper"]
    if upper.dtype != object or (upper.size and isinstance(upper.flat[0], bytes)):
        upper = np.vectorize(bytes.decode, otypes=[object])(upper)  # tritonclient's are bytes
    assert upper.tolist() == want["upper"].tolist()
    np.testing.assert_allclose(got["score"], want["score"], rtol=1e-6)


async def test_strings_cross_the_chain_and_answer_as_onnx_runtime(cluster) -> None:
    """Two stages, `upper` (strings) crossing between them; tritonclient over gRPC, HTTP with
    binary data and with JSON, and Moirai's own client, at 3 rows and at 20000 (whose object
    array is past the shared-memory threshold: strings still travel inline)."""
    model = models.strings()
    plan = split_plan(model, 2)
    assert plan.stages[0].outputs == ("upper", "positive")
    c = await cluster(model, plan)
    g = tgrpc.InferenceServerClient(c.grpc_url)
    h = thttp.InferenceServerClient(c.http_url)
    client = AsyncInferenceClient(c.grpc_url)
    try:
        meta = await g.get_model_metadata("strings", as_json=True)
        assert [(i["name"], i["datatype"]) for i in meta["inputs"]] == [
            ("city", "BYTES"), ("age", "FP32")
        ]  # fmt: skip
        assert (await h.get_model_metadata("strings"))["outputs"][0]["datatype"] == "BYTES"
        for rows in (3, 20000):
            inputs = models.string_inputs(rows, seed=rows)
            want = reference(inputs)
            result = await g.infer("strings", triton_inputs(tgrpc, inputs))
            check({n: result.as_numpy(n) for n in want}, want)
            for binary in (True, False):
                outputs = [thttp.InferRequestedOutput(n, binary_data=binary) for n in want]
                result = await h.infer(
                    "strings", triton_inputs(thttp, inputs, binary), outputs=outputs
                )
                check({n: result.as_numpy(n) for n in want}, want)
            check(await client.infer("strings", inputs), want)
    finally:
        await g.close()
        await h.close()
        await client.close()


async def test_typed_contents_carry_strings_as_bytes_contents(cluster) -> None:
    """A gRPC request with typed contents (`bytes_contents`, `fp32_contents`), as KServe's
    clients may send it: the same answer; the response's strings come back as raw contents."""
    model = models.strings()
    c = await cluster(model, split_plan(model, 2))
    inputs = models.string_inputs(4, seed=9)
    request = oip.ModelInferRequest(model_name="strings")
    city = request.inputs.add(name="city", datatype="BYTES", shape=[4, 1])
    city.contents.bytes_contents.extend(s.encode() for s in inputs["city"].ravel())
    age = request.inputs.add(name="age", datatype="FP32", shape=[4, 1])
    age.contents.fp32_contents.extend(inputs["age"].ravel().tolist())
    async with grpc.aio.insecure_channel(c.grpc_url) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=oip.ModelInferRequest.SerializeToString,
        )
        check(codec.decode_infer_response(await call(request, timeout=10)), reference(inputs))


async def test_batched_string_requests_each_get_their_own_answer(cluster) -> None:
    """24 concurrent requests of 1 to 6 rows, batched by the gateway: each answer is ONNX
    Runtime's on that request alone, and some batches held several requests."""
    model = models.strings()
    config = BatchingConfig(max_batch_size=16, max_queue_delay_us=200_000)
    c = await cluster(model, split_plan(model, 2), batching=config)
    rng = np.random.default_rng(5)
    requests = [models.string_inputs(int(rng.integers(1, 7)), seed) for seed in range(24)]
    client = AsyncInferenceClient(c.grpc_url)
    h = thttp.InferenceServerClient(c.http_url)

    async def one(i: int) -> None:
        if i % 2:
            got = await client.infer("strings", requests[i])
        else:
            result = await h.infer("strings", triton_inputs(thttp, requests[i]))
            got = {n: result.as_numpy(n) for n in ("upper", "score")}
        check(got, reference(requests[i]))

    try:
        await asyncio.gather(*(one(i) for i in range(len(requests))))
    finally:
        await client.close()
        await h.close()
    metrics = c.gateway.gateway.metrics.registry
    assert metrics.get_sample_value("moirai_batch_requests_sum") == len(requests)
    assert metrics.get_sample_value("moirai_batch_size_count") < len(requests)


async def test_strings_count_against_the_request_limit_as_they_take_memory(cluster) -> None:
    """6000 words of two letters: 36 KB on the wire and 24 KB of numbers, under the 128 KiB
    request limit, but 354 KB decoded: refused with RESOURCE_EXHAUSTED over gRPC (raw and typed
    contents) and 413 over HTTP (binary data and JSON), in one line naming the tensor and the
    limit; 1000 words are served."""
    model = models.strings()
    c = await cluster(model, split_plan(model, 2), max_request_bytes=128 * 1024)
    rows = 6000
    inputs = {
        "city": np.array([["ab"]] * rows, dtype=object),
        "age": models.string_inputs(rows)["age"],
    }
    assert len(codec.encode_infer_request("strings", inputs)) < 64 * 1024
    assert codec.memory_bytes(inputs["city"]) > 2 * 128 * 1024
    needle = (
        "input 'city': decoded, the request would take over the 131072 bytes allowed "
        "(--max-request-bytes)"
    )
    typed = oip.ModelInferRequest(model_name="strings")
    city = typed.inputs.add(name="city", datatype="BYTES", shape=[rows, 1])
    city.contents.bytes_contents.extend([b"ab"] * rows)
    age = typed.inputs.add(name="age", datatype="FP32", shape=[rows, 1])
    age.contents.fp32_contents.extend(inputs["age"].ravel().tolist())
    g = tgrpc.InferenceServerClient(c.grpc_url)
    h = thttp.InferenceServerClient(c.http_url)
    try:
        with pytest.raises(Exception) as e:
            await g.infer("strings", triton_inputs(tgrpc, inputs))
        assert "RESOURCE_EXHAUSTED" in str(e.value) and needle in str(e.value)
        async with grpc.aio.insecure_channel(c.grpc_url) as channel:
            call = channel.unary_unary(
                "/inference.GRPCInferenceService/ModelInfer",
                request_serializer=oip.ModelInferRequest.SerializeToString,
            )
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call(typed, timeout=10)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert needle in e.value.details() and "\n" not in e.value.details()
        with pytest.raises(Exception) as e:  # binary data: tritonclient's JSON is over the limit
            await h.infer("strings", triton_inputs(thttp, inputs))
        assert str(e.value).startswith(f"[413] {needle}")
        url = f"http://{c.http_url}/v2/models/strings/infer"
        body = {"inputs": [
            {"name": "city", "datatype": "BYTES", "shape": [rows, 1], "data": ["ab"] * rows},
            {"name": "age", "datatype": "FP32", "shape": [rows, 1], "data": [1.0] * rows},
        ]}  # fmt: skip
        async with aiohttp.ClientSession() as s, s.post(url, json=body) as r:
            assert r.status == 413 and (await r.json())["error"].startswith(needle)
        small = {name: array[:1000] for name, array in inputs.items()}
        result = await g.infer("strings", triton_inputs(tgrpc, small))
        check({n: result.as_numpy(n) for n in ("upper", "score")}, reference(small))
    finally:
        await g.close()
        await h.close()


async def test_bad_string_contents_are_refused_in_one_line_and_servers_serve_on(cluster) -> None:
    model = models.strings()
    c = await cluster(model, split_plan(model, 2))
    good = models.string_inputs(2)
    async with grpc.aio.insecure_channel(c.grpc_url) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=oip.ModelInferRequest.SerializeToString,
            response_deserializer=oip.ModelInferResponse.FromString,
        )
        for raw, needle in [
            (struct.pack("<I", 99) + b"a", "input 'city': the length prefix of BYTES element 0"),
            (struct.pack("<I", 1) + b"\xff" + struct.pack("<I", 0), "not UTF-8"),
        ]:
            request = oip.ModelInferRequest.FromString(codec.encode_infer_request("strings", good))
            request.raw_input_contents[0] = raw
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call(request, timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert needle in e.value.details() and "\n" not in e.value.details()
    url = f"http://{c.http_url}/v2/models/strings/infer"
    body = {"inputs": [
        {"name": "city", "datatype": "BYTES", "shape": [2, 1], "data": ["a", 7]},
        {"name": "age", "datatype": "FP32", "shape": [2, 1], "data": [1.0, 2.0]},
    ]}  # fmt: skip
    async with aiohttp.ClientSession() as s:
        async with s.post(url, json=body) as r:
            error = (await r.json())["error"]
            assert r.status == 400 and "input 'city': 'data' holds 7" in error, error
        body["inputs"][0] = {**body["inputs"][1], "name": "city"}  # numbers for a string input
        async with s.post(url, json=body) as r:
            assert (
                r.status == 400
                and "input 'city' is FP32, expected BYTES" in (await r.json())["error"]
            )
    client = AsyncInferenceClient(c.grpc_url)
    try:
        check(await client.infer("strings", good), reference(good))
    finally:
        await client.close()


def test_a_stage_session_never_binds_a_string_output_to_shared_memory() -> None:
    """Even one whose object array would pass the size for shared memory: ONNX Runtime allocates
    it, and it comes back as strings."""
    model = models.strings()
    plan = split_plan(model, 1)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    arena = shm.Arena() if shm.SUPPORTED else None
    specs = [plan.spec(n) for n in ("upper", "score")]
    stage = StageSession(session, specs, arena)
    inputs = models.string_inputs(40000)
    for _ in range(2):  # the second run would bind outputs whose shapes the first one gave
        upper, score = stage.run(inputs)
        want = reference(inputs)
        assert upper.dtype == object and upper.tolist() == want["upper"].tolist()
        np.testing.assert_allclose(score, want["score"], rtol=1e-6)
    assert "upper" not in stage._open and "upper" not in stage._placeable


async def test_moirai_infer_sends_strings_and_saves_string_outputs(
    cluster, tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`moirai infer --input city='[["a"], ...]'`: JSON strings for a BYTES input; a string
    output is printed and saved as numpy strings (np.load reads it without pickle)."""
    from moirai.cli import main

    model = models.strings()
    c = await cluster(model, split_plan(model, 2))
    inputs = {"city": np.array([["a"], ["zz"], ["ünïcödé"]], dtype=object),
              "age": np.array([[1.5], [30.0], [-4.0]], np.float32)}  # fmt: skip
    age = tmp_path / "age.npy"
    np.save(age, inputs["age"])
    out = tmp_path / "out"
    city = 'city=[["a"], ["zz"], ["ünïcödé"]]'
    argv = ["infer", "--url", c.grpc_url, "--model", "strings", "--input", city,
            "--input", f"age={age}", "--save", str(out)]  # fmt: skip
    assert await asyncio.to_thread(main, argv) == 0, capsys.readouterr().err
    want = reference(inputs)
    assert "upper: object [3, 1]" in capsys.readouterr().out
    assert np.load(out / "upper.npy").tolist() == want["upper"].tolist()
    np.testing.assert_allclose(np.load(out / "score.npy"), want["score"], rtol=1e-6)
