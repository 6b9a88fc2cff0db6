"""The chain: how stage servers and the gateway hand a request's tensors to each other.

Both ends speak `moirai.stage.v1.Chain` (see `protos/stage.proto`). Outbound, `Peers` resolves a
stage id to the address of the server holding it, keeps one channel (and its method callables)
per address, and turns every failure into a serving error (`stage_server.errors`); inbound,
`ChainServicer` decodes each push and hands it to the process's `Router`, which hands it to its
`ChainHandler` (a stage server or the gateway). A target in the same process (`Router`) never
takes a transport: its pushes are handed over in memory. Neither end sees gRPC types beyond this
module.

Pushes are encoded and decoded by `stage_server.wire` (the proto's wire format, written without
copying tensor bytes through protobuf), so the Push method is registered with raw-bytes
(de)serialisers by `add_to_server`. A server registered through the generated
`stage_pb2_grpc.add_ChainServicer_to_server` works too (it receives parsed messages), only with
protobuf's copies.

Two transports carry the same pushes: gRPC, the general one (pods on different nodes), and the
same-host fast path (`stage_server.samehost`: a Unix socket, large tensors in shared memory),
which `Peers` takes for a peer on a loopback address whose chain port accepts it, falling back
to gRPC otherwise. `Fail` (rare) always takes gRPC.

Channels reconnect quickly (100 ms to 1 s back-off instead of gRPC's default of up to two
minutes), because a restarted stage server must be reachable again as soon as it listens. Message
sizes are unlimited on the chain: it is internal, and tensors of hundreds of MiB are legitimate.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import numpy as np

from moirai.stageplan import GATEWAY, StagePlan
from stage_server import auth, samehost, shm, wire
from stage_server.codec import datatype_name, numpy_dtype
from stage_server.errors import (
    DeadlineExceeded,
    InvalidInput,
    NotFound,
    SharedMemoryUnavailable,
    Unavailable,
    from_code,
)
from stage_server.protos import stage_pb2
from stage_server.transport import guarded

log = logging.getLogger(__name__)

SERVICE = "moirai.stage.v1.Chain"
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.enable_retries", 0),
]
RECONNECT_S = 1.0
"""How long a loopback peer whose fast path refused a connection gets gRPC before another try."""
RECONNECT_WAIT_S = 1.5
"""How long a call answered UNAVAILABLE waits for its channel to come back: the longest
reconnect back-off above, plus a margin."""


def now_ms() -> float:
    return time.time() * 1000.0


@dataclass(slots=True)
class Delivery:
    """Tensors of one request for one stage, as received."""

    request_id: str
    stage: str
    tensors: dict[str, np.ndarray]
    deadline_ms: float
    timings: tuple[bytes | wire.Timing, ...]
    """Timings of the stages upstream (`stage_server.wire`)."""
    origin: str
    places: Mapping[str, memoryview] | None = None
    """Where the client wants final outputs in its shared memory: handed along in memory only,
    from the front end of this process (`StageServer._run_now`)."""


class ChainHandler(Protocol):
    def deliver(self, delivery: Delivery) -> None: ...

    def failed(self, request_id: str, code: str, message: str, deadline_ms: float) -> None: ...


class Router:
    """The chain handlers that live in this process, by target: stage ids and device names of a
    stage server, "gateway" for the front end.

    It is the `ChainHandler` of the process's chain port (a push is handed to its target's
    handler; a failure report to every handler, since each keeps what it must drop), and
    `Peers` consults it before any transport: a push to a target in this process is delivered
    in memory, synchronously, with nothing copied or encoded. That is how a stage hands its
    outputs to the next stage on its device, and how a front end in a stage server's process
    hands model inputs to its stages and gets the final outputs back.

    What arrives from a transport is checked against the `plans` first (the plan of a stage
    server; every model's at a front end of several), since anyone who reaches the port could
    have sent it: a push may carry only tensors that a plan routes to its target, of that plan's
    datatype and shape, and no deadline (of a push or a failure report) later than
    `max_deadline_s` from now; later ones are brought forward to it, so that no caller can make
    a server keep a request's state longer. In-memory deliveries come from this process's own
    code and are not checked. Without plans, pushes are not checked (tests and link
    measurements)."""

    def __init__(self, plans: Sequence[StagePlan] = (), max_deadline_s: float = 60.0) -> None:
        self._by_target: dict[str, ChainHandler] = {}
        self._handlers: list[ChainHandler] = []
        self._max_deadline_ms = max_deadline_s * 1000.0
        # Per target, per tensor a plan routes to it: its dtypes and shapes (-1: any size).
        self._accepts: dict[str, dict[str, set[tuple[np.dtype, tuple[int, ...]]]]] | None = None
        if plans:
            self._accepts = {}
            for plan in plans:
                for name, consumers in plan.routing.items():
                    spec = plan.spec(name)
                    expected = (numpy_dtype(spec.datatype, name, "tensor"), tuple(spec.shape))
                    for target in consumers:
                        self._accepts.setdefault(target, {}).setdefault(name, set()).add(expected)

    def attach(self, targets: Iterable[str], handler: ChainHandler) -> None:
        for target in targets:
            self._by_target[target] = handler
        self._handlers.append(handler)

    def get(self, target: str) -> ChainHandler | None:
        return self._by_target.get(target)

    def deliver(self, delivery: Delivery) -> None:
        handler = self._by_target.get(delivery.stage)
        if handler is None:
            raise NotFound(f"no stage {delivery.stage!r} is served here")
        if self._accepts is not None:
            self._check(delivery)
        delivery.deadline_ms = min(delivery.deadline_ms, now_ms() + self._max_deadline_ms)
        handler.deliver(delivery)

    def _check(self, delivery: Delivery) -> None:
        assert self._accepts is not None
        accepts = self._accepts.get(delivery.stage, {})
        for name, array in delivery.tensors.items():
            expected = accepts.get(name)
            if expected is None:
                routed = ", ".join(accepts) or "no tensor"
                raise InvalidInput(
                    f"{delivery.stage} takes no tensor {name!r}: the plan routes {routed} to it"
                )
            if not any(_fits(array, dtype, shape) for dtype, shape in expected):
                planned = " or ".join(
                    f"{datatype_name(dtype)} {list(shape)}" for dtype, shape in expected
                )
                raise InvalidInput(
                    f"{delivery.stage}: tensor {name!r} is {datatype_name(array.dtype)} "
                    f"{list(array.shape)}, but the plan has {planned} (-1: any size)"
                )

    def failed(self, request_id: str, code: str, message: str, deadline_ms: float) -> None:
        deadline_ms = min(deadline_ms, now_ms() + self._max_deadline_ms)
        for handler in self._handlers:
            handler.failed(request_id, code, message, deadline_ms)


class ChainServicer:
    """Thin inbound adapter: decode, time the transfer, hand over."""

    def __init__(self, handler: ChainHandler) -> None:
        self._handler = handler

    def receive(self, payload: bytes, mappings: shm.Mappings | None = None) -> None:
        """One push, from either transport (`mappings`: the same-host connection's)."""
        received = now_ms()
        push = wire.decode_push(payload, mappings)
        transfer = max(0.0, received - push.sent_ms)
        timings = push.timings + tuple(
            wire.Timing(push.stage, "transfer", transfer, name) for name in push.tensors
        )
        self._handler.deliver(
            Delivery(
                push.request_id, push.stage, push.tensors, push.deadline_ms, timings, push.origin
            )
        )

    async def Push(
        self, request: bytes | stage_pb2.PushRequest, context: Any
    ) -> stage_pb2.PushReply:
        self.receive(request if isinstance(request, bytes) else request.SerializeToString())
        return stage_pb2.PushReply()

    async def Fail(self, request: stage_pb2.Failure, context: Any) -> stage_pb2.FailReply:
        self._handler.failed(
            request.request_id, request.code, request.message, request.deadline_unix_ms
        )
        return stage_pb2.FailReply()


def _fits(array: np.ndarray, dtype: np.dtype, shape: tuple[int, ...]) -> bool:
    return (
        array.dtype == dtype
        and len(array.shape) == len(shape)
        and all(want in (-1, have) for want, have in zip(shape, array.shape, strict=True))
    )


def add_to_server(
    servicer: ChainServicer, server: grpc.aio.Server, token: str | None = None
) -> None:
    """Serve the chain over gRPC: Push as raw bytes (decoded by `stage_server.wire`), Fail as
    protobuf; with `token`, only to calls that carry it (`stage_server.auth`)."""
    handlers = {
        "Push": grpc.unary_unary_rpc_method_handler(
            guarded(servicer.Push), response_serializer=stage_pb2.PushReply.SerializeToString
        ),
        "Fail": grpc.unary_unary_rpc_method_handler(
            guarded(servicer.Fail),
            request_deserializer=stage_pb2.Failure.FromString,
            response_serializer=stage_pb2.FailReply.SerializeToString,
        ),
    }
    generic = grpc.method_handlers_generic_handler(SERVICE, handlers)
    if token is not None:  # not registered: gRPC would then skip the guard
        server.add_generic_rpc_handlers((auth.chain_guard(generic, token),))
        return
    server.add_generic_rpc_handlers((generic,))
    server.add_registered_method_handlers(SERVICE, handlers)


def loopback_port(address: str) -> int | None:
    """The port of a host:port on this host's loopback interface, else None."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        return int(port) if loopback else None
    except ValueError:
        return None


class _Peer:
    """One peer address: its gRPC channel and method callables, and the fast path to it."""

    def __init__(self, address: str, same_host: bool, token: str | None) -> None:
        self.address = address
        self.token = token
        self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.push = self.channel.unary_unary(f"/{SERVICE}/Push", _registered_method=True)
        self.fail = self.channel.unary_unary(
            f"/{SERVICE}/Fail",
            request_serializer=stage_pb2.Failure.SerializeToString,
            response_deserializer=stage_pb2.FailReply.FromString,
            _registered_method=True,
        )
        self.port = loopback_port(address) if same_host else None
        self.shared = shm.SUPPORTED
        self.connection: samehost.Connection | None = None
        self.retry_at = 0.0
        self.closed = False
        self._opening = asyncio.Lock()

    async def fast_path(self) -> samehost.Connection | None:
        """The open same-host connection, opening it if it is time to try; None: use gRPC."""
        if self.port is None:
            return None
        if self.connection is not None and not self.connection.closed:
            return self.connection
        async with self._opening:  # concurrent pushes must not open two connections
            if self.connection is not None and not self.connection.closed:
                return self.connection
            if time.monotonic() < self.retry_at:
                return None
            if self.connection is not None:
                await self.connection.close()
            self.connection = await samehost.Connection.open(self.port, self.token)
            if self.closed:  # closed while it opened: nothing else would ever close it
                await self.close()
                raise Unavailable(f"the chain to {self.address} is closed")
            if self.connection is None:
                self.retry_at = time.monotonic() + RECONNECT_S
            return self.connection

    async def close(self) -> None:
        self.closed = True
        if self.connection is not None:
            await self.connection.close()
        await self.channel.close()


class Peers:
    """Outbound: push tensors to a stage (or the gateway) by stage id; report failures."""

    def __init__(
        self,
        plan: StagePlan,
        addresses: Mapping[str, str],
        *,
        same_host: bool = True,
        local: Router | None = None,
        token: str | None = None,
    ) -> None:
        """`addresses` maps device names and "gateway" to host:port; `same_host` allows the
        fast path to loopback peers (off: every push takes gRPC, as between hosts); `local`
        holds the targets in this process, which get their pushes in memory; `token` is the
        deployment's chain token, which every call carries (`stage_server.auth`)."""
        self.local = local or Router()
        missing = [d for d in plan.used_devices if d not in addresses and self.local.get(d) is None]
        if missing:
            raise Unavailable(
                f"no address for device {missing[0]!r}: give it with --peers or the plan's "
                "endpoints"
            )
        self._device_of = {s.id: s.device for s in plan.stages}
        self._addresses = dict(addresses)
        self._peers: dict[str, _Peer] = {}
        self._same_host = same_host and samehost.SUPPORTED
        self._token = token
        self._metadata = auth.chain_metadata(token)
        self._closed = False

    def address(self, target: str) -> str:
        """Address of a device name, a stage id or "gateway"."""
        key = self._device_of.get(target, target)
        try:
            return self._addresses[key]
        except KeyError:
            raise Unavailable(f"no address for {key!r}") from None

    def _peer(self, target: str) -> _Peer:
        address = self.address(target)
        if self._closed:  # a push still running as its server stops must not reopen anything
            raise Unavailable(f"the chain to {address} is closed")
        peer = self._peers.get(address)
        if peer is None:
            peer = self._peers[address] = _Peer(address, self._same_host, self._token)
        return peer

    def channel(self, target: str) -> grpc.aio.Channel:
        return self._peer(target).channel

    async def push(
        self,
        stage: str,
        request_id: str,
        tensors: Mapping[str, np.ndarray],
        deadline_ms: float,
        timings: Iterable[bytes | wire.Timing] = (),
        origin: str = GATEWAY,
    ) -> None:
        """Deliver `tensors` to `stage`, with the `timings` (`stage_server.wire`) to forward."""
        timings = tuple(timings)
        handler = self.local.get(stage)
        if handler is not None:
            handler.deliver(
                Delivery(request_id, stage, dict(tensors), deadline_ms, timings, origin)
            )
            return
        peer = self._peer(stage)
        connection = await peer.fast_path()
        if connection is None:
            payload = wire.encode_push(
                request_id, stage, tensors, deadline_ms, now_ms(), timings, origin
            )
            await self._call(peer.push, "Push", stage, payload, deadline_ms)
            return
        try:
            await self._local(
                connection, peer.shared, stage, request_id, tensors, deadline_ms, timings, origin
            )
        except SharedMemoryUnavailable as e:
            # The message, not the exception, whose frames hold the tensors (`StageServer._report`)
            log.info("%s cannot map shared memory (%s): sending tensors inline", stage, str(e))
            peer.shared = False
            await self._local(
                connection, False, stage, request_id, tensors, deadline_ms, timings, origin
            )

    async def _local(
        self,
        connection: samehost.Connection,
        share: bool,
        stage: str,
        request_id: str,
        tensors: Mapping[str, np.ndarray],
        deadline_ms: float,
        timings: tuple[bytes | wire.Timing, ...],
        origin: str,
    ) -> None:
        """A push over the same-host path, large tensors in the connection's shared memory."""
        shared: list[shm.SharedTensor] = []
        references = {}
        try:
            for name, array in tensors.items():
                # Never a string tensor (an object array: its bytes are pointers, and the size of
                # its wire form is not known before it is encoded); it travels inline.
                if (
                    share
                    and array.nbytes >= samehost.SHARED_MIN_BYTES
                    and not array.dtype.hasobject
                ):
                    tensor, references[name] = connection.pool.take(array)
                    shared.append(tensor)
            payload = wire.encode_push(
                request_id, stage, tensors, deadline_ms, now_ms(), timings, origin, references
            )
        except BaseException:
            connection.pool.give_back(shared)
            raise
        remaining = (deadline_ms - now_ms()) / 1000.0
        if remaining <= 0:
            connection.pool.give_back(shared)
            raise DeadlineExceeded(f"deadline passed before Push to {stage}")
        try:
            await connection.push(payload, remaining, shared)
        except TimeoutError:
            raise DeadlineExceeded(f"deadline passed during Push to {stage}") from None
        except Unavailable as e:
            raise Unavailable(f"cannot reach {stage} at {self.address(stage)}: {e}") from None

    async def fail(
        self,
        target: str,
        request_id: str,
        code: str,
        message: str,
        stage: str,
        deadline_ms: float,
    ) -> None:
        handler = self.local.get(target)
        if handler is not None:
            handler.failed(request_id, code, message, deadline_ms)
            return
        request = stage_pb2.Failure(
            request_id=request_id,
            code=code,
            message=message,
            stage=stage,
            deadline_unix_ms=deadline_ms,
        )
        await self._call(self._peer(target).fail, "Fail", target, request, deadline_ms)

    async def _call(
        self, method: Any, name: str, target: str, request: object, deadline_ms: float
    ) -> None:
        """One unary call within the request's deadline. An UNAVAILABLE answer is retried once
        if the peer's channel comes back within `RECONNECT_WAIT_S`: a peer that restarted leaves
        this side's channel in reconnect back-off for up to a second, while the gateway already
        reports the chain ready."""
        for attempt in (1, 2):
            remaining = (deadline_ms - now_ms()) / 1000.0
            if remaining <= 0:
                raise DeadlineExceeded(f"deadline passed before {name} to {target}")
            try:
                await method(request, timeout=remaining, metadata=self._metadata)
                return
            except grpc.aio.AioRpcError as e:
                where = f"{target} at {self.address(target)}"
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise from_code(e.code().name, f"{name} to {where}: {e.details()}") from None
                if attempt == 2 or not await self._reconnected(target, deadline_ms):
                    raise Unavailable(f"cannot reach {where}: {e.details()}") from None

    async def _reconnected(self, target: str, deadline_ms: float) -> bool:
        wait = min(RECONNECT_WAIT_S, (deadline_ms - now_ms()) / 1000.0)
        if wait <= 0:
            return False
        try:
            await asyncio.wait_for(self._peer(target).channel.channel_ready(), wait)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Close every peer's channel and connection; pushes from now on are `Unavailable`."""
        self._closed = True
        peers = list(self._peers.values())
        self._peers.clear()
        for peer in peers:
            await peer.close()
