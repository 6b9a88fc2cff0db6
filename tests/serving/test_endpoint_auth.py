"""The endpoint's bearer token and the chain token, over real sockets: a client without the
endpoint's token gets 401 / UNAUTHENTICATED on everything but liveness and readiness, before its
body is read; the processes of `moirai serve` share a chain token made for them, which no command
line shows, and refuse pushes without it. With a metrics port, `/metrics` is there alone, with no
token, and no longer on the HTTP port."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from moirai.runtime.local import LocalDeployment
from stage_server.chain import Peers, now_ms
from stage_server.client import AsyncInferenceClient, InferenceClient
from stage_server.errors import Unauthenticated
from stage_server.oip_grpc import SERVICE
from stage_server.protos import grpc_predict_v2_pb2 as oip
from stage_server.settings import EndpointConfig

from . import models
from .conftest import split_plan

pytestmark = pytest.mark.timeout(120)

TOKEN = "t0ken-of-the-endpoint"


def _reference(model: onnx.ModelProto, x: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString()).run(None, x)[0]


async def test_the_endpoint_answers_only_clients_with_its_token(cluster) -> None:
    model = models.mlp()
    c = await cluster(model, split_plan(model, 2), endpoint=EndpointConfig(auth_token=TOKEN))
    x = models.random_inputs(model)
    entry = {"name": "x", "shape": list(x["x"].shape), "datatype": "FP32"}
    body = json.dumps({"inputs": [{**entry, "data": x["x"].ravel().tolist()}]}).encode()
    infer = f"http://{c.http_url}/v2/models/mlp/infer"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://{c.http_url}/v2/health/ready") as r:
            assert r.status == 200  # probes carry no token
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            async with http.post(infer, data=body, headers=headers) as r:
                assert r.status == 401
                assert r.headers["WWW-Authenticate"] == 'Bearer realm="moirai"'
                assert "send it as 'Authorization: Bearer <token>'" in (await r.json())["error"]
        for path in ("/v2/models/mlp", "/metrics", "/v2/models"):
            async with http.get(f"http://{c.http_url}{path}") as r:
                assert r.status == 401
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with http.post(infer, data=body, headers=headers) as r:
            assert r.status == 200
            got = np.array((await r.json())["outputs"][0]["data"], np.float32)
        np.testing.assert_allclose(got, _reference(model, x).ravel(), rtol=1e-5, atol=1e-6)
    # Refused on its headers: a body of a gigabyte announced and never sent gets 401 at once.
    reader, writer = await asyncio.open_connection(*c.http_url.split(":"))
    writer.write(
        b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n"
    )
    status = await asyncio.wait_for(reader.readline(), 10)
    assert status.startswith(b"HTTP/1.1 401")
    writer.close()

    async with grpc.aio.insecure_channel(c.grpc_url) as channel:
        ready = channel.unary_unary(
            f"/{SERVICE}/ServerReady",
            request_serializer=oip.ServerReadyRequest.SerializeToString,
            response_deserializer=oip.ServerReadyResponse.FromString,
        )
        assert (await ready(oip.ServerReadyRequest(), timeout=5)).ready
        metadata = channel.unary_unary(
            f"/{SERVICE}/ModelMetadata",
            request_serializer=oip.ModelMetadataRequest.SerializeToString,
            response_deserializer=oip.ModelMetadataResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await metadata(oip.ModelMetadataRequest(name="mlp"), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for token in (None, "wrong"):
        client = AsyncInferenceClient(c.grpc_url, token)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.infer("mlp", x, timeout_s=5)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "'authorization: Bearer <token>'" in str(e.value.details())
        await client.close()
    client = AsyncInferenceClient(c.grpc_url, TOKEN)
    got = (await client.infer("mlp", x, timeout_s=10))["y"]
    np.testing.assert_allclose(got, _reference(model, x), rtol=1e-5, atol=1e-6)
    await client.close()


async def test_metrics_answer_on_their_own_port_only(cluster) -> None:
    """`--metrics-port`: `/metrics` answers there with no token, and is no route of the
    inference port (404 even with the token); the inference port still serves."""
    model = models.mlp()
    endpoint = EndpointConfig(auth_token=TOKEN, metrics_port=0)
    c = await cluster(model, split_plan(model, 2), endpoint=endpoint)
    port = c.gateway.metrics_port
    assert port not in (None, c.gateway.http_port, c.gateway.grpc_port)
    client = AsyncInferenceClient(c.grpc_url, TOKEN)
    await client.infer("mlp", models.random_inputs(model), timeout_s=10)
    await client.close()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
            assert r.status == 200
            assert "moirai_request_duration_seconds_count 1.0" in (await r.text()).splitlines()
        async with http.get(f"http://127.0.0.1:{port}/v2/models", headers=headers) as r:
            assert r.status == 404  # the metrics port serves nothing else
        async with http.get(f"http://{c.http_url}/metrics", headers=headers) as r:
            assert r.status == 404
        async with http.get(f"http://{c.http_url}/v2/models", headers=headers) as r:
            assert r.status == 200


def test_serve_processes_share_a_chain_token_that_no_command_line_shows(tmp_path: Path) -> None:
    """`LocalDeployment` (what `moirai serve` runs) makes a chain token and hands it to its
    children in their environment; the endpoint's token comes from a file. A push without the
    chain token, over gRPC or the same-host path, is refused."""
    model = models.mlp()
    path = tmp_path / "mlp.onnx"
    onnx.save(model, path)
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n")
    endpoint = EndpointConfig(auth_token=TOKEN, auth_token_file=str(token_file), metrics_port=0)
    plan = split_plan(model, 2)
    x = models.random_inputs(model)
    deployment = LocalDeployment(plan, path, tmp_path / "run", endpoint=endpoint)
    with deployment:
        for process in deployment.processes.values():
            command = Path(f"/proc/{process.pid}/cmdline").read_bytes()
            assert deployment.chain_token.encode() not in command
            assert TOKEN.encode() not in command
        with InferenceClient(deployment.grpc_url) as client:
            with pytest.raises(grpc.RpcError) as e:
                client.infer("mlp", x)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with InferenceClient(deployment.grpc_url, TOKEN) as client:
            np.testing.assert_allclose(
                client.infer("mlp", x)["y"], _reference(model, x), rtol=1e-5, atol=1e-6
            )
        stage = next(s for s in deployment.plan.stages if s.device == "cpu-1")
        addresses = {d: deployment.addresses[d] for d in plan.used_devices}

        async def push(same_host: bool, token: str | None) -> None:
            peers = Peers(deployment.plan, addresses, same_host=same_host, token=token)
            tensors = {n: np.zeros(deployment.plan.spec(n).shape, np.float32)
                       for n in stage.inputs}  # fmt: skip
            try:
                await peers.push(stage.id, "intruder", tensors, now_ms() + 5000)
            finally:
                await peers.close()

        for same_host in (True, False):
            with pytest.raises(Unauthenticated, match="needs its token"):
                asyncio.run(push(same_host, None))
        asyncio.run(push(False, deployment.chain_token))  # the deployment's own token passes
        # `--metrics-port` reaches the front end's process: /metrics there, with no token.
        assert deployment.metrics_url != deployment.http_url
        with urllib.request.urlopen(f"http://{deployment.metrics_url}/metrics") as response:
            assert b"moirai_request_duration_seconds_count" in response.read()
        request = urllib.request.Request(
            f"http://{deployment.http_url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request)
        assert e.value.code == 404
