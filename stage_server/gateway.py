"""The front end's data plane: one model's inference across the chained stages.

The transports (`oip_grpc`, `oip_http`) decode a request into numpy arrays and call
`Gateway.infer`, which validates the inputs against the plan, picks a lane (a complete copy of
the chain, `StagePlan.lanes`), pushes each model input to the stages of that lane that consume
it, and waits for the model outputs that the last stages push back (`deliver`) or for a failure
report (`failed`). It never runs a model itself. A front end holds one gateway per model it serves
(`stage_server.repository`), which the transports look up by the request's model name.

It runs either alone (`moirai gateway`: every stage remote) or inside the process of a stage
server ("fused", what `moirai serve` runs): then the stages of that process are targets of the
process's `chain.Router`, and `Peers` hands them the model inputs in memory, and they hand the
final outputs back the same way, so a one-stage plan has no hop and no copy between the
request and the response.

A lane is chosen per request among the lanes whose devices are all up, by weight and requests in
flight (`_pick_lane`): lanes are loaded in proportion to their weights, and a lane that answers
slowly has more requests in flight, so it gets fewer new ones.

Readiness is watched, not polled per request: one `grpc.health.v1` Watch stream per remote stage
server (a stage server in this process is up as long as the process is). When a stream breaks
(the server died or became unreachable), the gateway marks that device down, fails every request
in flight on the lanes that use it with UNAVAILABLE at once (their state died with the server, so
waiting for their deadline would only waste the client's time), sends new requests to other
lanes (and refuses them with UNAVAILABLE when no lane is fully up), and keeps reconnecting; once
the server reports SERVING again, its lanes serve again. Every request that fails, times out or
is abandoned by its client is cancelled on every stage server of its lane, so no server keeps
its state.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moirai.stageplan import GATEWAY, StagePlan, TensorSpec
from stage_server import wire
from stage_server.chain import Delivery, Peers, now_ms
from stage_server.codec import DTYPES, datatype_of
from stage_server.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidInput,
    Unavailable,
    from_code,
    status_of,
)
from stage_server.limits import request_timeout_s
from stage_server.metrics import Metrics

log = logging.getLogger(__name__)

RETRY_S = (0.1, 0.2, 0.5, 1.0)  # back-off of the health watch after a broken stream


@dataclass
class _Lane:
    """One copy of the chain, as the gateway uses it."""

    index: int
    weight: float
    devices: tuple[str, ...]
    targets: dict[str, tuple[str, ...]]
    """Model input -> the stages of this lane that consume it."""
    triggers: tuple[str, ...]
    """Stages of this lane that take no input at all: each needs an empty push."""
    in_flight: int = 0
    sent: int = 0


@dataclass(slots=True)
class _Request:
    wanted: frozenset[str]
    deadline_ms: float
    future: asyncio.Future[None]
    lane: _Lane
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    timings: dict[bytes | wire.Timing, None] = field(default_factory=dict)
    """Timings from the final pushes, without duplicates (`stage_server.wire`)."""


class Gateway:
    def __init__(
        self,
        plan: StagePlan,
        peers: Peers,
        *,
        timeout_s: float = 30.0,
        metrics: Metrics | None = None,
    ) -> None:
        """`peers` reaches the stage servers; those attached to its router live in this
        process."""
        self.plan = plan
        self.peers = peers
        self.timeout_s = timeout_s
        self.metrics = metrics or Metrics({s.id: s.device for s in plan.stages})
        self.inputs: dict[str, TensorSpec] = {t.name: t for t in plan.inputs}
        self.outputs: dict[str, TensorSpec] = {t.name: t for t in plan.outputs}
        self._fixed = {
            t.name: (DTYPES[t.datatype], tuple(t.shape))
            for t in plan.inputs
            if t.datatype in DTYPES and -1 not in t.shape
        }
        """Inputs of static shape: their dtype and shape, to check a request's in one go."""
        self.input_bytes = _input_bytes(plan.inputs)
        """The bytes of all the model's inputs when their sizes are fixed (None otherwise: an
        open dimension, or a BYTES input, whose shape does not fix its size):
        the transports refuse larger requests before reading them."""
        self.pending: dict[str, _Request] = {}
        self.metrics.in_flight.set_function(lambda: len(self.pending))  # counted when scraped
        self.up: dict[str, bool] = {d: peers.local.get(d) is not None for d in plan.used_devices}
        self._watchers: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._lanes = [
            _Lane(
                k,
                lane.weight,
                plan.devices_of_lane(k),
                {
                    name: tuple(c for c in plan.routes(name, k) if c != GATEWAY)
                    for name in self.inputs
                },
                tuple(s.id for s in plan.stages_of_lane(k) if not s.inputs),
            )
            for k, lane in enumerate(plan.lanes)
        ]
        self._ids = itertools.count()
        self._id_prefix = uuid.uuid4().hex[:16]
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def model_name(self) -> str:
        return self.plan.model_name

    # --------------------------------------------------------------- readiness
    def _lane_up(self, lane: _Lane) -> bool:
        return all(map(self.up.__getitem__, lane.devices))

    def ready(self) -> bool:
        """At least one lane has all its stage servers up."""
        return any(self._lane_up(lane) for lane in self._lanes)

    def _pick_lane(self) -> _Lane:
        """Among the lanes up, the one with the fewest requests in flight per unit of weight
        (least outstanding requests, weighted); among equals, the one that was sent the fewest
        requests per unit of weight (weighted round robin), so that lanes share even a light
        load in proportion to their weights."""
        best: _Lane | None = None
        for lane in self._lanes:
            if self._lane_up(lane) and (
                best is None
                or (lane.in_flight * best.weight, lane.sent * best.weight)
                < (best.in_flight * lane.weight, best.sent * lane.weight)
            ):
                best = lane
        if best is None:
            down = [d for d, up in self.up.items() if not up]
            raise Unavailable(f"stage server {down[0]} is not serving; the model is not ready")
        best.sent += 1
        return best

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for device, up in self.up.items():
            self.metrics.stage_up.labels(device).set(1 if up else 0)
            if not up:  # a remote stage server: watch it
                self._watchers.append(self._loop.create_task(self._watch(device)))

    async def wait_ready(self, timeout_s: float) -> bool:
        end = time.monotonic() + timeout_s
        while not self.ready() and time.monotonic() < end:
            await asyncio.sleep(0.05)
        return self.ready()

    async def stop(self) -> None:
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        for request in self.pending.values():
            if not request.future.done():
                request.future.set_exception(Unavailable("the gateway is shutting down"))
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.peers.close()

    async def _watch(self, device: str) -> None:
        attempt = 0
        while True:
            try:
                stub = health_pb2_grpc.HealthStub(self.peers.channel(device))
                async for reply in stub.Watch(health_pb2.HealthCheckRequest(service="")):
                    self._set_up(device, reply.status == health_pb2.HealthCheckResponse.SERVING)
                    attempt = 0
            except grpc.aio.AioRpcError as e:
                log.debug("health watch of %s broke: %s", device, e.code())
            self._set_up(device, False)
            await asyncio.sleep(RETRY_S[min(attempt, len(RETRY_S) - 1)])
            attempt += 1

    def _set_up(self, device: str, up: bool) -> None:
        was = self.up[device]
        self.up[device] = up
        self.metrics.stage_up.labels(device).set(1 if up else 0)
        if was and not up:
            address = self.peers.address(device)
            log.warning("stage server %s at %s is down", device, address)
            for request in self.pending.values():
                if not request.future.done() and device in request.lane.devices:
                    request.future.set_exception(
                        Unavailable(f"stage server {device} at {address} went away")
                    )
        elif up and not was:
            log.info("stage server %s is serving", device)

    # ---------------------------------------------------------------- inference
    def validate(self, inputs: Mapping[str, np.ndarray], requested: Sequence[str] | None) -> None:
        for name, array in inputs.items():
            fixed = self._fixed.get(name)
            if fixed is not None and array.dtype == fixed[0] and array.shape == fixed[1]:
                continue  # the usual case, in one comparison
            spec = self.inputs.get(name)
            if spec is None:
                raise InvalidInput(
                    f"unknown input {name!r}; model {self.model_name!r} takes "
                    f"{', '.join(self.inputs)}"
                )
            got = datatype_of(array)
            if got != spec.datatype:
                raise InvalidInput(f"input {name!r} is {got}, expected {spec.datatype}")
            if len(array.shape) != len(spec.shape) or any(
                want not in (-1, have) for want, have in zip(spec.shape, array.shape, strict=False)
            ):
                raise InvalidInput(
                    f"input {name!r} has shape {list(array.shape)}, expected {list(spec.shape)}"
                    " (-1: any size)"
                )
        missing = [n for n in self.inputs if n not in inputs]
        if missing:
            raise InvalidInput(
                f"input {missing[0]!r} is missing; model takes {', '.join(self.inputs)}"
            )
        for name in requested or ():
            if name not in self.outputs:
                raise InvalidInput(
                    f"unknown output {name!r}; model {self.model_name!r} gives "
                    f"{', '.join(self.outputs)}"
                )

    async def infer(
        self,
        inputs: Mapping[str, np.ndarray],
        requested: Sequence[str] | None = None,
        timeout_s: float | None = None,
        places: Mapping[str, memoryview] | None = None,
    ) -> dict[str, np.ndarray]:
        """The requested outputs (all when None) of one inference; `places`: where the client
        wants outputs in its shared memory, where stages in this process may write them."""
        self.validate(inputs, requested)
        lane = self._pick_lane()
        wanted = list(requested or self.outputs)
        timeout = request_timeout_s(timeout_s, self.timeout_s)
        started = time.perf_counter()
        rid = f"{self._id_prefix}{next(self._ids)}"
        deadline_ms = now_ms() + timeout * 1000.0
        loop = self._loop or asyncio.get_running_loop()
        expires = loop.time() + timeout
        request = _Request(frozenset(wanted), deadline_ms, loop.create_future(), lane)
        self.pending[rid] = request
        lane.in_flight += 1
        timer = None
        try:
            for name in wanted:
                if name in inputs:  # a model input that is also an output
                    request.outputs[name] = np.asarray(inputs[name])
            by_stage: dict[str, dict[str, np.ndarray]] = {s: {} for s in lane.triggers}
            for name, array in inputs.items():
                for stage in lane.targets[name]:
                    by_stage.setdefault(stage, {})[name] = array
            self._complete(request)
            remote = []
            for stage, tensors in by_stage.items():
                handler = self.peers.local.get(stage)
                if handler is not None:  # a stage in this process: in memory, right now
                    handler.deliver(Delivery(rid, stage, tensors, deadline_ms, (), GATEWAY, places))
                else:
                    remote.append(self.peers.push(stage, rid, tensors, deadline_ms))
            if len(remote) == 1:  # without gather's tasks
                await remote[0]
            elif remote:
                for result in await asyncio.gather(*remote, return_exceptions=True):
                    if isinstance(result, BaseException):
                        raise result
            if not request.future.done():  # quick stages in this process answer right away
                timer = loop.call_at(expires, _expire, request.future, timeout)
            await request.future
        except asyncio.CancelledError:
            self._cancel(rid, Cancelled("the client cancelled the request"))
            raise
        except Exception as error:
            self._cancel(rid, error)
            raise
        finally:
            if timer is not None:
                timer.cancel()
            if request.future.done() and not request.future.cancelled():
                # Read, so asyncio does not log it as never retrieved: a stage server that goes
                # away fails the request's future while a push to it fails the call itself.
                request.future.exception()
            del self.pending[rid]
            lane.in_flight -= 1
        self.metrics.request_seconds.observe(time.perf_counter() - started)
        self.metrics.observe_timings(wire.decode_timings(request.timings))
        return {name: request.outputs[name] for name in wanted}

    @staticmethod
    def _complete(request: _Request) -> None:
        if not request.future.done() and request.wanted <= request.outputs.keys():
            request.future.set_result(None)

    def _cancel(self, rid: str, error: BaseException) -> None:
        """Tell every stage server of the request's lane to drop it (in the background)."""
        request = self.pending[rid]
        code = status_of(error)[0].name
        message = str(error)  # not the error, whose frames hold the request's tensors
        deadline = max(request.deadline_ms, now_ms() + 1000.0)
        devices = request.lane.devices

        async def broadcast() -> None:
            calls = [
                self.peers.fail(device, rid, code, message, GATEWAY, deadline) for device in devices
            ]
            await asyncio.gather(*calls, return_exceptions=True)

        task = asyncio.get_running_loop().create_task(broadcast())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------ chain inbound
    def deliver(self, delivery: Delivery) -> None:
        """Final outputs pushed by the last stages."""
        request = self.pending.get(delivery.request_id)
        if request is None or request.future.done():
            return
        request.outputs.update(delivery.tensors)
        request.timings.update(dict.fromkeys(delivery.timings))
        self._complete(request)

    def failed(self, request_id: str, code: str, message: str, deadline_ms: float) -> None:
        """A stage reports that a request failed."""
        request = self.pending.get(request_id)
        if request is not None and not request.future.done():
            request.future.set_exception(from_code(code, message))


def _input_bytes(inputs: Sequence[TensorSpec]) -> int | None:
    if any(-1 in t.shape or t.datatype not in DTYPES for t in inputs):  # BYTES: any size
        return None
    return sum(math.prod(t.shape) * DTYPES[t.datatype].itemsize for t in inputs)


def _expire(future: asyncio.Future[None], timeout: float) -> None:
    if not future.done():
        future.set_exception(
            DeadlineExceeded(f"no result within {timeout:.3g} s (the request's deadline)")
        )
