"""Clients that misbehave at the endpoint, over real loopback sockets: they leave mid-request,
flood it, send too much or too slowly. Each gets a clear status (or, gone, is counted as
CANCELLED, not as a server failure), and the server holds no more than its configured caps.

The front end here is `Stalled` (conftest): its one stage server never answers, so a request
stays in flight for as long as the test needs, without any timing."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from stage_server.client import AsyncInferenceClient

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
