"""Hostile and clumsy requests at the gateway, over real loopback HTTP and gRPC: each is refused
with a 4xx status or an INVALID_ARGUMENT / NOT_FOUND code and a message naming what is wrong,
and good requests sent among them still get the model's outputs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import aiohttp
import grpc
import numpy as np
import onnxruntime as ort
import pytest

from stage_server import codec, oip_http
from stage_server.client import AsyncInferenceClient
from stage_server.protos import grpc_predict_v2_pb2 as oip

from . import models
from .conftest import split_plan

pytestmark = [
    pytest.mark.timeout(120),
    # The bad requests never reach the chain, so one way of pushing along it is enough; the
    # front end alone and inside a stage server's process.
    pytest.mark.parametrize("cluster", ["same-host", "fused"], indirect=True),
]

INFER = "/inference.GRPCInferenceService/ModelInfer"


def good_body(x: np.ndarray) -> dict[str, object]:
    return {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.ravel().tolist()}]}  # fmt: skip


async def test_model_versions_other_than_the_one_served_are_not_found(cluster) -> None:
    """Any version used to be served as if it were version 1."""
    model = models.mlp(width=8, depth=2)
    c = await cluster(model, split_plan(model, 2))
    x = models.random_inputs(model)["x"]
    async with aiohttp.ClientSession() as s:
        base = f"http://{c.http_url}/v2/models/mlp"
        async with s.post(f"{base}/versions/7/infer", json=good_body(x)) as r:
            assert r.status == 404
            assert "has no version '7'" in (await r.json())["error"]
        for path in ("/versions/2", "/versions/2/ready"):
            async with s.get(base + path) as r:
                assert r.status == 404, path
        async with s.post(f"{base}/versions/1/infer", json=good_body(x)) as r:
            assert r.status == 200
        async with s.get(f"{base}/versions/1") as r:
            assert (await r.json())["versions"] == ["1"]
    async with grpc.aio.insecure_channel(c.grpc_url) as channel:
        infer = channel.unary_unary(INFER)
        request = oip.ModelInferRequest.FromString(codec.encode_infer_request("mlp", {"x": x}))
        request.model_version = "7"
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await infer(request.SerializeToString(), timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert "has no version '7'" in e.value.details()
        request.model_version = "1"
        assert codec.decode_infer_response(await infer(request.SerializeToString(), timeout=10))
        metadata = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelMetadata",
            request_serializer=oip.ModelMetadataRequest.SerializeToString,
            response_deserializer=oip.ModelMetadataResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await metadata(oip.ModelMetadataRequest(name="mlp", version="2"), timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_method_not_allowed_is_json_like_every_other_error(cluster) -> None:
    """A GET on the infer route came back as aiohttp's plain text."""
    model = models.mlp(width=8, depth=2)
    c = await cluster(model, split_plan(model, 2))
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://{c.http_url}/v2/models/mlp/infer") as r:
            assert r.status == 405
            assert r.content_type == "application/json"
            assert r.headers["Allow"] == "POST"
            assert (await r.json())["error"] == (
                "method GET is not allowed on /v2/models/mlp/infer; use POST"
            )
        async with s.post(f"http://{c.http_url}/v2/health/ready") as r:
            assert r.status == 405
            assert "use GET" in (await r.json())["error"]
        async with s.get(f"http://{c.http_url}/v2/health/ready") as r:
            assert r.status == 200


def _x(data: object = list(range(8)), **fields: object) -> bytes:
    """A body with input x of the mlp, its `fields` changed (no 'data' when it is None)."""
    entry = {"name": "x", "shape": [1, 8], "datatype": "FP32", "data": data, **fields}
    return json.dumps({"inputs": [{k: v for k, v in entry.items() if v is not None}]}).encode()


def _body(**fields: object) -> bytes:
    """A good body with `fields` added at its top level."""
    return json.dumps({**json.loads(_x()), **fields}).encode()


# Bodies that the gateway must refuse with 400, and a word of the message each gets.
BAD_BODIES: list[tuple[bytes, str]] = [
    (b"hello", "not valid JSON"),
    (b"", "not valid JSON"),
    (b"\xff\xfe\x00\x01", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "too deeply"),  # was a 500
    (b'{"inputs": {"x": 1}}', "'inputs' list"),
    # An integer longer than Python converts was a 500 with a traceback.
    (b'{"inputs": [{"name": "x", "shape": [1, 8], "datatype": "INT64", "data": [1, '
     + b"9" * 5000 + b"]}]}", "input 'x' (inputs[0].data[1]) holds an integer of 5000 digits"),
    (b'{"id": ' + b"9" * 5000 + b', "inputs": []}', "id holds an integer of 5000 digits"),
    (b'{"id": {"a": 1}, "inputs": []}', "'id' must be a string"),  # was echoed as "{'a': 1}"
    (b'{"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": [1, 2]}]}',
     "holds 2 values, but shape [1, 8] needs 8"),
    (b'{"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": ["a"]}]}',
     "FP32 'data' must be JSON numbers"),
    (b'{"inputs": [{"name": "x", "shape": [1, 8], "datatype": "BF16", "data": [1]}]}',
     "'BF16' is not supported"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [1]}]}',
     "input 'x': 'data' holds 1, but BYTES 'data' must be strings"),
    (b'{"inputs": [{"name": "x", "shape": [-1, 8], "datatype": "FP32", "data": [1]}]}',
     "negative dimension"),
    (b'{"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": [1, 2, 3, 4, '
     b'5, 6, 7, 8]}], "outputs": [{"name": "nope"}]}', "unknown output 'nope'"),
    # Values of the wrong JSON type were converted (strings parsed, null as NaN, true as 1).
    (_x(data=["1", "2", "3", "4", "5", "6", "7", "8"]), 'holds "1", but FP32 \'data\' must be'),
    (_x(data=[1, 2, 3, 4, 5, 6, 7, None]), "holds null, but FP32 'data' must be JSON numbers"),
    (_x(data=[[1, 2, 3, 4], [5, 6, 7, True]]), "holds true, but FP32 'data' must be"),
    (_x(datatype="INT64", data=[1, 2, 3, 4, 5, 6, 7, 8.5]), "INT64 'data' must be JSON integers"),
    (_x(datatype="BOOL", data=[1, 0, 1, 0, 1, 0, 1, 0]), "BOOL 'data' must be true or false"),
    (_x(datatype="UINT8", data=[1, 2, 3, 4, 5, 6, 7, 256]), "a value in 'data' overflows UINT8"),
    # Element counts wrapped around in int64 ("needs 0", a negative count, or a 500).
    (_x(shape=[2**62, 2**62]), f"needs {2**124}"),
    (_x(shape=[2**63]), "a dimension above 2**63 - 1"),
    (_x(shape=[99999999999999999999999]), "a dimension above 2**63 - 1"),
    # Parameters that are not objects were a 500 (AttributeError).
    (_x(parameters=[1]), "input 'x': 'parameters' must be a JSON object, not [1]"),
    (_body(parameters="x"), "the request: 'parameters' must be a JSON object"),
    (_body(outputs=[{"name": "y", "parameters": [1]}]), "output 'y': 'parameters' must be"),
    # binary_data_size "32" was said to run past the data, true was taken as 1; data given
    # with it was ignored, and binary_data "no" was taken as true.
    (_x(data=None, parameters={"binary_data_size": "32"}), 'not "32"'),
    (_x(data=None, parameters={"binary_data_size": True}), "non-negative integer"),
    (_x(parameters={"binary_data_size": 0}), "give 'data' or parameters.binary_data_size"),
    (_body(outputs=[{"name": "y", "parameters": {"binary_data": "no"}}]),
     "output 'y': parameter 'binary_data' must be true or false"),
    (_body(parameters={"binary_data_output": 1}), "'binary_data_output' must be true or false"),
]  # fmt: skip


async def test_garbage_among_good_requests(cluster) -> None:
    """Bad HTTP bodies and bad gRPC messages, all at once with good requests on both
    protocols: each bad one gets its error, each good one the model's outputs, and the gateway
    stays ready."""
    model = models.mlp(width=8, depth=2)
    c = await cluster(model, split_plan(model, 2))
    x = models.random_inputs(model)["x"]
    client = AsyncInferenceClient(c.grpc_url)
    url = f"http://{c.http_url}/v2/models/mlp/infer"
    raw = codec.encode_infer_request("mlp", {"x": x})
    short = oip.ModelInferRequest.FromString(raw)
    short.raw_input_contents[0] = x.tobytes()[:-4]
    bad_grpc = [b"\xff\xff\xff\xff\x0f", short.SerializeToString()]

    async with aiohttp.ClientSession() as s, grpc.aio.insecure_channel(c.grpc_url) as channel:
        infer = channel.unary_unary(INFER)

        async def bad_http(body: bytes, needle: str) -> None:
            async with s.post(url, data=body) as r:
                assert r.status == 400, (body[:60], await r.text())
                assert needle in (await r.json())["error"]

        async def bad_rpc(payload: bytes) -> None:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await infer(payload, timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        async def good_http() -> np.ndarray:
            async with s.post(url, json=good_body(x)) as r:
                assert r.status == 200
                return np.array((await r.json())["outputs"][0]["data"], np.float32)

        async def good_rpc() -> np.ndarray:
            return (await client.infer("mlp", {"x": x}, timeout_s=30))["y"].ravel()

        calls = []
        for _ in range(5):
            calls += [bad_http(body, needle) for body, needle in BAD_BODIES]
            calls += [bad_rpc(payload) for payload in bad_grpc]
            calls += [good_http(), good_rpc()]
        results = await asyncio.gather(*calls)
        goods = [r for r in results if r is not None]
        assert len(goods) == 10
        for got in goods:
            np.testing.assert_allclose(got, goods[0], rtol=1e-6)
        async with s.get(f"http://{c.http_url}/v2/health/ready") as r:
            assert r.status == 200
    await client.close()


def _extra_raw(r: oip.ModelInferRequest) -> None:
    r.raw_input_contents.append(b"\0" * 32)


def _fp8(r: oip.ModelInferRequest) -> None:
    r.inputs[0].datatype = "FP8"


def _negative(r: oip.ModelInferRequest) -> None:
    r.inputs[0].shape[0] = -1


def _twice_the_rows(r: oip.ModelInferRequest) -> None:
    r.inputs[0].shape[0] = 2


def _huge_typed(r: oip.ModelInferRequest) -> None:
    """No values for 2**124 of them: the count wrapped to 0 in int64, then numpy raised (500)."""
    del r.raw_input_contents[:]
    r.inputs[0].shape[:] = [2**62, 2**62]
    r.inputs[0].contents.fp32_contents.extend([])


def _int_overflow(r: oip.ModelInferRequest) -> None:
    del r.raw_input_contents[:]
    r.inputs[0].datatype = "INT8"
    r.inputs[0].contents.int_contents.extend([1000] * 8)


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (_extra_raw, "raw_input_contents has 2 entries for 1 inputs"),
        (_fp8, "datatype 'FP8' is not supported"),
        (_negative, "negative dimension"),
        (_twice_the_rows, "raw contents hold 32 bytes, but FP32 [2, 8] needs 64"),
        (
            _huge_typed,
            f"contents.fp32_contents holds 0 values, but shape [{2**62}, {2**62}] needs {2**124}",
        ),
        (_int_overflow, "input 'x': a value in contents.int_contents overflows INT8"),
    ],
    ids=["raw-count", "dtype", "negative-dim", "length", "huge-count", "overflow"],
)
async def test_grpc_tensors_that_do_not_add_up(
    cluster, mutate: Callable[[oip.ModelInferRequest], None], needle: str
) -> None:
    model = models.mlp(width=8, depth=2)
    c = await cluster(model, split_plan(model, 2))
    x = models.random_inputs(model)["x"]
    request = oip.ModelInferRequest.FromString(codec.encode_infer_request("mlp", {"x": x}))
    mutate(request)
    async with grpc.aio.insecure_channel(c.grpc_url) as channel:
        infer = channel.unary_unary(INFER)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await infer(request.SerializeToString(), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in e.value.details()
        good = codec.encode_infer_request("mlp", {"x": x})
        assert codec.decode_infer_response(await infer(good, timeout=10))["y"].shape == (1, 8)


async def test_json_over_its_own_limit_is_413_and_binary_data_is_not(
    cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parsing JSON stalls the whole gateway, so its limit is far below the request limit; the
    same tensor as binary data (the binary-data extension) passes."""
    monkeypatch.setattr(oip_http, "MAX_JSON_BYTES", 4096)
    model = models.mlp(width=8, depth=2, batch=256)
    c = await cluster(model, split_plan(model, 2))
    x = models.random_inputs(model)["x"]  # 8 KiB as bytes, more as JSON
    url = f"http://{c.http_url}/v2/models/mlp/infer"
    binary = {"binary_data_size": x.nbytes}
    entry = {"name": "x", "shape": [256, 8], "datatype": "FP32", "parameters": binary}
    header = json.dumps({"inputs": [entry]}).encode()
    async with aiohttp.ClientSession() as s:
        async with s.post(url, json=good_body(x)) as r:
            assert r.status == 413
            assert "send large tensors as binary data" in (await r.json())["error"]
        headers = {oip_http.HEADER_LENGTH: str(len(header))}
        async with s.post(url, data=header + x.tobytes(), headers=headers) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["outputs"][0]["shape"] == [256, 8]


async def test_moirai_infer_of_a_tensor_over_the_size_limit_names_the_shapes(
    cluster, tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    """gRPC refuses it from its size alone (the inputs' fixed shapes bound the request), and
    `moirai infer` printed gRPC's words only: 'RESOURCE_EXHAUSTED: SERVER: Received message
    larger than max (64000061 vs. 65612)'. Now it names the shapes the model takes; the next
    good request is answered."""
    from moirai.cli import main

    model = models.mlp(width=8, depth=2)
    c = await cluster(model, split_plan(model, 2))
    huge = tmp_path / "huge.npy"
    np.save(huge, np.ones((1, 8, 1000, 100), np.float32))
    argv = ["infer", "--url", c.grpc_url, "--model", "mlp", "--input", f"x={huge}"]
    assert await asyncio.to_thread(main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the request is larger than the endpoint takes" in err[0], err
    assert "model 'mlp' takes x [1, 8] (-1: any size)" in err[0] and "Traceback" not in err[0]
    good = tmp_path / "good.npy"
    np.save(good, models.random_inputs(model)["x"])
    argv = ["infer", "--url", c.grpc_url, "--model", "mlp", "--input", f"x={good}"]
    assert await asyncio.to_thread(main, argv) == 0


async def test_moirai_infer_saves_an_output_whose_name_has_a_slash(
    cluster, tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    """PaddlePaddle's exports name outputs like 'save_infer_model/scale_0.tmp_1': `--save`
    wrote DIR/save_infer_model/scale_0.tmp_1.npy and failed on the missing folder, after the
    answer had been printed. Now the file is DIR/save_infer_model_scale_0.tmp_1.npy."""
    from moirai.cli import main

    model = models.mlp(width=8, depth=2)
    slashed = "save_infer_model/scale_0.tmp_1"
    for node in model.graph.node:
        node.output[:] = [slashed if t == "y" else t for t in node.output]
    model.graph.output[0].name = slashed
    c = await cluster(model, split_plan(model, 2))
    x = tmp_path / "x.npy"
    np.save(x, models.random_inputs(model)["x"])
    out = tmp_path / "out"
    argv = ["infer", "--url", c.grpc_url, "--model", "mlp", "--input", f"x={x}", "--save", str(out)]
    assert await asyncio.to_thread(main, argv) == 0, capsys.readouterr().err
    saved = np.load(out / "save_infer_model_scale_0.tmp_1.npy")
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": np.load(x)})[0]
    np.testing.assert_allclose(saved, want, rtol=1e-5, atol=1e-6)
