"""Open Inference Protocol over HTTP/JSON (KServe v2 REST), a thin aiohttp adapter.

Routes: `/v2/health/live`, `/v2/health/ready`, `/v2`, `/v2/models` (the models served, as
KServe lists them), `POST /v2/repository/index` (each with its state, as Triton's repository
extension answers: what `tritonclient`'s `get_model_repository_index` reads),
`/v2/models/{name}[/versions/{v}]`, `.../ready`, `.../infer`, Triton's system shared-memory
routes (`/v2/systemsharedmemory/...`: `stage_server.regions`), and `/metrics` (Prometheus), unless
it has a port of its own (`create_metrics_app`, `--metrics-port`). Each
model route looks its model up in the front end's `Repository` (404 naming the models served).
Inference bodies are JSON, or JSON followed by raw tensor bytes under the binary-data extension
(`Inference-Header-Content-Length` gives the JSON's length), which is what tritonclient sends by
default; outputs come back as JSON `data` lists unless the request asks for binary outputs.
Errors become `{"error": message}` in `stage_server.transport.error_middleware`.

An inference body is read by `_read_body`, within limits (`stage_server.limits`): its request
takes a place among the requests in flight before a byte of it is read; a body whose declared
length is over its limit is refused (413) before it is read, one without a declared length stops
being read past it, and one that does not arrive within the request's timeout is refused (408).
Its limit is the smallest of the request limit (`--max-request-bytes`), `MAX_JSON_BYTES` for a
body of JSON alone, and, under the binary-data extension, the JSON's length plus what the model's
inputs take when their shapes are fixed. The body is received into one buffer of its declared
size, which the tensors are then read from, in place. String tensors, which take several times
their wire size decoded, count against the request limit as they are decoded (`codec.Budget`;
413 past it).

The JSON part of a request has a lower limit of its own, `MAX_JSON_BYTES` (413 too): the gateway
parses it on its event loop, holding the GIL (`json.loads` never lets go of it), so while it
parses, every other request on the gateway, gRPC included, waits. 40 MB of JSON took 4.5 s on a
busy 2-core machine; at the 1 GiB request limit, one client could stall the gateway past every
deadline. Large tensors travel as binary data or over gRPC, which cost no parsing.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from moirai import __version__
from stage_server import auth, codec
from stage_server.errors import ClientTimeout, InvalidInput, TooLarge
from stage_server.limits import InFlight
from stage_server.oip_grpc import PLATFORM, SERVER_NAME
from stage_server.regions import SharedMemoryRegions
from stage_server.repository import VERSION, Repository, described
from stage_server.transport import error_middleware

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_JSON_BYTES = 16 << 20
"""About 2 million values in `data` lists; a 224x224 RGB image takes 2-3 MB."""


OPEN_PREFIXES = ("/v2/health/",)
"""Routes that need no endpoint token: liveness and readiness, which probes call."""


def create_app(
    repository: Repository,
    max_request_bytes: int,
    in_flight: InFlight,
    regions: SharedMemoryRegions,
    token: str | None = None,
    metrics: bool = True,
) -> web.Application:
    """The app of `repository`'s models; `in_flight` counts inference requests, `regions` are
    the clients' shared memory (both shared with the gRPC transport); with `token`, every route
    but `OPEN_PREFIXES` needs it (`stage_server.auth`), checked before a request's body is
    read. `metrics`: serve `/metrics` too."""
    middlewares = [error_middleware(repository.metrics)]
    if token is not None:
        middlewares.append(auth.http_guard(token, OPEN_PREFIXES))
    app = web.Application(client_max_size=max_request_bytes, middlewares=middlewares)

    def ready_response(ready: bool) -> web.Response:
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def live(request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(request: web.Request) -> web.Response:
        return ready_response(repository.ready())

    async def server_metadata(request: web.Request) -> web.Response:
        extensions = ["system_shared_memory"] if regions.allowed else []
        return web.json_response(
            {"name": SERVER_NAME, "version": __version__, "extensions": extensions}
        )

    async def shm_status(request: web.Request) -> web.Response:
        found = regions.status(request.match_info.get("region", ""))
        return web.json_response(
            [
                {"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size}
                for r in found
            ]
        )

    async def shm_register(request: web.Request) -> web.Response:
        body = await _small_json(request)
        name = request.match_info["region"]
        key, offset, size = (body.get(k) for k in ("key", "offset", "byte_size"))
        if not isinstance(key, str) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in (offset or 0, size)
        ):
            raise InvalidInput(
                f"shared memory region {name!r}: give key (a string), byte_size and offset "
                "(integers)"
            )
        regions.register(name, key, offset or 0, size)
        return web.json_response({})

    async def shm_unregister(request: web.Request) -> web.Response:
        regions.unregister(request.match_info.get("region", ""))
        return web.json_response({})

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"models": repository.names})

    async def index(request: web.Request) -> web.Response:
        return web.json_response(repository.index())

    def model_of(request: web.Request) -> Any:
        return repository.get(request.match_info["name"], request.match_info.get("version", ""))

    async def model_metadata(request: web.Request) -> web.Response:
        plane = model_of(request)
        with auth.ServingClient(request.headers.get("Authorization")):
            await described(plane)
        return web.json_response(
            {
                "name": plane.model_name,
                "versions": [VERSION],
                "platform": PLATFORM,
                "inputs": [t.to_dict() for t in plane.inputs.values()],
                "outputs": [t.to_dict() for t in plane.outputs.values()],
            }
        )

    async def model_ready(request: web.Request) -> web.Response:
        return ready_response(model_of(request).ready())

    async def infer(request: web.Request) -> web.Response:
        plane = model_of(request)
        with in_flight, auth.ServingClient(request.headers.get("Authorization")):
            json_length = _json_length(request.headers.get(HEADER_LENGTH))
            limit, why = _body_limit(plane, max_request_bytes, json_length)
            body, spent = await _read_body(request, limit, why, plane.timeout_s)
            header, binary = _split(body, json_length)
            request_id = header.get("id")
            if not isinstance(request_id, str | None):
                raise InvalidInput(f"'id' must be a string, got {request_id!r:.40}")
            inputs, requested, binary_out, places = codec.decode_json_inputs(
                header, binary, regions.view, max_request_bytes
            )
            timeout = plane.timeout_s - spent if spent else None  # reading counts
            outputs = await plane.infer(inputs, requested, timeout, places)
        response, blobs = codec.encode_json_outputs(
            plane.model_name, request_id or "", outputs, binary_out, places
        )
        text = json.dumps(response).encode()
        if not blobs:
            return web.Response(body=text, content_type="application/json")
        return web.Response(
            body=b"".join([text, *blobs]),
            headers={HEADER_LENGTH: str(len(text))},
            content_type="application/octet-stream",
        )

    model = "/v2/models/{name}"
    versioned = "/v2/models/{name}/versions/{version}"
    app.add_routes(
        [
            web.get("/v2/health/live", live),
            web.get("/v2/health/ready", ready),
            web.get("/v2", server_metadata),
            web.get("/v2/models", models),
            web.post("/v2/repository/index", index),
            web.get(model, model_metadata),
            web.get(versioned, model_metadata),
            web.get(f"{model}/ready", model_ready),
            web.get(f"{versioned}/ready", model_ready),
            web.post(f"{model}/infer", infer),
            web.post(f"{versioned}/infer", infer),
            web.get("/v2/systemsharedmemory/status", shm_status),
            web.get("/v2/systemsharedmemory/region/{region}/status", shm_status),
            web.post("/v2/systemsharedmemory/region/{region}/register", shm_register),
            web.post("/v2/systemsharedmemory/unregister", shm_unregister),
            web.post("/v2/systemsharedmemory/region/{region}/unregister", shm_unregister),
        ]
    )
    if metrics:
        app.add_routes([_metrics_route(repository)])
    return app


def create_metrics_app(repository: Repository) -> web.Application:
    """`/metrics` alone, with no token: for a port of its own that only scrapers reach."""
    app = web.Application()
    app.add_routes([_metrics_route(repository)])
    return app


def _metrics_route(repository: Repository) -> web.RouteDef:
    async def metrics(request: web.Request) -> web.Response:
        response = web.Response(body=repository.exposition())
        response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return response

    return web.get("/metrics", metrics)


def _json_length(header: str | None) -> int | None:
    """The length of the JSON part of the body under the binary-data extension (None: the body
    is JSON alone)."""
    if header is None:
        return None
    try:
        length = int(header)
    except ValueError:
        raise InvalidInput(f"{HEADER_LENGTH} is {header!r}, not a number") from None
    if length < 0:
        raise InvalidInput(f"{HEADER_LENGTH} is {length}: give the JSON's length in bytes")
    if length > MAX_JSON_BYTES:
        raise TooLarge(f"the request's JSON is {length} bytes, over {_json_limit()}")
    return length


def _json_limit() -> str:
    """`MAX_JSON_BYTES` and what to do instead, in words (read when needed: tests lower it)."""
    return (
        f"the {MAX_JSON_BYTES} bytes that the gateway parses: send large tensors as binary data "
        "(the binary-data extension, tritonclient's default) or over gRPC"
    )


def _body_limit(plane: Any, max_request_bytes: int, json_length: int | None) -> tuple[int, str]:
    """The most bytes an inference body for `plane` may hold, and why, in words."""
    inputs = getattr(plane, "input_bytes", None)  # None: shapes not fixed, or not known here
    if json_length is None:
        if max_request_bytes > MAX_JSON_BYTES:
            return MAX_JSON_BYTES, _json_limit()
    elif inputs is not None and json_length + inputs < max_request_bytes:
        return json_length + inputs, (
            f"its {json_length}-byte JSON and the {inputs} bytes that model "
            f"{plane.model_name!r} takes as inputs"
        )
    return max_request_bytes, f"the {max_request_bytes} bytes allowed (--max-request-bytes)"


SMALL_JSON_BYTES = 64 << 10
"""The body of a call that is not an inference (a shared-memory registration) at most."""


async def _small_json(request: web.Request) -> dict[str, Any]:
    """The JSON object of a small body (`SMALL_JSON_BYTES`)."""
    if (request.content_length or 0) > SMALL_JSON_BYTES:
        raise TooLarge(f"the body takes {request.content_length} bytes; at most {SMALL_JSON_BYTES}")
    body = await request.content.read(SMALL_JSON_BYTES + 1)
    if len(body) > SMALL_JSON_BYTES:
        raise TooLarge(f"the body takes more than {SMALL_JSON_BYTES} bytes")
    try:
        parsed = json.loads(body or b"{}")
    except ValueError as e:
        raise InvalidInput(f"the body is not JSON: {e}") from None
    if not isinstance(parsed, dict):
        raise InvalidInput("the body must be a JSON object")
    return parsed


async def _read_body(
    request: web.Request, limit: int, why: str, timeout_s: float
) -> tuple[bytearray, float]:
    """The request's body, read within `limit` bytes and `timeout_s` seconds, and the seconds
    its reading took (0 when it had all arrived with the headers)."""
    length = request.content_length
    if length is not None and length > limit:
        raise TooLarge(f"the request's body is {length} bytes, over {why}")
    content = request.content
    if content.is_eof():  # arrived whole with the headers: no timer
        return await _receive(content, length, limit, why), 0.0
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        async with asyncio.timeout(timeout_s):
            body = await _receive(content, length, limit, why)
    except TimeoutError:
        raise ClientTimeout(
            f"the request's body did not arrive within {timeout_s:g} s (the request timeout)"
        ) from None
    return body, loop.time() - start


async def _receive(content: Any, length: int | None, limit: int, why: str) -> bytearray:
    """Read the body into one buffer: of its declared `length`, or grown up to `limit`."""
    if length is None:
        body = bytearray()
        while chunk := await content.readany():
            body += chunk
            if len(body) > limit:
                raise TooLarge(f"the request's body is over {why}")
        return body
    body = bytearray(length)
    view = memoryview(body)
    received = 0
    while received < length:
        chunk = await content.readany()
        if not chunk:
            raise InvalidInput(f"the body ended after {received} of its {length} bytes")
        view[received : received + len(chunk)] = chunk
        received += len(chunk)
    return body


def _split(body: bytearray, length: int | None) -> tuple[dict[str, Any], memoryview]:
    """The JSON header and the binary tensor data after it (a read-only view: the tensors are
    read where they were received)."""
    if length is None:
        length = len(body)
    elif length > len(body):
        raise InvalidInput(f"{HEADER_LENGTH} {length} is outside the {len(body)}-byte body")
    text = body if length == len(body) else body[:length]
    try:
        header = json.loads(text)
    except RecursionError:  # the decoder recurses once per level of nesting
        raise InvalidInput("request body nests JSON arrays or objects too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer too long
        if "integer string conversion" in str(e):
            raise InvalidInput(_long_integer(text)) from None
        raise InvalidInput(f"request body is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise InvalidInput("request body must be a JSON object")
    return header, memoryview(body).toreadonly()[length:]


class _LongInteger(int):
    """Stands in for a JSON integer longer than Python converts (`sys.get_int_max_str_digits`)."""

    digits = 0


def _long_integer(text: bytes | bytearray) -> str:
    """The message for a body that holds an integer too long to convert, naming the input (or
    the field) that holds it. The body is parsed again for it, on this error path only, with
    such integers left unconverted."""
    limit = sys.get_int_max_str_digits()

    def parse_int(literal: str) -> int:
        digits = len(literal.lstrip("-"))
        if digits <= limit:
            return int(literal)
        marker = _LongInteger()
        marker.digits = digits
        return marker

    def find(value: Any, path: tuple[str | int, ...]) -> tuple[tuple[str | int, ...], int]:
        if isinstance(value, _LongInteger):
            return path, value.digits
        if isinstance(value, dict | list):
            for key, item in value.items() if isinstance(value, dict) else enumerate(value):
                found = find(item, (*path, key))
                if found[0]:
                    return found
        return (), 0

    try:
        body = json.loads(text, parse_int=parse_int)
        path, digits = find(body, ())
    except (ValueError, RecursionError):  # invalid further on: say what was found first
        return f"request body holds an integer of more than {limit} digits"
    where = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path).lstrip(".")
    where = where or "request body"
    entry = body["inputs"][path[1]] if path[:1] == ("inputs",) and len(path) > 1 else None
    if isinstance(entry, dict) and isinstance(entry.get("name"), str):
        where = f"input {entry['name']!r} ({where})"
    return f"{where} holds an integer of {digits} digits: no tensor datatype holds one that long"
