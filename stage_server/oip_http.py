"""Open Inference Protocol over HTTP/JSON (KServe v2 REST), a thin aiohttp adapter.

Routes: `/v2/health/live`, `/v2/health/ready`, `/v2`, `/v2/models` (the models served, as
KServe lists them), `POST /v2/repository/index` (each with its state, as Triton's repository
extension answers: what `tritonclient`'s `get_model_repository_index` reads),
`/v2/models/{name}[/versions/{v}]`, `.../ready`, `.../infer`, and `/metrics` (Prometheus). Each
model route looks its model up in the front end's `Repository` (404 naming the models served).
Inference bodies are JSON, or JSON followed by raw tensor bytes under the binary-data extension
(`Inference-Header-Content-Length` gives the JSON's length), which is what tritonclient sends by
default; outputs come back as JSON `data` lists unless the request asks for binary outputs. The
size limit is aiohttp's `client_max_size` (413). Errors become `{"error": message}` in
`stage_server.transport.error_middleware`.

The JSON part of a request has a lower limit of its own, `MAX_JSON_BYTES` (413 too): the gateway
parses it on its event loop, holding the GIL (`json.loads` never lets go of it), so while it
parses, every other request on the gateway, gRPC included, waits. 40 MB of JSON took 4.5 s on a
busy 2-core machine; at the 1 GiB request limit, one client could stall the gateway past every
deadline. Large tensors travel as binary data or over gRPC, which cost no parsing.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from moirai import __version__
from stage_server import codec
from stage_server.errors import InvalidInput, TooLarge
from stage_server.oip_grpc import PLATFORM, SERVER_NAME
from stage_server.repository import VERSION, Repository
from stage_server.transport import error_middleware

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_JSON_BYTES = 16 << 20
"""About 2 million values in `data` lists; a 224x224 RGB image takes 2-3 MB."""


def create_app(repository: Repository, max_request_bytes: int) -> web.Application:
    app = web.Application(
        client_max_size=max_request_bytes, middlewares=[error_middleware(repository.metrics)]
    )

    def ready_response(ready: bool) -> web.Response:
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def live(request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(request: web.Request) -> web.Response:
        return ready_response(repository.ready())

    async def server_metadata(request: web.Request) -> web.Response:
        return web.json_response({"name": SERVER_NAME, "version": __version__, "extensions": []})

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"models": repository.names})

    async def index(request: web.Request) -> web.Response:
        return web.json_response(repository.index())

    def model_of(request: web.Request) -> Any:
        return repository.get(request.match_info["name"], request.match_info.get("version", ""))

    async def model_metadata(request: web.Request) -> web.Response:
        plane = model_of(request)
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
        body = await request.read()
        header, binary = _split(body, request.headers.get(HEADER_LENGTH))
        request_id = header.get("id")
        if not isinstance(request_id, str | None):
            raise InvalidInput(f"'id' must be a string, got {request_id!r:.40}")
        inputs, requested, binary_out = codec.decode_json_inputs(header, binary)
        outputs = await plane.infer(inputs, requested)
        response, blobs = codec.encode_json_outputs(
            plane.model_name, request_id or "", outputs, binary_out
        )
        text = json.dumps(response).encode()
        if not blobs:
            return web.Response(body=text, content_type="application/json")
        return web.Response(
            body=b"".join([text, *blobs]),
            headers={HEADER_LENGTH: str(len(text))},
            content_type="application/octet-stream",
        )

    async def metrics(request: web.Request) -> web.Response:
        response = web.Response(body=repository.exposition())
        response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return response

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
            web.get("/metrics", metrics),
        ]
    )
    return app


def _split(body: bytes, header_length: str | None) -> tuple[dict[str, Any], memoryview]:
    """The JSON header and the binary tensor data after it (a view: the tensors are read where
    they were received)."""
    if header_length is None:
        length = len(body)
    else:
        try:
            length = int(header_length)
        except ValueError:
            raise InvalidInput(f"{HEADER_LENGTH} is {header_length!r}, not a number") from None
        if not 0 <= length <= len(body):
            raise InvalidInput(f"{HEADER_LENGTH} {length} is outside the {len(body)}-byte body")
    if length > MAX_JSON_BYTES:
        raise TooLarge(
            f"the request's JSON is {length} bytes, over the {MAX_JSON_BYTES} that the gateway "
            "parses: send large tensors as binary data (the binary-data extension, "
            "tritonclient's default) or over gRPC"
        )
    text = body[:length]
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
    return header, memoryview(body)[length:]


class _LongInteger(int):
    """Stands in for a JSON integer longer than Python converts (`sys.get_int_max_str_digits`)."""

    digits = 0


def _long_integer(text: bytes) -> str:
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
