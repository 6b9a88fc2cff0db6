"""The chain: how stage servers and the gateway hand a request's tensors to each other.

Both ends speak `moirai.stage.v1.Chain` (see `protos/stage.proto`). Outbound, `Peers` resolves a
stage id to the address of the server holding it, keeps one channel per address, and turns every
gRPC failure into a serving error (`stage_server.errors`); inbound, `ChainServicer` decodes each
message and hands it to a `ChainHandler` (a stage server or the gateway). Neither end sees gRPC
types beyond this module.

Channels reconnect quickly (100 ms to 1 s back-off instead of gRPC's default of up to two
minutes), because a restarted stage server must be reachable again as soon as it listens. Message
sizes are unlimited on the chain: it is internal, and tensors of hundreds of MiB are legitimate.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import grpc
import numpy as np

from moirai.partition import GATEWAY, StagePlan
from stage_server import codec
from stage_server.errors import DeadlineExceeded, Unavailable, from_code
from stage_server.protos import stage_pb2, stage_pb2_grpc

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.enable_retries", 0),
]


def now_ms() -> float:
    return time.time() * 1000.0


@dataclass
class Delivery:
    """Tensors of one request for one stage, as received."""

    request_id: str
    stage: str
    tensors: dict[str, np.ndarray]
    deadline_ms: float
    timings: list[stage_pb2.Timing]
    origin: str


class ChainHandler(Protocol):
    def deliver(self, delivery: Delivery) -> None: ...

    def failed(self, request_id: str, code: str, message: str, deadline_ms: float) -> None: ...


class ChainServicer(stage_pb2_grpc.ChainServicer):
    """Thin inbound adapter: decode, time the transfer, hand over."""

    def __init__(self, handler: ChainHandler) -> None:
        self._handler = handler

    async def Push(
        self, request: stage_pb2.PushRequest, context: grpc.aio.ServicerContext
    ) -> stage_pb2.PushReply:
        received = now_ms()
        timings = list(request.timings)
        tensors = {}
        for t in request.tensors:
            tensors[t.name] = codec.from_chain(t)
            timings.append(
                stage_pb2.Timing(
                    stage=request.stage,
                    kind="transfer",
                    tensor=t.name,
                    ms=max(0.0, received - request.sent_unix_ms),
                )
            )
        self._handler.deliver(
            Delivery(
                request.request_id,
                request.stage,
                tensors,
                request.deadline_unix_ms,
                timings,
                request.origin,
            )
        )
        return stage_pb2.PushReply()

    async def Fail(
        self, request: stage_pb2.Failure, context: grpc.aio.ServicerContext
    ) -> stage_pb2.FailReply:
        self._handler.failed(
            request.request_id, request.code, request.message, request.deadline_unix_ms
        )
        return stage_pb2.FailReply()


class Peers:
    """Outbound: push tensors to a stage (or the gateway) by stage id; report failures."""

    def __init__(self, plan: StagePlan, addresses: Mapping[str, str]) -> None:
        """`addresses` maps device names and "gateway" to host:port."""
        missing = [d for d in plan.used_devices if d not in addresses]
        if missing:
            raise Unavailable(
                f"no address for device {missing[0]!r}: give it with --peers or the plan's "
                "endpoints"
            )
        self._device_of = {s.id: s.device for s in plan.stages}
        self._addresses = dict(addresses)
        self._channels: dict[str, grpc.aio.Channel] = {}

    def address(self, target: str) -> str:
        """Address of a device name, a stage id or "gateway"."""
        key = self._device_of.get(target, target)
        try:
            return self._addresses[key]
        except KeyError:
            raise Unavailable(f"no address for {key!r}") from None

    def channel(self, target: str) -> grpc.aio.Channel:
        address = self.address(target)
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            self._channels[address] = channel
        return channel

    async def push(
        self,
        stage: str,
        request_id: str,
        tensors: Mapping[str, np.ndarray],
        deadline_ms: float,
        timings: Iterable[stage_pb2.Timing] = (),
        origin: str = GATEWAY,
    ) -> None:
        request = stage_pb2.PushRequest(
            request_id=request_id,
            stage=stage,
            tensors=[codec.to_chain(name, array) for name, array in tensors.items()],
            deadline_unix_ms=deadline_ms,
            timings=list(timings),
            origin=origin,
        )
        request.sent_unix_ms = now_ms()
        await self._call("Push", stage, request, deadline_ms)

    async def fail(
        self,
        target: str,
        request_id: str,
        code: str,
        message: str,
        stage: str,
        deadline_ms: float,
    ) -> None:
        request = stage_pb2.Failure(
            request_id=request_id,
            code=code,
            message=message,
            stage=stage,
            deadline_unix_ms=deadline_ms,
        )
        await self._call("Fail", target, request, deadline_ms)

    async def _call(self, method: str, target: str, request: object, deadline_ms: float) -> None:
        remaining = (deadline_ms - now_ms()) / 1000.0
        if remaining <= 0:
            raise DeadlineExceeded(f"deadline passed before {method} to {target}")
        stub = stage_pb2_grpc.ChainStub(self.channel(target))
        try:
            await getattr(stub, method)(request, timeout=remaining)
        except grpc.aio.AioRpcError as e:
            where = f"{target} at {self.address(target)}"
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                raise Unavailable(f"cannot reach {where}: {e.details()}") from None
            raise from_code(e.code().name, f"{method} to {where}: {e.details()}") from None

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
