"""Measured links: what moving a tensor from one stage server to another costs, fitted as
`latency + bytes / bandwidth`.

The measurement uses the serving path itself, not a synthetic socket test: the sender is
`stage_server.chain.Peers.push` (codec to raw bytes, one `moirai.stage.v1.Chain/Push` per
tensor batch, the chain's channel options) and the receiver is `stage_server.chain.
ChainServicer` decoding the tensors and handing them to a sink, in another process, pinned to
another core when there is one, exactly as two stage servers are. A sample is the duration of
one Push call as the sender sees it: serialising, sending, the receiver decoding and accepting,
and the empty reply. The reply makes it an upper bound on the one-way time by half an empty
round trip (tens of µs on loopback), which needs no clock shared between two machines.

Payloads go from 1 KiB to 64 MiB by powers of 4; each size is warmed up, then repeated, and
summarised by its median, so a stray slow call (a garbage collection, a scheduler hiccup) does
not move the fit. The fit is weighted least squares on relative error (weights 1/t²), because
the sizes span five orders of magnitude and ordinary least squares would let the largest
payloads decide the intercept alone; a few Huber-reweighted iterations then discount sizes that
sit far off the line. A negative intercept is refitted through the origin. The fit records R²
(on the per-size medians) and the largest relative residual, so a reader can see whether the
line describes the link.

`serve_sink` runs just the receiving end (`python -m moirai.profile.links --sink --port P`), so
the link between two machines can be measured the same way with `measure(address)`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from moirai.costgraph import Link
from moirai.errors import MoiraiError
from moirai.partition import DeviceSpec, Stage, StagePlan
from stage_server.chain import ChainServicer, Delivery, Peers, now_ms
from stage_server.protos import stage_pb2_grpc

KIB = 1024
DEFAULT_SIZES = tuple(KIB * 4**i for i in range(9))  # 1 KiB ... 64 MiB
SINK = "sink"
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
    path: str = "grpc-loopback"
    """How it was measured: `grpc-loopback` (two local processes) or `grpc:<address>`."""

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
            path=str(data.get("path", "grpc-loopback")),
        )


# ------------------------------------------------------------------------- fit
def fit(samples: Sequence[LinkSample], path: str = "grpc-loopback") -> LinkFit:
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
def _sink_plan() -> StagePlan:
    """A plan with one empty stage on one device: what `Peers` needs to address the sink."""
    return StagePlan(
        model_name="link",
        devices=(DeviceSpec(SINK),),
        inputs=(),
        outputs=(),
        tensors={},
        stages=(Stage(SINK, SINK, (), (), ()),),
        routing={},
    )


class _Sink:
    """The receiving end: accepts every delivery and forgets it."""

    def deliver(self, delivery: Delivery) -> None:
        pass

    def failed(self, request_id: str, code: str, message: str, deadline_ms: float) -> None:
        pass


async def _start_sink(host: str, port: int) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(options=_SERVER_OPTIONS)
    stage_pb2_grpc.add_ChainServicer_to_server(ChainServicer(_Sink()), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise MoiraiError(f"cannot listen on {host}:{port} (in use?)")
    await server.start()
    return server, bound


def serve_sink(
    host: str = "127.0.0.1",
    port: int = 0,
    ready: Callable[[int], None] = print,
    parent: int | None = None,
) -> None:
    """Run a sink until killed, or until process `parent` is gone; `ready` gets the port."""

    async def serve() -> None:
        server, bound = await _start_sink(host, port)
        ready(bound)
        while parent is None or os.getppid() == parent:
            await asyncio.sleep(0.5)
        await server.stop(None)

    asyncio.run(serve())


@contextlib.contextmanager
def loopback_sink() -> Iterator[str]:
    """A sink in a child process (on the last core, when there are two or more); its address.
    The child exits with this process, even when this one is killed."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    command = [sys.executable, "-m", "moirai.profile.links", "--sink", "--parent", str(os.getpid())]
    if len(cores) > 1:
        command += ["--cpu", str(cores[-1])]
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        line = process.stdout.readline()
        if not line.startswith("sink on "):
            error = " ".join(process.stderr.read().split())[-300:]
            raise MoiraiError(f"the link sink did not start: {error or 'no output'}")
        yield line.removeprefix("sink on ").strip()
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def measure(
    address: str,
    sizes: Sequence[int] = DEFAULT_SIZES,
    repeats: int = 10,
    warmup: int = 2,
    progress: Callable[[str], None] | None = None,
) -> list[LinkSample]:
    """Push durations to the sink at `address` for each payload size."""
    peers = Peers(_sink_plan(), {SINK: address})
    samples = []
    try:
        for _ in range(3):  # connect, and let both ends settle, before anything is timed
            await peers.push(SINK, uuid.uuid4().hex, {"x": np.zeros(1, np.float32)}, _deadline())
        for size in sizes:
            payload = {"x": np.zeros(max(1, size // 4), dtype=np.float32)}
            # Fewer repeats for the large payloads: their spread is small relative to their time.
            count = max(3, repeats if size <= 4 * KIB**2 else repeats // 2)
            times = []
            for i in range(warmup + count):
                started = time.perf_counter()
                await peers.push(SINK, uuid.uuid4().hex, payload, _deadline())
                if i >= warmup:
                    times.append((time.perf_counter() - started) * 1000.0)
            samples.append(LinkSample(payload["x"].nbytes, tuple(times)))
            if progress:
                progress(f"link: {_human(size)} in {statistics.median(times):.3f} ms")
    finally:
        await peers.close()
    return samples


def _deadline() -> float:
    return now_ms() + _DEADLINE_MS


def measure_loopback(
    sizes: Sequence[int] = DEFAULT_SIZES,
    repeats: int = 10,
    warmup: int = 2,
    progress: Callable[[str], None] | None = None,
) -> LinkFit:
    """The link between two stage servers on this machine, measured and fitted. The sender is
    pinned to the first core and the sink to the last, as the local runtime pins stage
    servers."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    with loopback_sink() as address, _pinned_to(cores[:1] if len(cores) > 1 else []):
        samples = asyncio.run(measure(address, sizes, repeats, warmup, progress))
    return fit(samples, "grpc-loopback")


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


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m moirai.profile.links --sink [--port P]`: the receiving end of a link, for
    `measure(address)` from another machine (and for `loopback_sink`)."""
    parser = argparse.ArgumentParser(prog="python -m moirai.profile.links")
    parser.add_argument("--sink", action="store_true", required=True, help="run a sink")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cpu", type=int, help="pin to this core")
    parser.add_argument("--parent", type=int, help="exit when this process is gone")
    args = parser.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    serve_sink(
        args.host,
        args.port,
        ready=lambda port: print(f"sink on {args.host}:{port}", flush=True),
        parent=args.parent,
    )


if __name__ == "__main__":
    main()
