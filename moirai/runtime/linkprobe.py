"""The hop between two stage servers on this machine, measured on the serving path.

A hop in serving is more than bytes on a socket: the sending stage encodes its outputs
(`stage_server.codec`) and pushes them (`stage_server.chain.Peers.push`, one
`moirai.stage.v1.Chain/Push`), the receiving stage server decodes them, files them with the
request and hands the stage to its worker thread, which calls ONNX Runtime. So the hop is
measured on exactly that path: the measuring process pushes a tensor with the stage servers'
own `Peers` to a real stage server (`stage_server.serve.start_stage`, in a child process pinned
to another core, as the local runtime pins stage servers), whose one stage — a `Shape` node, no
work — answers with 8 bytes to the measuring process, which plays the gateway. A sample is the
round trip less half the round trip of a 4-byte tensor: the answer's own trip back. One clock
times both ends, so no clocks need to agree.

Each payload size is warmed up, then repeated; `moirai.profile.links.fit` fits the medians.
`measure_loopback` is the `moirai.profile.links.LinkProbe` that measured profiling is given.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import numpy as np
import onnx
from onnx import helper

from moirai.devices import pinned
from moirai.errors import MoiraiError
from moirai.partition import build_plan
from moirai.profile.links import DEFAULT_SIZES, KIB, PATH, LinkFit, LinkSample, fit
from moirai.stageplan import GATEWAY, DeviceSpec, StagePlan
from stage_server.chain import ChainServicer, Delivery, Peers, now_ms
from stage_server.protos import stage_pb2_grpc
from stage_server.serve import start_stage

HOP = "hop"
STAGE = "s0"
LOCALHOST = "127.0.0.1"
_SERVER_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
_DEADLINE_MS = 60_000.0


def _hop_model() -> onnx.ModelProto:
    """One `Shape` node over a float tensor of any length: the receiving stage does no work
    and answers with 8 bytes, whatever it was sent."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n"])
    n = helper.make_tensor_value_info("n", onnx.TensorProto.INT64, [1])
    graph = helper.make_graph(
        [helper.make_node("Shape", ["x"], ["n"], name="shape")], "hop", [x], [n]
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _hop_plan() -> StagePlan:
    return build_plan(_hop_model(), {"shape": HOP}, [DeviceSpec(HOP, threads=1)], model_name="hop")


class _Arrivals:
    """The gateway's end of the measurement: resolves the waiter of each returning request."""

    def __init__(self) -> None:
        self.waiting: dict[str, asyncio.Future[float]] = {}

    def deliver(self, delivery: Delivery) -> None:
        waiter = self.waiting.pop(delivery.request_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(time.perf_counter())

    def failed(self, request_id: str, code: str, message: str, deadline_ms: float) -> None:
        waiter = self.waiting.pop(request_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_exception(MoiraiError(f"the link's stage failed: {code} {message}"))


async def _serve_arrivals(arrivals: _Arrivals) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(options=_SERVER_OPTIONS)
    stage_pb2_grpc.add_ChainServicer_to_server(ChainServicer(arrivals), server)
    port = server.add_insecure_port(f"{LOCALHOST}:0")
    await server.start()
    return server, port


async def _round_trip(peers: Peers, arrivals: _Arrivals, payload: np.ndarray) -> float:
    rid = uuid.uuid4().hex
    waiter: asyncio.Future[float] = asyncio.get_running_loop().create_future()
    arrivals.waiting[rid] = waiter
    started = time.perf_counter()
    await peers.push(STAGE, rid, {"x": payload}, now_ms() + _DEADLINE_MS)
    return (await asyncio.wait_for(waiter, _DEADLINE_MS / 1000.0) - started) * 1000.0


async def _start_stage_process(gateway: str, core: int | None) -> tuple[Any, str]:
    command = [sys.executable, "-m", "moirai.runtime.linkprobe", "--gateway", gateway]
    command += ["--parent", str(os.getpid())]
    if core is not None:
        command += ["--cpu", str(core)]
    process = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()
    if not line.startswith("stage on "):
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        error = " ".join((await process.stderr.read()).decode().split())[-300:]
        raise MoiraiError(f"the link's stage server did not start: {error or 'no output'}")
    return process, line.removeprefix("stage on ").strip()


async def measure(
    sizes: Sequence[int] = DEFAULT_SIZES,
    repeats: int = 10,
    warmup: int = 2,
    progress: Callable[[str], None] | None = None,
    core: int | None = None,
) -> list[LinkSample]:
    """Hop times to a real stage server in a child process (pinned to `core`) for each payload
    size (module docstring)."""
    arrivals = _Arrivals()
    server, port = await _serve_arrivals(arrivals)
    gateway = f"{LOCALHOST}:{port}"
    try:
        process, address = await _start_stage_process(gateway, core)
    except BaseException:
        await server.stop(None)
        raise
    peers = Peers(_hop_plan(), {HOP: address, GATEWAY: gateway})
    try:
        tiny = np.zeros(1, np.float32)
        for _ in range(10):  # connect both ways, and let both ends settle, before timing
            await _round_trip(peers, arrivals, tiny)
        back = statistics.median([await _round_trip(peers, arrivals, tiny) for _ in range(20)])
        samples = []
        for size in sizes:
            payload = np.zeros(max(1, size // 4), dtype=np.float32)
            # Fewer repeats for the large payloads: their spread is small relative to their time.
            count = max(3, repeats if size <= 4 * KIB**2 else repeats // 2)
            times = [await _round_trip(peers, arrivals, payload) for _ in range(warmup + count)]
            # The 8-byte answer's trip back is about half a tiny round trip: not part of the hop.
            samples.append(LinkSample(payload.nbytes, tuple(t - back / 2 for t in times[warmup:])))
            if progress:
                progress(f"link: {_human(size)} in {samples[-1].median_ms:.3f} ms")
    finally:
        await peers.close()
        process.terminate()
        await process.wait()
        await server.stop(None)
    return samples


def measure_loopback(
    sizes: Sequence[int] = DEFAULT_SIZES,
    repeats: int = 10,
    warmup: int = 2,
    *,
    progress: Callable[[str], None] | None = None,
) -> LinkFit:
    """The hop between two stage servers on this machine, measured and fitted. The sending end
    runs on the first core and the receiving stage server on the last, as the local runtime
    pins stage servers to their own cores."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    with pinned(cores[:1] if len(cores) > 1 else []):
        samples = asyncio.run(
            measure(sizes, repeats, warmup, progress, cores[-1] if len(cores) > 1 else None)
        )
    return fit(samples, PATH)


def _human(nbytes: int) -> str:
    exponent = min(int(math.log(max(nbytes, 1), 1024)), 3)
    return f"{nbytes / 1024**exponent:g} {('B', 'KiB', 'MiB', 'GiB')[exponent]}"


def serve_stage(gateway: str, parent: int | None = None) -> None:
    """Run the receiving stage server of a link measurement until process `parent` is gone;
    prints its address."""

    async def serve() -> None:
        plan = _hop_plan()
        # Its own address matters only to others: any placeholder satisfies `Peers`.
        addresses = {HOP: f"{LOCALHOST}:0", GATEWAY: gateway}
        handle = await start_stage(_hop_model(), plan, HOP, addresses, host=LOCALHOST)
        print(f"stage on {LOCALHOST}:{handle.port}", flush=True)
        while parent is None or os.getppid() == parent:
            await asyncio.sleep(0.5)
        await handle.stop(None)

    asyncio.run(serve())


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m moirai.runtime.linkprobe --gateway HOST:PORT`: the receiving stage server."""
    parser = argparse.ArgumentParser(prog="python -m moirai.runtime.linkprobe")
    parser.add_argument("--gateway", required=True, help="where the stage sends its answers")
    parser.add_argument("--cpu", type=int, help="pin to this core")
    parser.add_argument("--parent", type=int, help="exit when this process is gone")
    args = parser.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    serve_stage(args.gateway, args.parent)


if __name__ == "__main__":
    main()
