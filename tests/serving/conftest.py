"""Fixtures: real servers on real loopback sockets, in this process or as subprocesses.

`cluster` runs every test twice: with the same-host fast path (Unix socket, shared memory), as
`moirai serve` runs, and with every push on gRPC, the path between hosts."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import mmap
import os
import socket
import types
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

import numpy as np
import onnx
import pytest

from moirai.errors import MoiraiError
from moirai.partition import build_plan
from moirai.stageplan import GATEWAY, DeviceSpec, Lane, StagePlan
from stage_server import shm
from stage_server.chain import Delivery
from stage_server.serve import (
    ChainHandle,
    Frontend,
    FrontendHandle,
    StageHandle,
    start_chain,
    start_gateway,
    start_stage,
)


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def split_plan(model: onnx.ModelProto, parts: int = 2, threads: int = 1) -> StagePlan:
    """A hand-made placement: the model's nodes cut into `parts` contiguous runs."""
    nodes = [n.name for n in model.graph.node]
    devices = [DeviceSpec(f"cpu-{i}", threads=threads) for i in range(parts)]
    per = -(-len(nodes) // parts)
    return build_plan(model, {n: f"cpu-{i // per}" for i, n in enumerate(nodes)}, devices)


@dataclass
class Cluster:
    plan: StagePlan
    gateway: FrontendHandle
    """The front end: a gateway alone, or a stage server's (`stages[...].frontend`)."""
    stages: dict[str, StageHandle]
    addresses: dict[str, str]

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.gateway.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.gateway.http_port}"


Launcher = Callable[..., "Cluster"]


def shared_memory_in_use() -> tuple[int, int]:
    """This process's descriptors of, and mappings of, chain tensors in shared memory."""
    gc.collect()
    fds = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile (the listing's own descriptor)
            fds += "memfd:moirai-" in os.readlink(f"/proc/self/fd/{fd}")
    with open("/proc/self/maps", encoding="utf-8") as maps:
        mapped = sum("memfd:moirai-" in line for line in maps)
    return fds, mapped


@pytest.fixture(params=["same-host", "grpc", "fused"])
async def cluster(request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., object]]:
    """`await cluster(model, plan, **frontend_options)`: stage servers and a front end,
    in-process: the gateway alone pushing over the same-host fast path ("same-host") or over
    gRPC only ("grpc"), or the front end inside the stage server of the plan's first stage
    ("fused", as `moirai serve` runs it). Once they stop, no memory file or mapping of a shared
    tensor may be left."""
    mode: str = request.param
    same_host = mode != "grpc"
    started: list[Cluster] = []

    async def launch(model: onnx.ModelProto, plan: StagePlan, **options: object) -> Cluster:
        """`launch_once`, again on fresh ports when a port picked free was taken meanwhile (by
        another process's outbound connection: the free ports are ephemeral ones)."""
        for _ in range(2):
            try:
                return await launch_once(model, plan, **options)
            except MoiraiError as e:
                if "cannot listen" not in str(e):
                    raise
        return await launch_once(model, plan, **options)

    async def launch_once(model: onnx.ModelProto, plan: StagePlan, **options: object) -> Cluster:
        devices = plan.used_devices
        ports = free_ports(len(devices) + 2)
        addresses = {d: f"127.0.0.1:{p}" for d, p in zip(devices, ports, strict=False)}
        entry = plan.stages[0].device if mode == "fused" else None
        addresses["gateway"] = addresses[entry] if entry else f"127.0.0.1:{ports[-2]}"
        stages = {}
        try:
            for d in devices:
                frontend = Frontend(grpc_port=ports[-1], **options) if d == entry else None
                stages[d] = await start_stage(
                    model,
                    plan,
                    d,
                    addresses,
                    port=int(addresses[d].split(":")[1]),
                    same_host=same_host,
                    frontend=frontend,
                )
            if entry:
                gateway = stages[entry].frontend
            else:
                gateway = await start_gateway(
                    plan,
                    addresses,
                    grpc_port=ports[-1],
                    chain_port=ports[-2],
                    same_host=same_host,
                    **options,
                )
        except MoiraiError:
            for started_stage in stages.values():
                await started_stage.stop(0)
            raise
        assert gateway is not None and await gateway.gateway.wait_ready(10)
        for _ in range(200):  # every lane, not only one
            if all(gateway.gateway.up.values()):
                break
            await asyncio.sleep(0.05)
        c = Cluster(plan, gateway, stages, addresses)
        started.append(c)
        return c

    before = shared_memory_in_use()
    yield launch
    for c in started:
        if c.gateway not in [s.frontend for s in c.stages.values()]:
            await c.gateway.stop(0)
        for s in c.stages.values():
            await s.stop(0)
    # Tasks the stop cancelled may still hold tensors until the loop has run them once more.
    for _ in range(200):
        if shared_memory_in_use() == before:
            break
        await asyncio.sleep(0.05)
    assert shared_memory_in_use() == before, (
        f"shared memory left after the servers stopped: {shared_memory_held()}"
    )


def shared_memory_held() -> str:
    """What holds this process's memory files: the sender's files still open, the mappings (a
    mapping object also holds a descriptor), and what refers to arrays over them, for a failure
    to name its leak."""
    files = [
        f"{'arena' if o.arena else 'pool'} file of {o.capacity} B, {o.holds} holds"
        for o in gc.get_objects()
        if isinstance(o, shm.SharedTensor) and o.inode and o._fd >= 0
    ]
    with open("/proc/self/maps", encoding="utf-8") as maps:
        mapped = [line.split()[0] for line in maps if "memfd:moirai-" in line]
    held = "".join(f"\n  held by {' <- '.join(chain)}" for chain in _holders())
    return f"{len(files)} files open ({'; '.join(files)}); mappings at {', '.join(mapped)}{held}"


def _holders(most: int = 3, depth: int = 12) -> list[list[str]]:
    """For at most `most` objects that refer to an array over a mapping (an arena file's own
    array aside), what refers to them in turn, `depth` steps up: say, a frame of
    `Peers._local`, its traceback, the exception, ..., the `LogRecord` that kept them."""
    gc.collect()
    objects = gc.get_objects()
    tensors = [o for o in objects if isinstance(o, shm.SharedTensor)]
    own = {id(o) for o in tensors} | {id(o.__dict__) for o in tensors}
    starts = [o for o in objects if id(o) not in own and _refers_to_a_mapping(o)][:most]
    chains = []
    for start in starts:
        chain, here = [_describe(start)], start
        seen = {id(objects), id(starts), id(start), id(inspect.currentframe())}
        for _ in range(depth):
            referrers = gc.get_referrers(here)
            seen.add(id(referrers))
            here = next((r for r in referrers if id(r) not in seen), None)
            if here is None:
                break
            seen.add(id(here))
            chain.append(_describe(here))
        chains.append(chain)
    return chains


def _refers_to_a_mapping(o: object) -> bool:
    """Whether `o` refers to an array over a mapping, itself or through containers that the
    garbage collector does not track (a dict of arrays only, say, such as a push's tensors)."""
    for r in gc.get_referents(o):
        while isinstance(r, np.ndarray) and r.base is not None:
            r = r.base
        if isinstance(r, memoryview) and isinstance(r.obj, mmap.mmap):  # np.frombuffer's base
            return True
        untracked = isinstance(r, dict | list | tuple) and not gc.is_tracked(r)
        if untracked and _refers_to_a_mapping(r):
            return True
    return False


def _describe(o: object) -> str:
    if isinstance(o, types.FrameType):
        return f"frame of {o.f_code.co_qualname}"
    if isinstance(o, dict):
        keys = [k if isinstance(k, str) else type(k).__name__ for k in list(o)[:4]]
        return f"dict of {', '.join(keys)}"
    return type(o).__name__


def laned(plan: StagePlan, weights: tuple[float, ...] = (1.0, 1.0)) -> StagePlan:
    """A hand-built plan of `len(weights)` lanes: lane k > 0 copies every stage of `plan` (ids
    and devices suffixed "-l{k}") and routes each tensor to the copies of its consumers too."""
    devices = list(plan.devices)
    stages = list(plan.stages)
    routing = {t: list(c) for t, c in plan.routing.items()}
    for k in range(1, len(weights)):
        devices += [replace(d, name=f"{d.name}-l{k}") for d in plan.devices]
        stages += [replace(s, id=f"{s.id}-l{k}", device=f"{s.device}-l{k}", lane=k)
                   for s in plan.stages]  # fmt: skip
        for consumers in routing.values():
            consumers += [f"{c}-l{k}" for c in list(consumers) if c != GATEWAY and "-l" not in c]
    return replace(
        plan,
        devices=tuple(devices),
        stages=tuple(stages),
        routing={t: tuple(c) for t, c in routing.items()},
        lanes=tuple(Lane(w) for w in weights),
    )


class Recorder:
    """A chain handler that keeps every push and failure report and never answers."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.failures: list[tuple[str, str]] = []

    def deliver(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)

    def failed(self, request_id: str, code: str, message: str, deadline_ms: float) -> None:
        self.failures.append((request_id, code))


@dataclass
class Stalled:
    """A front end whose one stage server (`chain`, recording into `stage`) never answers: its
    requests stay in flight until their deadline, the client leaves or the server sheds them."""

    frontend: FrontendHandle
    chain: ChainHandle
    stage: Recorder

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.frontend.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.frontend.http_port}"

    def errors(self, code: str) -> float:
        """Requests failed with the gRPC status `code`, as the front end's metrics count them."""
        registry = self.frontend.gateway.metrics.registry
        return registry.get_sample_value("moirai_request_errors_total", {"code": code}) or 0.0

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        """Wait for `condition`, at most 20 s (only a hang takes that long)."""
        for _ in range(400):
            if condition():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"not reached: {what}")


@pytest.fixture
async def stalled() -> AsyncIterator[Callable[..., object]]:
    """`await stalled(model, **options)`: a `Stalled` front end for `model` (a plan of one stage),
    started with the options of `start_gateway`."""
    started: list[Stalled] = []

    async def launch(model: onnx.ModelProto, **options: object) -> Stalled:
        plan = split_plan(model, 1)
        stage = Recorder()
        chain = await start_chain(stage)
        (port,) = free_ports(1)
        addresses = {"cpu-0": f"127.0.0.1:{chain.port}", "gateway": f"127.0.0.1:{port}"}
        frontend = await start_gateway(plan, addresses, chain_port=port, **options)
        s = Stalled(frontend, chain, stage)
        started.append(s)
        assert await frontend.gateway.wait_ready(10)
        return s

    yield launch
    for s in started:
        await s.frontend.stop(0)
        await s.chain.stop(0)
