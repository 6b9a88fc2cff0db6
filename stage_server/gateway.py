"""The gateway's data plane: one model's inference across the chained stage servers.

The transports (`oip_grpc`, `oip_http`) decode a request into numpy arrays and call
`Gateway.infer`, which validates the inputs against the plan, pushes each model input to the
stages that consume it, and waits for the model outputs that the last stages push back
(`deliver`) or for a failure report (`failed`). It never runs a model itself.

Readiness is watched, not polled per request: one `grpc.health.v1` Watch stream per stage server.
When a stream breaks (the server died or became unreachable), the gateway marks that device down,
fails every request in flight with UNAVAILABLE at once (their state died with the server, so
waiting for their deadline would only waste the client's time), refuses new requests with
UNAVAILABLE while any device is down, and keeps reconnecting; once the server reports SERVING
again, serving resumes. Every request that fails, times out or is abandoned by its client is
cancelled on every stage server, so no server keeps its state.
"""

from __future__ import annotations

import asyncio
import logging
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
from stage_server.codec import datatype_of
from stage_server.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidInput,
    NotFound,
    Unavailable,
    from_code,
    status_of,
)
from stage_server.metrics import Metrics

log = logging.getLogger(__name__)

RETRY_S = (0.1, 0.2, 0.5, 1.0)  # back-off of the health watch after a broken stream
VERSION = "1"
"""The version of the model, in the Open Inference Protocol's sense: a gateway serves one."""


@dataclass
class _Request:
    wanted: frozenset[str]
    deadline_ms: float
    future: asyncio.Future[None]
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    timings: dict[bytes, None] = field(default_factory=dict)
    """Encoded timings from the final pushes, without duplicates (`stage_server.wire`)."""


class Gateway:
    def __init__(
        self,
        plan: StagePlan,
        peers: Peers,
        *,
        timeout_s: float = 30.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.plan = plan
        self.peers = peers
        self.timeout_s = timeout_s
        self.metrics = metrics or Metrics({s.id: s.device for s in plan.stages})
        self.inputs: dict[str, TensorSpec] = {t.name: t for t in plan.inputs}
        self.outputs: dict[str, TensorSpec] = {t.name: t for t in plan.outputs}
        self.pending: dict[str, _Request] = {}
        self.up: dict[str, bool] = dict.fromkeys(plan.used_devices, False)
        self._watchers: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        # Where each model input goes, and the stages that need a push with no tensors at all.
        self._targets: dict[str, list[str]] = {
            name: [c for c in plan.routing.get(name, ()) if c != GATEWAY] for name in self.inputs
        }
        self._triggers = [s.id for s in plan.stages if not s.inputs]

    @property
    def model_name(self) -> str:
        return self.plan.model_name

    # --------------------------------------------------------------- readiness
    def ready(self) -> bool:
        return all(self.up.values())

    def check_model(self, name: str, version: str = "") -> None:
        """Refuse a request for another model, or for a version other than `VERSION` (an
        empty version means the model's only one)."""
        if name != self.model_name:
            raise NotFound(
                f"model {name!r} is not served here; this gateway serves {self.model_name!r}"
            )
        if version not in ("", VERSION):
            raise NotFound(
                f"model {name!r} has no version {version!r}: its one version is {VERSION!r} "
                "(or leave the version out)"
            )

    async def start(self) -> None:
        for device in self.up:
            self.metrics.stage_up.labels(device).set(0)
            self._watchers.append(asyncio.get_running_loop().create_task(self._watch(device)))

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
                if not request.future.done():
                    request.future.set_exception(
                        Unavailable(f"stage server {device} at {address} went away")
                    )
        elif up and not was:
            log.info("stage server %s is serving", device)

    # ---------------------------------------------------------------- inference
    def validate(self, inputs: Mapping[str, np.ndarray], requested: Sequence[str] | None) -> None:
        for name, array in inputs.items():
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
    ) -> dict[str, np.ndarray]:
        """The requested outputs (all when None) of one inference."""
        self.validate(inputs, requested)
        if not self.ready():
            down = [d for d, up in self.up.items() if not up]
            raise Unavailable(f"stage server {down[0]} is not serving; the model is not ready")
        wanted = list(requested or self.outputs)
        timeout = min(timeout_s, self.timeout_s) if timeout_s is not None else self.timeout_s
        started = time.perf_counter()
        rid = uuid.uuid4().hex
        deadline_ms = now_ms() + timeout * 1000.0
        request = _Request(
            frozenset(wanted), deadline_ms, asyncio.get_running_loop().create_future()
        )
        self.pending[rid] = request
        self.metrics.in_flight.inc()
        try:
            for name in wanted:
                if name in inputs:  # a model input that is also an output
                    request.outputs[name] = np.asarray(inputs[name])
            by_stage: dict[str, dict[str, np.ndarray]] = {s: {} for s in self._triggers}
            for name, array in inputs.items():
                for stage in self._targets[name]:
                    by_stage.setdefault(stage, {})[name] = array
            self._complete(request)
            pushes = [self.peers.push(s, rid, t, deadline_ms) for s, t in by_stage.items()]
            for result in await asyncio.gather(*pushes, return_exceptions=True):
                if isinstance(result, BaseException):
                    raise result
            try:
                await asyncio.wait_for(request.future, timeout=(deadline_ms - now_ms()) / 1000)
            except TimeoutError:
                raise DeadlineExceeded(
                    f"no result within {timeout:.3g} s (the request's deadline)"
                ) from None
        except asyncio.CancelledError:
            self._cancel(rid, Cancelled("the client cancelled the request"))
            raise
        except Exception as error:
            self._cancel(rid, error)
            raise
        finally:
            del self.pending[rid]
            self.metrics.in_flight.dec()
        self.metrics.request_seconds.observe(time.perf_counter() - started)
        self.metrics.observe_timings(wire.decode_timings(request.timings))
        return {name: request.outputs[name] for name in wanted}

    @staticmethod
    def _complete(request: _Request) -> None:
        if not request.future.done() and request.wanted <= request.outputs.keys():
            request.future.set_result(None)

    def _cancel(self, rid: str, error: BaseException) -> None:
        """Tell every stage server to drop the request (in the background)."""
        request = self.pending[rid]
        code = status_of(error)[0].name
        deadline = max(request.deadline_ms, now_ms() + 1000.0)

        async def broadcast() -> None:
            calls = [
                self.peers.fail(device, rid, code, str(error), GATEWAY, deadline)
                for device in self.up
            ]
            await asyncio.gather(*calls, return_exceptions=True)

        task = asyncio.get_running_loop().create_task(broadcast())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------ chain inbound
    def deliver(self, delivery: Delivery) -> None:
        """Final outputs pushed by the last stages."""
        if delivery.stage != GATEWAY:
            raise NotFound(f"the gateway holds no stage {delivery.stage!r}")
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
