"""Dynamic batching with Triton's semantics, in front of the data plane.

Concurrent requests for a model with a batch dimension (the first dimension of every input and
output, open: -1 in the plan) are concatenated along it, run once through every stage of the
chain as one request, and split back, each request getting its own rows. `Batcher.infer` has
the data plane's signature, so the transports call it instead of the data plane's own `infer`
(`BatchingFront` wraps a data plane with it), and the chain never knows.

The settings and their meaning are Triton's (`model_configuration.md`, `batcher.md`):

- `max_batch_size`: the most rows in one batch; a request of more rows is refused with
  INVALID_ARGUMENT, one of fewer waits for others to join it.
- `preferred_batch_sizes`: sizes a batch is sent at as soon as it reaches one (the largest it can
  reach); without them, `max_batch_size` is the only such size.
- `max_queue_delay_us`: how long a request may wait in the queue for others to join its batch.
  A batch that reaches a preferred size, or cannot grow (the next request would not fit), goes at
  once; otherwise it goes when its oldest request has waited this long. 0: never wait, send what
  is there.

Like Triton, batches form when the chain can take one: at most `slots` batches are in flight (a
model instance in Triton's terms; by default one per device of the plan, so that each device of
a pipeline has a batch to run), and requests that arrive meanwhile wait, which is what makes
batches large under load. The delay bounds only the wait for a batch to fill while a slot is
free. (A slot more would hide the hops between batches, but it splits the requests in flight
into smaller batches: on ResNet-50 here, 3.8 rows a batch instead of 5.4 at 16 in flight.)

Requests are batched in arrival order, only with requests of the same datatypes and non-batch
dimensions (one queue per such key; the queue of the oldest request is served first), and each
request's rows come back as views of the batch's outputs (no copy). A request carries its own
deadline: one that passes while the request is queued fails it with DEADLINE_EXCEEDED and it
never runs; one that passes after its batch left fails that request alone, and its rows are
dropped. A client that cancels is removed from the queue, or, once its batch left, its rows are
dropped while the others still get theirs; a batch whose every request is gone is cancelled on
the chain. A batch that fails fails every request in it with the batch's error.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Gauge, Histogram

from stage_server.batchconfig import BatchingConfig, check_batchable
from stage_server.errors import DeadlineExceeded, InvalidInput, StageFailed, Unavailable
from stage_server.limits import request_timeout_s

log = logging.getLogger(__name__)

Infer = Callable[
    [Mapping[str, np.ndarray], Sequence[str] | None, float | None],
    Awaitable[dict[str, np.ndarray]],
]
Validate = Callable[[Mapping[str, np.ndarray], Sequence[str] | None], None]

_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024)
_QUEUE_BUCKETS = (
    0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0,
)  # fmt: skip


class BatchMetrics:
    """The batcher's Prometheus metrics, in the data plane's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.batch_size = Histogram(
            "moirai_batch_size",
            "Rows of each batch sent through the chain (dynamic batching).",
            buckets=_SIZE_BUCKETS,
            registry=registry,
        )
        self.batch_requests = Histogram(
            "moirai_batch_requests",
            "Requests in each batch sent through the chain (dynamic batching).",
            buckets=_SIZE_BUCKETS,
            registry=registry,
        )
        self.queue_seconds = Histogram(
            "moirai_batch_queue_seconds",
            "Time a request waited in the batcher's queue before its batch was sent.",
            buckets=_QUEUE_BUCKETS,
            registry=registry,
        )
        self.queued = Gauge(
            "moirai_batch_queued_requests",
            "Requests waiting in the batcher's queue.",
            registry=registry,
        )


@dataclass(eq=False)
class _Entry:
    """One request in the batcher."""

    inputs: Mapping[str, np.ndarray]
    rows: int
    requested: tuple[str, ...] | None
    arrived: float
    """`loop.time()` when it was queued."""
    deadline: float
    """`loop.time()` by which it must be answered."""
    future: asyncio.Future[dict[str, np.ndarray]]
    batch: _Batch | None = None


@dataclass(eq=False)
class _Batch:
    entries: list[_Entry]
    task: asyncio.Task[None] | None = None
    rows: int = field(init=False)

    def __post_init__(self) -> None:
        self.rows = sum(e.rows for e in self.entries)


_Key = tuple[tuple[str, str, tuple[int, ...]], ...]


class Batcher:
    """Queues requests, sends them through `infer` in batches, answers each with its rows."""

    def __init__(
        self,
        infer: Infer,
        config: BatchingConfig,
        *,
        validate: Validate | None = None,
        timeout_s: float = 30.0,
        slots: int = 2,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """`infer` and `validate` are the data plane's; `timeout_s` its longest deadline;
        `slots` how many batches may be in flight at once."""
        if not config.enabled:
            raise ValueError("a Batcher needs max_batch_size >= 1")
        self._infer = infer
        self._validate = validate
        self.config = config
        self.timeout_s = timeout_s
        self.slots = max(1, slots)
        self.metrics = BatchMetrics(registry or CollectorRegistry())
        self._queues: dict[_Key, collections.deque[_Entry]] = {}
        self._batches: set[_Batch] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def queued(self) -> int:
        """Requests waiting in the queue (the tests read it)."""
        return sum(len(q) for q in self._queues.values())

    @property
    def in_flight(self) -> int:
        """Batches sent and not yet answered."""
        return len(self._batches)

    # ------------------------------------------------------------------ requests
    async def infer(
        self,
        inputs: Mapping[str, np.ndarray],
        requested: Sequence[str] | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, np.ndarray]:
        """The requested outputs (all when None) of one request, computed in a batch."""
        if self._validate is not None:
            self._validate(inputs, requested)
        if self._closed:
            raise Unavailable("the server is shutting down")
        rows = self._rows(inputs)
        timeout = request_timeout_s(timeout_s, self.timeout_s)
        loop = asyncio.get_running_loop()
        now = loop.time()
        entry = _Entry(
            inputs,
            rows,
            tuple(requested) if requested is not None else None,
            now,
            now + timeout,
            loop.create_future(),
        )
        self._queues.setdefault(_key(inputs), collections.deque()).append(entry)
        self.metrics.queued.inc()
        self._pump()
        try:
            async with asyncio.timeout_at(entry.deadline):
                return await entry.future
        except TimeoutError:
            where = "in the batch queue" if entry.batch is None else "in its batch"
            raise DeadlineExceeded(
                f"no result within {timeout:.3g} s (the request's deadline; it expired {where})"
            ) from None
        finally:
            self._leave(entry)

    def _rows(self, inputs: Mapping[str, np.ndarray]) -> int:
        """The request's batch size: the first dimension its inputs share."""
        sizes = {name: array.shape[0] if array.ndim else None for name, array in inputs.items()}
        for name, size in sizes.items():
            if size is None:
                raise InvalidInput(
                    f"input {name!r} is a scalar: with batching, every input's first dimension "
                    "is its batch dimension"
                )
        distinct = sorted(set(sizes.values()))
        if len(distinct) > 1:
            listed = ", ".join(f"{n} {s}" for n, s in sizes.items())
            raise InvalidInput(
                f"the inputs' first dimensions differ ({listed}): with batching, it is the "
                "batch size, the same in every input"
            )
        rows = distinct[0] if distinct else 0
        if not 1 <= rows <= self.config.max_batch_size:
            raise InvalidInput(
                f"batch size {rows} (the inputs' first dimension) is outside 1 to the model's "
                f"max_batch_size {self.config.max_batch_size}: split the request"
            )
        return rows

    def _leave(self, entry: _Entry) -> None:
        """The request is answered, failed, expired or abandoned: out of the queue, or, once
        sent, out of its batch (cancelled on the chain when no one is left in it)."""
        if entry.batch is None:
            queue = self._queues.get(key := _key(entry.inputs))
            if queue is not None and entry in queue:
                queue.remove(entry)
                self.metrics.queued.dec()
                if not queue:
                    del self._queues[key]
                self._pump()  # the batch it was waiting in may be sendable now, or never
            return
        task = entry.batch.task
        if (
            task is not None
            and not task.done()
            and all(e.future.done() for e in entry.batch.entries)
        ):
            task.cancel()

    # ------------------------------------------------------------------ batches
    def _pump(self) -> None:
        """Send every batch that is due while a slot is free; set a timer for the next."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        loop = asyncio.get_running_loop()
        while self._queues and len(self._batches) < self.slots:
            now = loop.time()
            wake = math.inf
            for key, queue in sorted(self._queues.items(), key=lambda kv: kv[1][0].arrived):
                count, due = self._due(queue, now)
                if count:
                    self._send(key, count)
                    break
                wake = min(wake, due)
            else:
                if wake < math.inf:
                    self._timer = loop.call_at(wake, self._pump)
                return

    def _due(self, queue: collections.deque[_Entry], now: float) -> tuple[int, float]:
        """How many of the queue's first requests to send now (0: none yet), and when they will
        be due otherwise (Triton's rules: module docstring)."""
        limit = self.config.max_batch_size
        preferred = self.config.preferred_batch_sizes
        rows = count = best = 0
        full = False
        for entry in queue:
            if rows + entry.rows > limit:
                full = True  # the batch cannot grow past this request
                break
            rows += entry.rows
            count += 1
            if rows in preferred:
                best = count
        if full or rows == limit:
            return count, now
        if best:
            return best, now
        due = queue[0].arrived + self.config.delay_s
        return (count, now) if now >= due else (0, due)

    def _send(self, key: _Key, count: int) -> None:
        queue = self._queues[key]
        entries = [queue.popleft() for _ in range(count)]
        if not queue:
            del self._queues[key]
        batch = _Batch(entries)
        now = asyncio.get_running_loop().time()
        for entry in entries:
            entry.batch = batch
            self.metrics.queue_seconds.observe(now - entry.arrived)
        self.metrics.queued.dec(count)
        self.metrics.batch_size.observe(batch.rows)
        self.metrics.batch_requests.observe(count)
        self._batches.add(batch)
        batch.task = asyncio.get_running_loop().create_task(self._run(batch))

    async def _run(self, batch: _Batch) -> None:
        entries = batch.entries
        try:
            outputs = await self._infer(*self._merge(entries))
            parts = [outputs] if len(entries) == 1 else _split(outputs, [e.rows for e in entries])
            for entry, part in zip(entries, parts, strict=True):
                if not entry.future.done():
                    wanted = entry.requested if entry.requested is not None else part
                    entry.future.set_result({name: part[name] for name in wanted})
        except asyncio.CancelledError:
            pass  # every request of the batch is gone (`_leave`), or the batcher closes
        except Exception as error:
            for entry in entries:
                if not entry.future.done():
                    entry.future.set_exception(error)
        finally:
            self._batches.discard(batch)
            if not self._closed:
                self._pump()

    def _merge(
        self, entries: Sequence[_Entry]
    ) -> tuple[dict[str, np.ndarray], tuple[str, ...] | None, float]:
        """The batch's inputs (concatenated: one copy; a lone request's as they are), the union
        of the requested outputs (None: all), and the time left to its longest deadline."""
        if len(entries) == 1:
            inputs = dict(entries[0].inputs)
        else:
            inputs = {
                name: np.concatenate([e.inputs[name] for e in entries])
                for name in entries[0].inputs
            }
        requested: tuple[str, ...] | None = None
        if all(e.requested is not None for e in entries):
            requested = tuple(dict.fromkeys(n for e in entries for n in e.requested or ()))
        left = max(e.deadline for e in entries) - asyncio.get_running_loop().time()
        return inputs, requested, max(left, 0.0)

    # ---------------------------------------------------------------- lifecycle
    async def close(self) -> None:
        """Fail every queued request with UNAVAILABLE and cancel the batches in flight."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        for queue in self._queues.values():
            for entry in queue:
                if not entry.future.done():
                    entry.future.set_exception(Unavailable("the server is shutting down"))
        tasks = [b.task for b in self._batches if b.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _key(inputs: Mapping[str, np.ndarray]) -> _Key:
    """What requests must share to be batched: names, datatypes, non-batch dimensions."""
    return tuple(
        sorted((name, array.dtype.str, tuple(array.shape[1:])) for name, array in inputs.items())
    )


def _split(outputs: Mapping[str, np.ndarray], rows: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """Each request's rows of the batch's outputs, as views."""
    total = sum(rows)
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != total:
            raise StageFailed(
                f"output {name!r} has shape {list(array.shape)} for a batch of {total} rows: "
                "the model's outputs do not follow its batch dimension; serve it without "
                "--max-batch-size"
            )
    parts = []
    start = 0
    for n in rows:
        parts.append({name: array[start : start + n] for name, array in outputs.items()})
        start += n
    return parts


class BatchingFront:
    """A data plane whose `infer` batches (`Batcher`); everything else is the data plane's own
    (model name, metadata, readiness, metrics...)."""

    def __init__(self, plane: Any, config: BatchingConfig, *, slots: int | None = None) -> None:
        """`plane` has `plan`, `infer`, `validate`, `timeout_s` and `metrics` (a gateway);
        `slots` defaults to the plan's devices (one batch running on each)."""
        plan = plane.plan
        check_batchable(plan.model_name, plan.inputs, plan.outputs)
        self._plane = plane
        self.batcher = Batcher(
            plane.infer,
            config,
            validate=plane.validate,
            timeout_s=plane.timeout_s,
            slots=slots if slots is not None else len(plan.used_devices),
            registry=plane.metrics.registry,
        )
        log.info(
            "batching %s: max_batch_size %d, preferred %s, max_queue_delay_us %d, %d batches "
            "in flight",
            plan.model_name,
            config.max_batch_size,
            list(config.preferred_batch_sizes) or "none",
            config.max_queue_delay_us,
            self.batcher.slots,
        )

    async def infer(
        self,
        inputs: Mapping[str, np.ndarray],
        requested: Sequence[str] | None = None,
        timeout_s: float | None = None,
        places: Mapping[str, memoryview] | None = None,
    ) -> dict[str, np.ndarray]:
        """`places` are not used: outputs computed in a batch are split, then copied there."""
        return await self.batcher.infer(inputs, requested, timeout_s)

    async def stop(self) -> None:
        await self.batcher.close()
        await self._plane.stop()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._plane, name)


def with_batching(plane: Any, config: BatchingConfig | None) -> Any:
    """`plane` itself when batching is off, else a `BatchingFront` over it."""
    return plane if config is None or not config.enabled else BatchingFront(plane, config)
