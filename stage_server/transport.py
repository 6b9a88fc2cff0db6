"""Where serving errors become status codes: one gRPC handler wrapper and one HTTP middleware.

Both use `stage_server.errors.status_of`, the only table of codes. Handlers raise domain errors
(`ServingError`, or any `MoiraiError`) and never call `context.abort` or build error responses
themselves; an unexpected exception is logged with its traceback and answered INTERNAL / 500.
Errors are counted by code here when a `Metrics` is given, so the count covers every failure a
client sees, whether raised while decoding, validating or serving. A client that goes away (a
gRPC call cancelled, an HTTP connection closed while its request is read or served) is counted
as CANCELLED: it is the client's doing, not the server's failure.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import grpc
from aiohttp import web
from prometheus_client import Counter

from moirai.errors import MoiraiError
from stage_server.errors import Cancelled, NotFound, TooLarge, status_of

log = logging.getLogger(__name__)


def _describe(error: BaseException) -> str:
    if isinstance(error, MoiraiError):
        return str(error)
    log.exception("unexpected error while serving", exc_info=error)
    return f"internal error: {type(error).__name__}: {error}"


Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


class CountsErrors(Protocol):
    """Where errors are counted: a model's `Metrics`, or a front end's of several models."""

    errors: Counter


def guarded(handler: Handler, metrics: CountsErrors | None = None) -> Handler:
    """`handler` with the exceptions escaping it mapped to status codes.

    Each method is wrapped once, when it is registered (`add_to_server` of `oip_grpc` and
    `chain`), rather than by a server interceptor, which gRPC runs as extra coroutines on every
    call: on the front end's hot path that is a measurable part of a small request's cost."""

    async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(request, context)
        except asyncio.CancelledError:  # the client cancelled or went away
            if metrics is not None:
                metrics.errors.labels(grpc.StatusCode.CANCELLED.name).inc()
            raise
        except Exception as error:
            if isinstance(error, grpc.aio.AbortError):
                raise
            code, _ = status_of(error)
            if metrics is not None:
                metrics.errors.labels(code.name).inc()
            await context.abort(code, _describe(error))

    return unary_unary


def error_middleware(metrics: CountsErrors | None = None) -> Callable[..., Any]:
    """aiohttp middleware: errors become `{"error": message}` with their HTTP status.

    aiohttp's own "body too large" and "no such route" become the domain errors `TooLarge` and
    `NotFound` first, so they too get their status from the one table; its "method not allowed"
    keeps its 405 and `Allow` header, with the same JSON body. A 401 carries `WWW-Authenticate`.
    """

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            try:
                return await handler(request)
            except web.HTTPRequestEntityTooLarge as e:
                raise TooLarge(f"{e.text} (the gateway's --max-request-bytes)") from None
            except web.HTTPNotFound:
                raise NotFound(f"no such resource: {request.path}") from None
            except ConnectionResetError:  # lost while its body was read: no one to answer
                raise Cancelled("the client closed the connection") from None
        except asyncio.CancelledError:  # lost while served (the server cancels the handler)
            if metrics is not None:
                metrics.errors.labels(grpc.StatusCode.CANCELLED.name).inc()
            raise
        except web.HTTPMethodNotAllowed as e:
            allowed = ", ".join(sorted(e.allowed_methods))
            message = f"method {e.method} is not allowed on {request.path}; use {allowed}"
            return web.json_response({"error": message}, status=405, headers={"Allow": allowed})
        except web.HTTPException:
            raise
        except Exception as error:
            code, status = status_of(error)
            if metrics is not None:
                metrics.errors.labels(code.name).inc()
            # RFC 6750: a 401 names the scheme it wants.
            headers = {"WWW-Authenticate": 'Bearer realm="moirai"'} if status == 401 else None
            return web.json_response({"error": _describe(error)}, status=status, headers=headers)

    return middleware
