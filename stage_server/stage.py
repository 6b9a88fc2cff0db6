"""The stage server: runs the stages of one device and chains their outputs onwards.

One process per device. It cuts its stages' sub-models from the model and the plan, opens one
ONNX Runtime session per stage, and serves `moirai.stage.v1.Chain` plus `grpc.health.v1`.

A request arrives as pushes of tensors (from the front end or upstream stages). Per (request,
stage) the server keeps the tensors received so far; when a stage has all its inputs it runs,
and each output goes straight to the stages that consume it, in the stage's own lane: to a peer
over the chain (`stage_server.chain`), or, for a target in this process (another stage of this
device, or the front end when it runs here), handed over in memory through the process's
`chain.Router`. Final outputs go to the front end ("gateway").

A device runs one stage at a time (the execution model the plan was solved for). A stage known
to take less than `INLINE_MS` runs right where its last input is delivered, on the event loop,
with no task and no thread: a one-stage plan with the front end in this process then answers a
request within the front end's own call, and the outputs of such a stage reach the next stage in
this process the same way. Other stages run in tasks: without a front end in the process right
on the event loop (the loop would have nothing else to do but receive, and a thread pool would
cost two thread wake-ups per stage, which on a busy core are far from free, while incoming
pushes wait meanwhile in the sockets and gRPC's own threads), in arrival order, and that wait is
reported as queue time; with a front end in the process (`offload`), or `workers` > 1 (a device
that can run several stages at once), in a thread pool of that size (ONNX Runtime releases the
GIL), so that the loop keeps decoding and answering requests meanwhile.

Nothing waits forever: every request carries its absolute deadline, a sweeper frees the state of
requests whose deadline passed, a request whose deadline passes while queued is dropped without
running, and the front end's cancellation (client gone, deadline passed, another stage failed)
frees state at once and leaves a tombstone until the deadline, so that late pushes of a cancelled
request are dropped instead of recreating its state. A failure (a session raising, a peer
unreachable) is reported to the gateway with its status code.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from collections.abc import Coroutine, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from moirai.devices import pinned
from moirai.stagecut import extract_stage
from moirai.stageplan import GATEWAY, StagePlan
from stage_server import shm, wire
from stage_server.chain import Delivery, Peers, now_ms
from stage_server.codec import memory_bytes
from stage_server.errors import NotFound, Overloaded, ServingError, StageFailed, status_of
from stage_server.sessions import StageSession, create_session
from stage_server.settings import DEFAULT_MAX_PENDING_BYTES

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 0.25
INLINE_MS = 0.5
"""A stage whose compute takes less than this (the median of its recent runs) runs right away on
the event loop: handing it to a thread and back costs two thread wake-ups, measured at about
0.1 ms of CPU on a busy 2-core machine, more than such a stage holds the loop, and a task costs
a turn of the loop. Until a stage's time is known, it runs in a task (and the pool)."""
RECENT_RUNS = 9
"""Runs of a stage whose median is its compute time estimate."""


@dataclass(slots=True)
class _Pending:
    deadline_ms: float
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    nbytes: int = 0
    """Bytes of memory of `tensors` (`codec.memory_bytes`: a string's elements too), counted in
    the server's `held_bytes` until the request is dropped or its stage has run."""
    timings: dict[bytes | wire.Timing, None] = field(default_factory=dict)
    """Timings (`stage_server.wire`), in arrival order without duplicates (a stage fed by two
    branches gets their common upstream's timings twice)."""
    places: Mapping[str, memoryview] | None = None
    """Where the client wants final outputs in its shared memory (`chain.Delivery.places`)."""

    def add_timings(self, timings: Iterable[bytes | wire.Timing]) -> None:
        if timings:  # none from the front end
            self.timings.update(dict.fromkeys(timings))


async def _failed(error: ServingError) -> None:
    """A push that failed before it started."""
    raise error


def _pin(cpus: set[int]) -> None:
    """Pin the calling thread (Linux: affinity is per thread, and new threads inherit it)."""
    os.sched_setaffinity(0, cpus)


class _Expired(Exception):
    """The request's deadline passed, or it was cancelled, while it waited in the queue."""


class StageServer:
    """The data plane of one device: request state, stage runs, chaining."""

    def __init__(
        self,
        model: onnx.ModelProto,
        plan: StagePlan,
        device: str,
        peers: Peers,
        *,
        threads: int | None = None,
        cuda_device: int | None = None,
        workers: int = 1,
        offload: bool = False,
        cpus: set[int] | None = None,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        spin: bool = True,
    ) -> None:
        """`workers`: stages this device runs at once; `offload`: run them in a thread even
        when one at a time (a front end shares this process's event loop); `cpus`: the cores
        of the threads that run stages (ONNX Runtime's, and the pool's), when only they are to
        be pinned; `max_pending_bytes`: the most bytes of tensors held for requests waiting or
        running here (their memory, `codec.memory_bytes`: a string tensor's elements count),
        past which a push is refused (RESOURCE_EXHAUSTED); `spin=False`: ONNX Runtime's
        threads never spin (`moirai.sessions.session_options`)."""
        spec = plan.device(device)
        self.device = device
        self.plan = plan
        self.stages = {s.id: s for s in plan.stages_on(device)}
        self._arena = shm.Arena() if shm.SUPPORTED else None  # large outputs go there
        with pinned(cpus or ()):  # ONNX Runtime's threads start here and keep the affinity
            self.sessions = {
                sid: StageSession(
                    create_session(
                        extract_stage(model, plan, sid),
                        spec,
                        threads=threads,
                        cuda_device=cuda_device,
                        spin=spin,
                    ),
                    [plan.spec(t) for t in stage.outputs],
                    self._arena,
                )
                for sid, stage in self.stages.items()
            }
        self.peers = peers
        peers.local.attach([*self.stages, device], self)
        # Where each output of each stage goes: consumers in the stage's own lane.
        self._routes = {
            sid: [(name, plan.routes(name, stage.lane)) for name in stage.outputs]
            for sid, stage in self.stages.items()
        }
        self._final = {  # outputs that go to the front end alone
            sid: frozenset(name for name, targets in routes if list(targets) == [GATEWAY])
            for sid, routes in self._routes.items()
        }
        self._inputs = {sid: frozenset(stage.inputs) for sid, stage in self.stages.items()}
        self.pending: dict[tuple[str, str], _Pending] = {}
        self.cancelled: dict[str, float] = {}  # request id -> when its tombstone may go
        self.max_pending_bytes = max_pending_bytes
        self.held_bytes = 0
        """Bytes of memory of tensors held for requests: waiting for inputs, queued, or
        running."""
        self._pool = (
            ThreadPoolExecutor(
                workers,
                thread_name_prefix=f"stage-{device}",
                initializer=_pin if cpus else None,
                initargs=(cpus,),
            )
            if workers > 1 or offload or cpus
            else None
        )
        self._compute_ms: dict[str, float] = {}  # each stage's recent compute time (`_timed`)
        self._recent: dict[str, collections.deque[float]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ inbound
    def deliver(self, delivery: Delivery) -> None:
        """Tensors for one stage; when they complete its inputs, it runs (`_quick` stages
        right away)."""
        stage = self.stages.get(delivery.stage)
        if stage is None:
            raise NotFound(f"stage {delivery.stage!r} is not on device {self.device}")
        rid = delivery.request_id
        if rid in self.cancelled or delivery.deadline_ms <= now_ms():
            return
        key = (rid, stage.id)
        pending = self.pending.get(key)
        nbytes = sum([memory_bytes(a) for a in delivery.tensors.values()])
        if self.held_bytes + nbytes > self.max_pending_bytes:
            raise Overloaded(
                f"stage server {self.device} holds {self.held_bytes} bytes of requests, and "
                f"{nbytes} more would pass its limit (--max-pending-bytes "
                f"{self.max_pending_bytes}): retry later"
            )
        if pending is None:
            pending = self.pending[key] = _Pending(delivery.deadline_ms)
        pending.tensors.update(delivery.tensors)
        pending.nbytes += nbytes
        self.held_bytes += nbytes
        pending.add_timings(delivery.timings)
        if delivery.places:
            pending.places = delivery.places
        if pending.tensors.keys() >= self._inputs[stage.id]:
            del self.pending[key]
            ready = time.perf_counter()
            if self._quick(stage.id):
                self._run_now(rid, stage.id, pending, ready)
            else:
                self._spawn(self._run(rid, stage.id, pending, ready))

    def failed(self, request_id: str, code: str, message: str, deadline_ms: float) -> None:
        """The gateway cancels a request: free its state, drop what still arrives for it."""
        self.cancelled[request_id] = deadline_ms if deadline_ms > 0 else now_ms() + 60_000
        for key in [k for k in self.pending if k[0] == request_id]:
            self._release(self.pending.pop(key))

    def _release(self, pending: _Pending) -> None:
        """A request's tensors are no longer held here (dropped, or its stage has run)."""
        self.held_bytes -= pending.nbytes
        pending.nbytes = 0

    # ------------------------------------------------------------------ running
    def _spawn(self, coro: object) -> None:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _compute(
        self,
        request_id: str,
        stage_id: str,
        pending: _Pending,
        ready: float,
        places: Mapping[str, memoryview] | None = None,
    ) -> tuple[list[np.ndarray], float, float]:
        start = time.perf_counter()
        if request_id in self.cancelled or pending.deadline_ms <= now_ms():
            raise _Expired
        stage = self.stages[stage_id]
        feeds = {t: pending.tensors[t] for t in stage.inputs}
        outputs = self.sessions[stage_id].run(feeds, places)
        end = time.perf_counter()
        return outputs, (start - ready) * 1000.0, (end - start) * 1000.0

    def _quick(self, stage_id: str) -> bool:
        """Whether the stage is known to take less than `INLINE_MS`: it then runs right where
        its last input arrives, with no task and no thread."""
        return self._compute_ms.get(stage_id, INLINE_MS) < INLINE_MS

    def _timed(self, stage_id: str, compute_ms: float) -> None:
        """Add a compute time to the stage's estimate: the median of its recent runs, so that
        a run stretched by preemption on a busy machine does not send a quick stage to the
        thread pool."""
        recent = self._recent.get(stage_id)
        if recent is None:
            recent = self._recent[stage_id] = collections.deque(maxlen=RECENT_RUNS)
        recent.append(compute_ms)
        self._compute_ms[stage_id] = sorted(recent)[len(recent) // 2]

    def _run_now(self, request_id: str, stage_id: str, pending: _Pending, ready: float) -> None:
        """Run a quick stage now, on the event loop, and hand its outputs on. Its final outputs
        that the client wants in its shared memory are written there: only here, while the
        front end in this process waits for them (a stage in a thread could still write after
        the client was answered, timed out, and reused that memory)."""
        places = pending.places
        if places:
            final = self._final[stage_id]
            places = {name: place for name, place in places.items() if name in final}
        try:
            outputs, queue_ms, compute_ms = self._compute(
                request_id, stage_id, pending, ready, places
            )
        except _Expired:
            return
        except Exception as e:  # ONNX Runtime raises its own types; all are stage failures
            self._spawn(
                self._report(request_id, stage_id, self._failure(stage_id, e), pending.deadline_ms)
            )
            return
        finally:
            self._release(pending)
        self._timed(stage_id, compute_ms)
        remote = self._forward(request_id, stage_id, pending, outputs, queue_ms, compute_ms)
        if remote:
            self._spawn(self._pushed(request_id, stage_id, pending, remote))

    async def _run(self, request_id: str, stage_id: str, pending: _Pending, ready: float) -> None:
        """Run a stage in the thread pool (or, without one, on the event loop in arrival
        order), then hand its outputs on. Its inputs count as held until it has run."""
        try:
            if self._pool is None:
                outputs, queue_ms, compute_ms = self._compute(request_id, stage_id, pending, ready)
            else:
                outputs, queue_ms, compute_ms = await asyncio.get_running_loop().run_in_executor(
                    self._pool, self._compute, request_id, stage_id, pending, ready
                )
        except _Expired:
            return
        except Exception as e:  # ONNX Runtime raises its own types; all are stage failures
            await self._report(
                request_id, stage_id, self._failure(stage_id, e), pending.deadline_ms
            )
            return
        finally:
            self._release(pending)
        self._timed(stage_id, compute_ms)
        remote = self._forward(request_id, stage_id, pending, outputs, queue_ms, compute_ms)
        if remote:
            await self._pushed(request_id, stage_id, pending, remote)

    def _failure(self, stage_id: str, error: Exception) -> StageFailed:
        return StageFailed(f"stage {stage_id} on {self.device} failed: {error}")

    def _forward(
        self,
        request_id: str,
        stage_id: str,
        pending: _Pending,
        outputs: list[np.ndarray],
        queue_ms: float,
        compute_ms: float,
    ) -> list[Coroutine[Any, Any, None]]:
        """Hand the outputs to their targets in this process now; the pushes to the others,
        to await."""
        if request_id in self.cancelled:
            return []
        pending.add_timings(
            [
                wire.Timing(stage_id, "queue", queue_ms),
                wire.Timing(stage_id, "compute", compute_ms),
            ]
        )
        by_target: dict[str, dict[str, np.ndarray]] = {}
        for (name, targets), array in zip(self._routes[stage_id], outputs, strict=True):
            for target in targets:
                by_target.setdefault(target, {})[name] = array
        timings = tuple(pending.timings)
        remote = []
        for target, tensors in by_target.items():
            handler = self.peers.local.get(target)
            if handler is not None:  # in this process: in memory, right now
                delivery = Delivery(
                    request_id,
                    target,
                    tensors,
                    pending.deadline_ms,
                    timings,
                    stage_id,
                    pending.places,
                )
                try:
                    handler.deliver(delivery)
                except ServingError as e:  # the next stage is full: report it as a push's
                    remote.append(_failed(e))
            else:
                remote.append(
                    self.peers.push(
                        target, request_id, tensors, pending.deadline_ms, timings, stage_id
                    )
                )
        return remote

    async def _pushed(
        self,
        request_id: str,
        stage_id: str,
        pending: _Pending,
        remote: list[Coroutine[Any, Any, None]],
    ) -> None:
        """Await the pushes of a stage's outputs; report the first failure."""
        if len(remote) == 1:  # the common case, without gather's extra task
            results: list[BaseException | None] = [None]
            try:
                await remote[0]
            except Exception as e:
                results = [e]
        else:
            results = await asyncio.gather(*remote, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            error = errors[0]
            if not isinstance(error, ServingError):
                error = StageFailed(f"stage {stage_id} could not push its outputs: {error}")
            await self._report(request_id, stage_id, error, pending.deadline_ms)

    async def _report(
        self, request_id: str, stage_id: str, error: Exception, deadline_ms: float
    ) -> None:
        # Messages are logged, not exceptions: a log record keeps its arguments (pytest's
        # capture, a MemoryHandler), and an exception's frames hold the request's tensors, whose
        # shared memory would then be neither reused nor freed.
        code = status_of(error)[0].name
        message = str(error)
        log.debug("request %s failed at stage %s: %s", request_id, stage_id, message)
        try:
            await self.peers.fail(GATEWAY, request_id, code, message, stage_id, deadline_ms)
        except ServingError as e:
            log.warning(
                "cannot report failure of request %s to the gateway: %s", request_id, str(e)
            )

    # ---------------------------------------------------------------- lifecycle
    def sweep(self) -> None:
        """Free the state of requests whose deadline passed, and old tombstones."""
        now = now_ms()
        for key in [k for k, p in self.pending.items() if p.deadline_ms <= now]:
            self._release(self.pending.pop(key))
        for rid in [r for r, until in self.cancelled.items() if until <= now]:
            del self.cancelled[rid]

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            self.sweep()

    def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.peers.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._arena is not None:
            self._arena.close()

    @property
    def in_flight(self) -> int:
        """Requests this server holds state for or is running (the leak tests read it)."""
        return len(self.pending) + len(self._tasks)
