"""Clients that misbehave at the endpoint, over real loopback sockets: they leave mid-request,
flood it, send too much or too slowly. Each gets a clear status (or, gone, is counted as
CANCELLED, not as a server failure), and the server holds no more than its configured caps.

The front end here is `Stalled` (conftest): its one stage server never answers, so a request
stays in flight for as long as the test needs, without any timing."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import grpc
import numpy as np
import pytest

from stage_server.client import AsyncInferenceClient
from stage_server.protos import grpc_predict_v2_pb2 as oip
from stage_server.settings import EndpointConfig

from . import models

pytestmark = pytest.mark.timeout(60)


def _json_body(x: np.ndarray) -> bytes:
    entry = {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    return json.dumps({"inputs": [entry]}).encode()


async def _post(port: int, body: bytes, sent: int | None = None) -> asyncio.StreamWriter:
    """A raw HTTP request for the mlp, of which only the first `sent` bytes of body go out
    (all by default)."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    head = f"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    writer.write(head.encode() + body[:sent])
    await writer.drain()
    return writer


async def test_clients_that_leave_are_cancelled_not_internal_errors(stalled) -> None:
    """A gRPC call cancelled, and an HTTP connection closed while the request is served: each
    is counted CANCELLED (a disconnection was INTERNAL, with a traceback in the log), the
    request leaves the gateway, and the stage is told to drop it."""
    model = models.mlp(width=8, depth=2)
    s = await stalled(model)
    gateway = s.frontend.gateway
    x = models.random_inputs(model)["x"]
    client = AsyncInferenceClient(s.grpc_url)
    call = asyncio.ensure_future(client.infer("mlp", {"x": x}))
    await s.until(lambda: len(gateway.pending) == 1, "the gRPC request in flight")
    call.cancel()
    await s.until(lambda: s.errors("CANCELLED") == 1, "the gRPC cancellation counted")

    body = _json_body(x)
    writer = await _post(s.frontend.http_port, body)
    await s.until(lambda: len(gateway.pending) == 1, "the HTTP request in flight")
    writer.close()
    await s.until(lambda: s.errors("CANCELLED") == 2, "the HTTP disconnection counted")
    await s.until(lambda: not gateway.pending, "no request left in the gateway")
    await s.until(lambda: len(s.stage.failures) == 2, "both requests dropped on the chain")
    assert {code for _, code in s.stage.failures} == {"CANCELLED"}
    assert s.errors("INTERNAL") == 0
    with pytest.raises(asyncio.CancelledError):
        await call
    await client.close()


async def test_a_client_that_leaves_mid_body_is_cancelled(stalled) -> None:
    model = models.mlp(width=8, depth=2)
    s = await stalled(model)
    body = _json_body(models.random_inputs(model)["x"])
    writer = await _post(s.frontend.http_port, body, sent=len(body) // 2)
    await s.until(lambda: s.frontend.in_flight.count == 1, "the body being read")
    writer.close()
    await s.until(lambda: s.errors("CANCELLED") == 1, "the disconnection counted")
    assert s.frontend.in_flight.count == 0
    assert s.errors("INTERNAL") == 0 and not s.stage.deliveries


async def test_requests_over_the_cap_in_flight_are_shed(stalled) -> None:
    """At `max_in_flight` requests held, over gRPC and HTTP together, one more is refused at
    once with RESOURCE_EXHAUSTED / 429, and a place that frees up serves again."""
    model = models.mlp(width=8, depth=2)
    s = await stalled(model, endpoint=EndpointConfig(max_in_flight=3))
    gateway = s.frontend.gateway
    x = models.random_inputs(model)["x"]
    client = AsyncInferenceClient(s.grpc_url)
    held = [asyncio.ensure_future(client.infer("mlp", {"x": x})) for _ in range(2)]
    writer = await _post(s.frontend.http_port, _json_body(x))
    await s.until(lambda: len(gateway.pending) == 3, "three requests in flight")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await client.infer("mlp", {"x": x})
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-in-flight" in e.value.details()
    async with aiohttp.ClientSession() as session:
        url = f"http://{s.http_url}/v2/models/mlp/infer"
        async with session.post(url, data=_json_body(x)) as r:
            assert r.status == 429
            assert "its limit (--max-in-flight): retry later" in (await r.json())["error"]
        async with session.get(f"http://{s.http_url}/v2/health/ready") as r:
            assert r.status == 200  # only inference is shed
    assert s.errors("RESOURCE_EXHAUSTED") == 2 and len(gateway.pending) == 3
    held[0].cancel()
    await s.until(lambda: s.frontend.in_flight.count == 2, "a place freed")
    held.append(asyncio.ensure_future(client.infer("mlp", {"x": x})))
    await s.until(lambda: len(gateway.pending) == 3, "the place taken again")
    writer.close()
    for call in held:
        call.cancel()
    await asyncio.gather(*held, return_exceptions=True)
    await client.close()


async def _answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """The status and JSON body of an HTTP response (read whole: Content-Length)."""
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
    return status, json.loads(await reader.readexactly(length))


@pytest.mark.parametrize(
    ("headers", "needle"),
    [
        ({}, "over the 16777216 bytes that the gateway parses: send large tensors as binary"),
        ({"Inference-Header-Content-Length": "100"},
         "over its 100-byte JSON and the 32 bytes that model 'mlp' takes as inputs"),
        ({"Inference-Header-Content-Length": str(32 << 20)}, "the request's JSON is 33554432"),
    ],
    ids=["json", "binary", "json-header"],
)  # fmt: skip
async def test_a_900_mb_body_is_refused_before_a_byte_of_it_is_read(
    stalled, headers: dict[str, str], needle: str
) -> None:
    """The gateway read such a body whole (peaking at 1.95 GB) before refusing it. Now its
    declared length is enough: the 413 comes back while not a byte of the body was sent."""
    s = await stalled(models.mlp(width=8, depth=2))
    reader, writer = await asyncio.open_connection("127.0.0.1", s.frontend.http_port)
    lines = [
        "POST /v2/models/mlp/infer HTTP/1.1",
        "Host: x",
        "Content-Length: 900000000",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    status, body = await _answer(reader)
    assert status == 413 and needle in body["error"]
    assert s.frontend.in_flight.count == 0 and not s.stage.deliveries
    writer.close()


async def test_a_body_without_a_length_stops_being_read_past_its_limit(stalled) -> None:
    """Chunked: the server reads until the body passes the request limit, then answers 413
    without waiting for the rest (which never comes)."""
    s = await stalled(models.mlp(width=8, depth=2), max_request_bytes=4096)
    reader, writer = await asyncio.open_connection("127.0.0.1", s.frontend.http_port)
    head = "POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    writer.write(head.encode() + b"1388\r\n" + b" " * 5000 + b"\r\n")  # 5000 bytes, no end
    status, body = await _answer(reader)
    assert status == 413
    assert body["error"] == (
        "the request's body is over the 4096 bytes allowed (--max-request-bytes)"
    )
    writer.close()


async def test_a_body_that_arrives_too_slowly_is_refused(stalled) -> None:
    model = models.mlp(width=8, depth=2)
    s = await stalled(model, timeout_s=0.5)
    body = _json_body(models.random_inputs(model)["x"])
    reader, writer = await asyncio.open_connection("127.0.0.1", s.frontend.http_port)
    head = f"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    writer.write(head.encode() + body[:10])  # and nothing more
    status, answer = await _answer(reader)
    assert status == 408
    assert answer["error"] == "the request's body did not arrive within 0.5 s (the request timeout)"
    assert s.errors("DEADLINE_EXCEEDED") == 1 and s.frontend.in_flight.count == 0
    writer.close()


@pytest.mark.parametrize(
    "sent",
    [
        b"",
        b"GET /v2/health/live HTTP/1.1\r\nHo",
        b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
    ids=["nothing", "half-headers", "after-a-request"],
)
async def test_idle_http_connections_are_closed(stalled, sent: bytes) -> None:
    s = await stalled(models.mlp(width=8, depth=2), endpoint=EndpointConfig(idle_timeout_s=0.3))
    reader, writer = await asyncio.open_connection("127.0.0.1", s.frontend.http_port)
    writer.write(sent)
    if sent.endswith(b"\r\n\r\n"):
        status, answer = await _answer(reader)
        assert status == 200 and answer == {"live": True}
    assert await asyncio.wait_for(reader.read(), 20) == b""  # closed by the server
    writer.close()


async def test_idle_grpc_connections_are_closed(stalled) -> None:
    s = await stalled(models.mlp(width=8, depth=2), endpoint=EndpointConfig(idle_timeout_s=0.3))
    async with grpc.aio.insecure_channel(s.grpc_url) as channel:
        ready = channel.unary_unary(
            "/inference.GRPCInferenceService/ServerReady",
            request_serializer=oip.ServerReadyRequest.SerializeToString,
            response_deserializer=oip.ServerReadyResponse.FromString,
        )
        assert (await ready(oip.ServerReadyRequest(), timeout=10)).ready
        assert channel.get_state() == grpc.ChannelConnectivity.READY
        await s.until(
            lambda: channel.get_state() == grpc.ChannelConnectivity.IDLE,
            "the server closing the idle connection",
        )
