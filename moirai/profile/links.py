"""Measured links: what a hop from one stage server to the next costs, fitted as
`latency + bytes / bandwidth`.

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

Payloads go from 1 KiB to 64 MiB by powers of 4; each size is warmed up, then repeated, and
summarised by its median, so a stray slow call (a garbage collection, a scheduler hiccup) does
not move the fit. The fit is weighted least squares on relative error (weights 1/t²), because
the sizes span five orders of magnitude and ordinary least squares would let the largest
payloads decide the intercept alone; a few Huber-reweighted iterations then discount sizes that
sit far off the line. A negative intercept is refitted through the origin. The fit records R²
(on the per-size medians) and the largest relative residual, so a reader can see whether the
line describes the link.
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import onnx
from onnx import helper

from moirai.costgraph import Link
from moirai.errors import MoiraiError
from moirai.partition import build_plan
from moirai.stageplan import GATEWAY, DeviceSpec, StagePlan
from stage_server.chain import ChainServicer, Delivery, Peers, now_ms
from stage_server.protos import stage_pb2_grpc
from stage_server.serve import start_stage

KIB = 1024
DEFAULT_SIZES = tuple(KIB * 4**i for i in range(9))  # 1 KiB ... 64 MiB
HOP = "hop"
STAGE = "s0"
PATH = "stage-server-loopback"
LINK_METHOD_VERSION = 2
"""Bump when the way links are measured changes: cached links then miss (1: bare Push)."""
LOCALHOST = "127.0.0.1"
_SERVER_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
_HUBER_K = 1.345  # the usual Huber constant, in units of the residuals' robust scale
_DEADLINE_MS = 60_000.0


@dataclass(frozen=True)
class LinkSample:
    """Push durations of one payload size."""

    bytes: int
    ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.ms)

    @property
    def spread_ms(self) -> float:
        """Interquartile range."""
        if len(self.ms) < 2:
            return 0.0
        q = statistics.quantiles(self.ms, n=4, method="inclusive")
        return q[2] - q[0]


@dataclass(frozen=True)
class LinkFit:
    """`latency_ms + bytes / bandwidth_bytes_per_s * 1000`, with how well it fits."""

    latency_ms: float
    bandwidth_bytes_per_s: float
    r2: float
    max_relative_residual: float
    samples: tuple[LinkSample, ...]
    path: str = PATH
    """How it was measured: `stage-server-loopback` (a stage server on this machine)."""

    @property
    def link(self) -> Link:
        return Link(bandwidth_bytes_per_s=self.bandwidth_bytes_per_s, latency_ms=self.latency_ms)

    def predict_ms(self, nbytes: int) -> float:
        return self.link.transfer_ms(nbytes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "latency_ms": self.latency_ms,
            "bandwidth_bytes_per_s": self.bandwidth_bytes_per_s,
            "r2": self.r2,
            "max_relative_residual": self.max_relative_residual,
            "samples": [
                {
                    "bytes": s.bytes,
                    "median_ms": s.median_ms,
                    "spread_ms": s.spread_ms,
                    "ms": list(s.ms),
                }
                for s in self.samples
            ],
        }

    @classmethod
    def from_dict(cls, data: Any) -> LinkFit:
        return cls(
            latency_ms=float(data["latency_ms"]),
            bandwidth_bytes_per_s=float(data["bandwidth_bytes_per_s"]),
            r2=float(data["r2"]),
            max_relative_residual=float(data["max_relative_residual"]),
            samples=tuple(
                LinkSample(int(s["bytes"]), tuple(float(x) for x in s["ms"]))
                for s in data.get("samples", [])
            ),
            path=str(data.get("path", PATH)),
        )


# ------------------------------------------------------------------------- fit
def fit(samples: Sequence[LinkSample], path: str = PATH) -> LinkFit:
    """Robust fit of `t = latency + bytes / bandwidth` (module docstring)."""
    if len({s.bytes for s in samples}) < 2:
        raise MoiraiError("a link fit needs samples of at least two payload sizes")
    x = np.array([s.bytes for s in samples], dtype=float)
    t = np.array([s.median_ms for s in samples], dtype=float)
    base = 1.0 / np.maximum(t, 1e-9) ** 2
    weights = base.copy()
    intercept, slope = _weighted_line(x, t, weights)
    for _ in range(5):
        relative = (t - intercept - slope * x) / np.maximum(t, 1e-9)
        scale = 1.4826 * float(np.median(np.abs(relative))) or 1e-12
        u = np.abs(relative) / (_HUBER_K * scale)
        weights = base * np.where(u <= 1.0, 1.0, 1.0 / np.maximum(u, 1e-12))
        intercept, slope = _weighted_line(x, t, weights)
    if intercept < 0:
        intercept, slope = 0.0, float(np.sum(weights * x * t) / np.sum(weights * x * x))
    if slope <= 0:
        raise MoiraiError(
            "the link measurements do not grow with payload size: the link is too noisy to fit "
            "(measure again on a quieter machine, or with more repeats)"
        )
    predicted = intercept + slope * x
    total = float(np.sum((t - t.mean()) ** 2))
    r2 = 1.0 - float(np.sum((t - predicted) ** 2)) / total if total > 0 else 1.0
    return LinkFit(
        latency_ms=float(intercept),
        bandwidth_bytes_per_s=1000.0 / slope,
        r2=r2,
        max_relative_residual=float(np.max(np.abs(t - predicted) / t)),
        samples=tuple(samples),
        path=path,
    )


def _weighted_line(x: np.ndarray, t: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """Intercept and slope minimising Σ w (t − a − b x)²."""
    sw, sx, st = w.sum(), (w * x).sum(), (w * t).sum()
    sxx, sxt = (w * x * x).sum(), (w * x * t).sum()
    det = sw * sxx - sx * sx
    slope = (sw * sxt - sx * st) / det
    return float((st - slope * sx) / sw), float(slope)


# ------------------------------------------------------------------ measuring
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
    command = [sys.executable, "-m", "moirai.profile.links", "--gateway", gateway]
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
    progress: Callable[[str], None] | None = None,
) -> LinkFit:
    """The hop between two stage servers on this machine, measured and fitted. The sending end
    runs on the first core and the receiving stage server on the last, as the local runtime
    pins stage servers to their own cores."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    with _pinned_to(cores[:1] if len(cores) > 1 else []):
        samples = asyncio.run(
            measure(sizes, repeats, warmup, progress, cores[-1] if len(cores) > 1 else None)
        )
    return fit(samples, PATH)


@contextlib.contextmanager
def _pinned_to(cores: Sequence[int]) -> Iterator[None]:
    if not cores:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(cores))
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


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
    """`python -m moirai.profile.links --gateway HOST:PORT`: the receiving stage server."""
    parser = argparse.ArgumentParser(prog="python -m moirai.profile.links")
    parser.add_argument("--gateway", required=True, help="where the stage sends its answers")
    parser.add_argument("--cpu", type=int, help="pin to this core")
    parser.add_argument("--parent", type=int, help="exit when this process is gone")
    args = parser.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    serve_stage(args.gateway, args.parent)


if __name__ == "__main__":
    main()
