"""Dynamic batching benchmark: requests/s of `moirai serve` with and without batching.

    .venv/bin/python bench/batching.py [--quick] [--window 30] [--rounds 1] [--cpu-devices 1] \
        [--max-batch-size 8] [--max-queue-delay-us 2000] [--processes 4] [--inflight 4]

ResNet-50 (`moirai.zoo`, its fixed batch of 1 made symbolic by `zoo.with_symbolic_batch`) is
planned for this machine (`--cpu-devices 1`: one stage server with every core's thread, as one
model instance in Triton) and served by the real processes of `moirai serve`
(`moirai.runtime.local.LocalDeployment`), once without batching and once with
`--max-batch-size 8 --max-queue-delay-us 2000`. Both are driven alike: several client
*processes* (one Python client is itself a bottleneck), each keeping `--inflight` gRPC requests
of one 1x3x224x224 image in flight (16 in all by default); each client checks its first answer
against in-process ONNX Runtime on that image alone. Over a load window after a warm-up: the
requests completed per second, and the CPU every serving process spent per request. The two
deployments run in turns (unbatched, batched, batched, unbatched for two rounds...), so that both
see the same machine; the figure is the ratio of their requests/s. Beside them, in-process ONNX
Runtime with the same session options and threads at batch 1 and at the largest batch: how much a
batch can gain on this CPU at all. The batched deployment's own metrics, over the window, give
the batches' mean size and the mean time a request waited in the batch queue.

A second, small table measures the path of stage outputs of dynamic size (a batch crossing a
stage border): a stage's output of open shape, ResNet-50's first border at batch 8 (8x256x56x56
FP32, 25.7 MB), either left to ONNX Runtime and copied into shared memory for the push, as the
first run at a batch size does, or bound to a shared-memory file of the stage server's arena, as
later runs at that size do (`stage_server.sessions.StageSession`): CPU per run of the stage plus
the hand-over to a same-host push.

Writes bench/results/batching.md (the tables, with the command and the load average) and
batching.json. Goal (issue 10): batched >= 1.3x the unbatched requests/s on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from loadgen import drive  # noqa: E402

from moirai import zoo  # noqa: E402
from moirai.devices import local_devices  # noqa: E402
from moirai.planning import plan_model  # noqa: E402
from moirai.planning.cpu import split_cpu  # noqa: E402
from moirai.runtime.local import LocalDeployment  # noqa: E402
from moirai.sessions import session_options  # noqa: E402
from stage_server.batchconfig import BatchingConfig  # noqa: E402

RESULTS = ROOT / "bench" / "results"
GOAL = 1.3


# ------------------------------------------------------------------ measuring
def load(
    deployment: LocalDeployment,
    model: str,
    name: str,
    images: list[np.ndarray],
    wants: list[np.ndarray],
    *,
    inflight: int,
    warmup_s: float,
    window_s: float,
    batched: bool,
) -> dict:
    """Drive the deployment from client processes (one image each); requests/s and the serving
    processes' CPU per request over the window, and for a batched deployment its batches over
    the window."""
    result = drive(
        deployment.grpc_url,
        model,
        [{name: x} for x in images],
        pids=list(deployment.pids.values()),
        want=wants,
        processes=len(images),
        inflight=inflight,
        warmup_s=warmup_s,
        window_s=window_s,
        snapshot=(lambda: batch_metrics(deployment)) if batched else None,
    )
    if batched:
        b0, b1 = result.pop("snapshots")
        d = {k.removeprefix("moirai_batch_"): b1[k] - b0[k] for k in b1}
        result["batches"] = d["size_count"]
        result["mean_batch_size"] = d["size_sum"] / max(d["size_count"], 1)
        result["mean_queue_ms"] = 1000 * d["queue_seconds_sum"] / max(d["queue_seconds_count"], 1)
    return result


def batch_metrics(deployment: LocalDeployment) -> dict[str, float]:
    """The batcher's counters so far, from the gateway's metrics."""
    with urllib.request.urlopen(f"http://{deployment.http_url}/metrics", timeout=30) as r:
        text = r.read().decode()
    names = [
        "moirai_batch_size_count",
        "moirai_batch_size_sum",
        "moirai_batch_queue_seconds_count",
        "moirai_batch_queue_seconds_sum",
    ]
    values = {}
    for name in names:
        match = re.search(rf"^{name} (\S+)$", text, re.M)
        values[name] = float(match.group(1)) if match else 0.0
    return values


def in_process_rps(session: ort.InferenceSession, name: str, batch: int, window_s: float) -> float:
    """Images/s of in-process ONNX Runtime running batches of `batch` back to back."""
    x = np.random.default_rng(batch).random((batch, 3, 224, 224), dtype=np.float32)
    session.run(None, {name: x})
    runs, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < window_s:
        session.run(None, {name: x})
        runs += 1
    return runs * batch / (time.perf_counter() - t0)


def dynamic_outputs(runs: int) -> dict:
    """CPU ms per run of a stage whose output has an open batch dimension plus its hand-over to
    a same-host push: copied from ONNX Runtime's memory into a pool file (first time at a batch
    size) against bound to an arena file (every later time)."""
    from onnx import TensorProto, helper

    from moirai.stageplan import TensorSpec
    from stage_server import shm
    from stage_server.sessions import StageSession

    shape = (8, 256, 56, 56)
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "border",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *shape[1:]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", *shape[1:]])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    session = ort.InferenceSession(
        model.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"]
    )
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    spec = [TensorSpec("y", "FP32", (-1, *shape[1:]))]
    out = {}
    arena, pool = shm.Arena(), shm.Pool()
    for label, remember in (("copied (first run at a batch size)", 0), ("bound (later runs)", 64)):
        stage = StageSession(session, spec, arena)
        stage.SEEN_SHAPES = remember
        times = []
        for _ in range(runs + 1):
            t0 = time.thread_time()
            (y,) = stage.run({"x": x})
            tensor, _ = pool.take(y)
            times.append(time.thread_time() - t0)
            del y
            pool.give_back([tensor])
        out[label] = 1000 * float(np.median(times[1:]))
    arena.close()
    pool.close()
    return {"shape": list(shape), "mbytes": x.nbytes / 1e6, "cpu_ms": out}


# ---------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> dict:
    config = BatchingConfig(args.max_batch_size, (), args.max_queue_delay_us)
    with tempfile.TemporaryDirectory(prefix="moirai-bench-batching-") as tmp:
        path = Path(tmp) / "resnet50.onnx"
        model = zoo.with_symbolic_batch(onnx.load(str(zoo.get("resnet50"))))
        onnx.save(model, path)
        devices = split_cpu(local_devices(), args.cpu_devices)
        plan = plan_model(path, devices, objective="throughput", time_limit=10).plan
        threads = max(d.threads or 1 for d in plan.devices if d.name in plan.used_devices)
        name = plan.inputs[0].name
        session = ort.InferenceSession(
            model.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"]
        )
        rng = np.random.default_rng(0)
        images = [rng.random((1, 3, 224, 224), dtype=np.float32) for _ in range(args.processes)]
        wants = [session.run(None, {name: x})[0] for x in images]
        ort_rps = {
            b: in_process_rps(session, name, b, args.window / 2) for b in (1, args.max_batch_size)
        }
        del session
        print(f"in-process ONNX Runtime, {threads} threads: {ort_rps}", flush=True)
        order: list[str] = []
        for i in range(args.rounds):  # in turns: unbatched, batched, batched, unbatched...
            order += ["unbatched", "batched"][:: 1 if i % 2 == 0 else -1]
        runs: dict[str, list[dict]] = {"unbatched": [], "batched": []}
        for i, variant in enumerate(order):
            batching = config if variant == "batched" else BatchingConfig()
            with LocalDeployment(
                plan, path, Path(tmp) / f"run{i}", batching=batching
            ) as deployment:
                result = load(
                    deployment,
                    plan.model_name,
                    name,
                    images,
                    wants,
                    inflight=args.inflight,
                    warmup_s=args.warmup,
                    window_s=args.window,
                    batched=variant == "batched",
                )
            runs[variant].append(result)
            print(variant, result, flush=True)
    rps = {v: sum(r["rps"] for r in rs) / len(rs) for v, rs in runs.items()}
    dynamic = dynamic_outputs(5 if args.quick else 20)
    print("dynamic outputs", dynamic, flush=True)
    return {
        "model": "resnet50 (zoo, symbolic batch)",
        "stages": len(plan.stages),
        "devices": [
            f"{d.name} ({d.threads} threads)" for d in plan.devices if d.name in plan.used_devices
        ],
        "threads": threads,
        "config": {
            "max_batch_size": config.max_batch_size,
            "max_queue_delay_us": config.max_queue_delay_us,
        },
        "clients": {"processes": args.processes, "inflight": args.inflight},
        "window_s": args.window,
        "ort_images_per_s": {str(b): v for b, v in ort_rps.items()},
        "runs": runs,
        "rps": rps,
        "speedup": rps["batched"] / rps["unbatched"],
        "dynamic_outputs": dynamic,
        "loadavg": os.getloadavg(),
        "command": " ".join(["flock /tmp/moirai-heavy.lock .venv/bin/python", *sys.argv]),
    }


def report(r: dict) -> str:
    mean = {
        v: {k: sum(run[k] for run in runs) / len(runs) for k in runs[0] if k != "requests"}
        for v, runs in r["runs"].items()
    }
    b = mean["batched"]
    ort_1, ort_max = r["ort_images_per_s"].values()
    big = r["config"]["max_batch_size"]
    lines = [
        "# Dynamic batching",
        "",
        f"{r['model']}, {r['stages']} stage(s) on {', '.join(r['devices'])}; "
        f"{r['clients']['processes']} client processes x {r['clients']['inflight']} requests of "
        f"one image in flight over gRPC; {r['window_s']:.0f} s windows, "
        f"{len(r['runs']['batched'])} per variant, in turns. Load average "
        f"{', '.join(f'{v:.2f}' for v in r['loadavg'])} (a shared machine: every figure moves "
        "with it).",
        "",
        "| serving | requests/s | server CPU ms / request | mean batch | mean queue ms |",
        "|---|---:|---:|---:|---:|",
        f"| unbatched | {mean['unbatched']['rps']:.2f} | "
        f"{mean['unbatched']['server_cpu_ms']:.0f} | 1 | - |",
        f"| batched (max {big}, delay {r['config']['max_queue_delay_us']} us) | {b['rps']:.2f} | "
        f"{b['server_cpu_ms']:.0f} | {b['mean_batch_size']:.1f} | {b['mean_queue_ms']:.0f} |",
        "",
        f"**Batched / unbatched: {r['speedup']:.2f}x** (goal >= {GOAL}x). In-process ONNX "
        f"Runtime at {r['threads']} threads: {ort_1:.2f} images/s at batch 1, {ort_max:.2f} at "
        f"batch {big} ({ort_max / ort_1:.2f}x): what batching can gain on this CPU at all.",
        "",
        f"A stage output of open size, {r['dynamic_outputs']['mbytes']:.1f} MB "
        f"({'x'.join(map(str, r['dynamic_outputs']['shape']))} FP32, the first border of "
        "ResNet-50 at batch 8), run and handed to a same-host push, CPU ms per run:",
        "",
        "| output | CPU ms |",
        "|---|---:|",
        *(f"| {k} | {v:.1f} |" for k, v in r["dynamic_outputs"]["cpu_ms"].items()),
        "",
        f"Reproduce: `{r['command']}`",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short windows, for development")
    parser.add_argument("--window", type=float, default=30.0, help="load window, seconds")
    parser.add_argument("--warmup", type=float, default=5.0, help="warm-up before it, seconds")
    parser.add_argument("--rounds", type=int, default=1, help="pairs of turns per variant")
    parser.add_argument("--cpu-devices", type=int, default=1, help="stage servers (default 1)")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-queue-delay-us", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=4, help="client processes")
    parser.add_argument("--inflight", type=int, default=4, help="requests in flight per client")
    args = parser.parse_args()
    if args.quick:
        args.window, args.warmup = 8.0, 2.0
    result = run(args)
    text = report(result)
    print(text)
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "batching.md").write_text(text, encoding="utf-8")
        (RESULTS / "batching.json").write_text(json.dumps(result, indent=1) + "\n", "utf-8")


if __name__ == "__main__":
    main()
