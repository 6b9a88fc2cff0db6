"""Who may call: the shared secrets of a deployment and where they are checked.

Two secrets, each optional, each a plain token compared in constant time:

- the **chain token**, shared by the servers of one deployment (`moirai serve` makes one for its
  processes; on Kubernetes a Secret per PlacedModel). Every push and failure report on the chain
  carries it: over gRPC as the `moirai-chain-token` metadata, over the same-host fast path as
  the first frame of a connection (`hello`). A server given a token refuses calls without it with
  UNAUTHENTICATED. `grpc.health.v1` stays open on every port: the kubelet's probes and the
  gateway's health watch carry no token, and a health status tells nothing about requests;
- the **endpoint token**, which clients of the public endpoint present as `authorization: Bearer
  <token>` (gRPC metadata or HTTP header, as tritonclient's `headers=` sends it). Liveness and
  readiness stay open (`/v2/health/*`, `ServerLive`, `ServerReady`, `grpc.health.v1`); every other
  route and method needs it (401 / UNAUTHENTICATED).

On gRPC the check is a generic handler in front of the service's (`GrpcGuard`): gRPC asks it for
the method's handler with the call's metadata before the request message is read, so a call
without the token is refused without receiving its message, and the check is one loop over the
metadata, not an interceptor's extra coroutine per call. Without a token nothing is wrapped and
nothing is checked.

A front end that forwards requests to another (the shared endpoint on Kubernetes, with its
`stage_server.remote.RemoteModel`s) holds no endpoint token of its own: the transports put the
`authorization` that each client sent in `client_authorization` while its request is served, and
the forwarder passes it on as it came, so that the model's own gateway checks it.

Tokens come from a file (`--chain-token-file`, `--auth-token-file`: a mounted Secret) or the
environment (`MOIRAI_CHAIN_TOKEN`, `MOIRAI_AUTH_TOKEN`), never from a command-line value, which
every user of the machine can read in /proc.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable, Iterable
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web

from moirai.errors import MoiraiError
from stage_server.errors import Unauthenticated

CHAIN_TOKEN_ENV = "MOIRAI_CHAIN_TOKEN"
AUTH_TOKEN_ENV = "MOIRAI_AUTH_TOKEN"
CHAIN_METADATA = "moirai-chain-token"
HELLO = b"\0moirai-hello\0"
"""Starts the first frame of a same-host connection, followed by the chain token. No push starts
so (a protobuf field number is never 0)."""
HELLO_MAX_BYTES = 1024
"""The longest first frame a same-host listener reads before it knows who is calling."""


def read_token(path: str | None, env: str, flag: str) -> str | None:
    """The token in the file `path` (surrounding whitespace removed), else in the environment
    variable `env`; None when neither gives one. `flag` names the file's flag in errors."""
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
            raise MoiraiError(f"{flag} {path}: cannot read the token ({reason})") from None
        token = text.strip()
        if not token:
            raise MoiraiError(f"{flag} {path}: the file is empty; write the token into it")
        return token
    return os.environ.get(env, "").strip() or None


def matches(given: str | bytes, token: bytes) -> bool:
    if isinstance(given, str):
        given = given.encode("utf-8", "surrogateescape")
    return hmac.compare_digest(given, token)


# -------------------------------------------------------------------- gRPC
class GrpcGuard(grpc.GenericRpcHandler):
    """A generic handler that hands out `inner`'s method handlers only to calls whose metadata
    `key` holds `prefix` + the token; methods named in `open_methods` (full paths) to anyone."""

    def __init__(
        self,
        inner: grpc.GenericRpcHandler,
        token: str,
        key: str,
        prefix: str = "",
        open_methods: Iterable[str] = (),
        what: str = "",
    ) -> None:
        self._inner = inner
        self._expected = (prefix + token).encode()
        self._key = key
        self._open = frozenset(open_methods)
        self._refused = grpc.stream_unary_rpc_method_handler(_refuse(what))

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._inner.service(details)
        if handler is None or details.method in self._open:
            return handler
        for key, value in details.invocation_metadata or ():
            if key == self._key and matches(value, self._expected):
                return handler
        return self._refused


def _refuse(what: str) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[None]]:
    """A handler that refuses the call with UNAUTHENTICATED. Stream-unary, so that gRPC hands it
    the request unread: it is never read."""

    async def refuse(requests: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, what)

    return refuse


def endpoint_guard(
    inner: grpc.GenericRpcHandler, token: str | None, open_methods: Iterable[str]
) -> grpc.GenericRpcHandler:
    """`inner` behind the endpoint token (itself when there is none)."""
    if token is None:
        return inner
    return GrpcGuard(
        inner,
        token,
        "authorization",
        "Bearer ",
        open_methods,
        "this endpoint needs a token: send it as 'authorization: Bearer <token>' metadata",
    )


def chain_guard(inner: grpc.GenericRpcHandler, token: str) -> GrpcGuard:
    return GrpcGuard(
        inner,
        token,
        CHAIN_METADATA,
        what="the chain of this deployment needs its token (the servers' MOIRAI_CHAIN_TOKEN or "
        "--chain-token-file differ)",
    )


def chain_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """The metadata a chain call carries."""
    return None if token is None else ((CHAIN_METADATA, token),)


# -------------------------------------------------------------------- HTTP
def http_guard(token: str, open_prefixes: tuple[str, ...]) -> Callable[..., Any]:
    """aiohttp middleware: requests outside `open_prefixes` need `Authorization: Bearer
    <token>` (401 otherwise)."""
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def guard(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if not request.path.startswith(open_prefixes):
            given = request.headers.get("Authorization", "")
            if not matches(given, expected):
                raise Unauthenticated(
                    "this endpoint needs a token: send it as 'Authorization: Bearer <token>'"
                )
        return await handler(request)

    return guard


# ------------------------------------------------- forwarding a client's
client_authorization: ContextVar[str | None] = ContextVar("client_authorization", default=None)
"""The `authorization` (header or metadata) of the client whose request is being served."""


class ServingClient:
    """While a request of a client that sent `authorization` is served (the transports'): a
    context manager. A class, not a generator's, because it wraps every request: half the cost."""

    __slots__ = ("_authorization", "_reset")

    def __init__(self, authorization: str | None) -> None:
        self._authorization = authorization

    def __enter__(self) -> None:
        self._reset = client_authorization.set(self._authorization)

    def __exit__(self, *exc: object) -> None:
        client_authorization.reset(self._reset)


def grpc_authorization(context: grpc.aio.ServicerContext) -> str | None:
    """The `authorization` metadata of a gRPC call, if any."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else None
    return None


def forwarded_metadata() -> tuple[tuple[str, str], ...] | None:
    """The metadata that passes the served client's `authorization` on (None: it sent none)."""
    given = client_authorization.get()
    return None if given is None else (("authorization", given),)


# --------------------------------------------------------- same-host path
def hello(token: str) -> bytes:
    """The first frame's payload of a same-host connection that carries `token`."""
    return HELLO + token.encode()


def check_hello(payload: bytes, token: bytes | None) -> bool:
    """Whether a first frame is a hello with the token (any hello when there is no token)."""
    if not payload.startswith(HELLO):
        return False
    return token is None or matches(payload[len(HELLO) :], token)
