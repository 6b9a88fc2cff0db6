"""`moirai demo`: Moirai's main job, end to end, on a bundled model or your own.

    moirai demo [--model squeezenet|model.onnx] [--requests 30] [--concurrency 8] [--window 2]
                [planning flags]

The objective defaults to throughput here (pipelines or copies of the model over every device),
and the profile to measured (cached after the first run).

Plans the model over this machine's devices (the CPU's cores grouped as serves best, GPUs when
present), serves it with one stage server per device and the gateway, sends requests through the
Open Inference Protocol (random inputs at the priced shapes: `--input-shape` for a model with
symbolic dimensions), checks every output against single-process ONNX Runtime on the whole
model, prints the plan, the latency and throughput predicted for the plan as served against the
measured ones and those of in-process ONNX Runtime with as many threads, and shuts everything
down. Throughput is counted over a window of `--window` seconds, after a warm-up, for the
served plan and for ONNX Runtime alike, and so is the CPU per request: every thread of every
serving process (`moirai.runtime.cputime`), against the CPU of ONNX Runtime's runs in this
process. Exit status 0 when every output matched, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from moirai.cli.options import positive_float, positive_int
from moirai.cli.serve import add_planning_arguments, plan_from_args

TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="plan, serve and check a model end to end")
    p.add_argument(
        "--model",
        default="squeezenet",
        help="a bundled model (moirai.zoo: " + ", ".join(_bundled()) + ") or an ONNX file",
    )
    p.add_argument("--requests", type=positive_int, default=30, help="sequential requests timed")
    p.add_argument(
        "--concurrency", type=positive_int, default=8, help="requests in flight for throughput"
    )
    p.add_argument(
        "--window", type=positive_float, default=2.0, help="seconds throughput is counted over"
    )
    add_planning_arguments(p)
    # Pipelining across the devices is what serving many requests needs.
    p.set_defaults(func=run, objective="throughput")


async def _throughput(
    url: str,
    model: str,
    inputs: dict[str, np.ndarray],
    seconds: float,
    c: int,
    servers: Sequence[int],
) -> tuple[float, float]:
    """Requests/s answered with `c` in flight over `seconds`, after one round to warm up, and
    the CPU ms per request of the processes `servers` and their descendants meanwhile."""
    from moirai.runtime.cputime import cpu_ms
    from stage_server.client import AsyncInferenceClient

    client = AsyncInferenceClient(url)
    await asyncio.gather(*(client.infer(model, inputs) for _ in range(c)))
    answered = 0
    cpu_before = cpu_ms(servers)
    start = time.perf_counter()
    deadline = start + seconds

    async def worker() -> None:
        nonlocal answered
        while time.perf_counter() < deadline:
            await client.infer(model, inputs)
            answered += 1

    await asyncio.gather(*(worker() for _ in range(c)))
    elapsed = time.perf_counter() - start
    cpu = cpu_ms(servers) - cpu_before
    await client.close()
    return answered / elapsed, cpu / max(answered, 1)


def _runs_per_second(run: Callable[[], object], seconds: float) -> tuple[float, float]:
    """Runs/s of `run` over `seconds`, and this process's CPU ms per run meanwhile."""
    runs, start, cpu_before = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        run()
        runs += 1
    cpu = (time.process_time() - cpu_before) * 1000
    return runs / (time.perf_counter() - start), cpu / max(runs, 1)


def _bundled() -> list[str]:
    from moirai import zoo

    return list(zoo.names())


def _model(name: str) -> tuple[Path, dict[str, list[int]] | None]:
    """The file of `--model` and the input shapes it is priced at (None: `--input-shape`)."""
    from moirai import zoo
    from moirai.errors import MoiraiError

    if name in zoo.names():
        return zoo.get(name), zoo.input_shapes(name)
    if Path(name).is_file():
        return Path(name), None
    raise MoiraiError(
        f"--model {name}: no bundled model and no file of that name; bundled models are "
        f"{', '.join(zoo.names())}"
    )


def run(args: argparse.Namespace) -> int:
    import onnxruntime as ort

    from moirai.errors import MoiraiError, one_line
    from moirai.planning import Prediction, describe
    from moirai.profile.measured import random_strings
    from moirai.runtime.local import LocalDeployment
    from stage_server.allocator import keep_freed_memory
    from stage_server.client import InferenceClient
    from stage_server.codec import DTYPES

    keep_freed_memory()  # this process is the client: no page faults per request (README)
    path, shapes = _model(args.model)
    planned = plan_from_args(args, path, shapes)
    plan = planned.plan
    print(describe(plan), flush=True)
    rng = np.random.default_rng(0)
    samples = [
        {
            t.name: rng.random(plan.priced_shape(t.name)).astype(DTYPES[t.datatype])
            if t.datatype in DTYPES
            else random_strings(rng, plan.priced_shape(t.name))  # BYTES
            for t in plan.inputs
        }
        for _ in range(3)
    ]
    # In-process ONNX Runtime at equal threads: every core the plan's CPU devices use.
    threads = sum(
        d.threads or 1 for d in plan.devices if d.kind == "cpu" and d.name in plan.used_devices
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    single = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in plan.outputs]
    try:
        expected = [dict(zip(names, single.run(names, s), strict=True)) for s in samples]
    except Exception as e:  # ORT raises its own exception types, without a common base
        raise MoiraiError(
            f"{path}: ONNX Runtime cannot run the model on random inputs ({one_line(e, 300)}): "
            "serve it with moirai serve and send your own with moirai infer"
        ) from None
    times = []
    for _ in range(args.requests):
        t0 = time.perf_counter()
        single.run(names, samples[0])
        times.append(time.perf_counter() - t0)
    single_ms = statistics.median(times) * 1000

    mismatches = 0
    with tempfile.TemporaryDirectory(prefix="moirai-demo-") as tmp:
        deployment = LocalDeployment(plan, path, Path(tmp))
        with deployment, InferenceClient(deployment.grpc_url) as client:
            print(f"serving on gRPC {deployment.grpc_url}, HTTP {deployment.http_url}", flush=True)
            for sample, want in zip(samples, expected, strict=True):
                got = client.infer(plan.model_name, sample)
                for name in names:
                    if want[name].dtype.kind in "OUS":  # strings: equal or not
                        if not np.array_equal(got[name], want[name]):
                            mismatches += 1
                            print(f"MISMATCH in {name}: the strings differ")
                    elif not np.allclose(got[name], want[name], **TOLERANCE):
                        mismatches += 1
                        print(
                            f"MISMATCH in {name}: max |diff| "
                            f"{np.max(np.abs(got[name] - want[name])):.3g}"
                        )
            times = []
            for _ in range(args.requests):
                t0 = time.perf_counter()
                client.infer(plan.model_name, samples[0])
                times.append(time.perf_counter() - t0)
            served_ms = statistics.median(times) * 1000
            # Single-process ORT runs over the same window right before, so that both
            # throughputs see the same machine.
            single_rps, single_cpu = _runs_per_second(
                lambda: single.run(names, samples[0]), args.window
            )
            rps, served_cpu = asyncio.run(
                _throughput(
                    deployment.grpc_url,
                    plan.model_name,
                    samples[0],
                    args.window,
                    args.concurrency,
                    list(deployment.pids.values()),
                )
            )
    predicted = Prediction.from_dict(plan.predicted)
    print()
    print(
        f"outputs equal single-process ONNX Runtime: {'yes' if not mismatches else 'NO'}"
        f" ({len(samples)} inputs, rtol {TOLERANCE['rtol']}, atol {TOLERANCE['atol']})"
    )
    print(
        f"latency    predicted {predicted.latency_ms:8.2f} ms     measured {served_ms:8.2f} ms "
        f"(median of {args.requests}; single-process ORT, {threads} threads: {single_ms:.2f} ms)"
    )
    print(
        f"throughput predicted {predicted.throughput_rps:8.1f} req/s  measured {rps:8.1f} req/s "
        f"at concurrency {args.concurrency} over {args.window:g} s (single-process ORT, "
        f"{threads} threads: {single_rps:.1f} req/s; {rps / single_rps:.2f}x)"
    )
    print(
        f"CPU        {served_cpu:8.2f} ms per request, every serving process together "
        f"(single-process ORT: {single_cpu:.2f} ms per run)"
    )
    return 1 if mismatches else 0
