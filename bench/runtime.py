"""Serving benchmark: chained stage servers against single-process ONNX Runtime.

    .venv/bin/python bench/runtime.py [--quick]

Writes bench/results/runtime.md (tables), runtime.json and runtime_*.png (plots):

1. latency of single-process ORT against the same model chained over 2, 3 and 4 stages
   (contiguous splits of the fusion groups in topological order, one stage server per stage);
2. per-hop overhead against tensor size (1 KiB to 64 MiB): a two-node model served as one stage
   and as two stages on two servers, the difference being one extra hop, next to the machine's
   loopback copy bandwidth (a raw TCP socket); goal: overhead <= 2 x bytes / bandwidth + 0.5 ms;
3. throughput (requests/s) at concurrency 1, 4, 8 and 16: single-process ORT on one thread
   against a two-device throughput plan (each device one core and one thread);
   goal: >= 1.5x at concurrency 8;
4. predicted (the solver's simulated makespan) against measured latency of latency plans.

Everything runs as real processes on loopback (`moirai.runtime.local.LocalDeployment`), with
the gateway and the load generator sharing the machine, as they would in `moirai serve`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moirai import zoo  # noqa: E402
from moirai.devices import local_devices  # noqa: E402
from moirai.partition import DeviceSpec, build_plan  # noqa: E402
from moirai.pipeline import build_costgraph  # noqa: E402
from moirai.runtime.local import LocalDeployment  # noqa: E402
from moirai.runtime.planning import plan_model, split_cpu  # noqa: E402
from stage_server.client import AsyncInferenceClient, InferenceClient  # noqa: E402
from stage_server.codec import DTYPES  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def inputs_for(plan, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        t.name: (
            rng.integers(0, 100, t.shape) if t.datatype == "INT64" else rng.random(t.shape)
        ).astype(DTYPES[t.datatype])
        for t in plan.inputs
    }


def single_session(model, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options)


def median_ms(fn, n: int) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def served_latency_ms(plan, model_path: Path, inputs, n: int, pin: bool = True) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        d = LocalDeployment(plan, model_path, Path(tmp), pin_cores=pin)
        with d, InferenceClient(d.grpc_url) as client:
            return median_ms(lambda: client.infer(plan.model_name, inputs, timeout_s=120), n)


# ------------------------------------------------------------------ 1. latency
def split_plan(model, costgraph, parts: int, name: str):
    order = list(costgraph.topological_order)
    per = -(-len(order) // parts)
    devices = [DeviceSpec(f"cpu-{i}", threads=1) for i in range(parts)]
    assignment = {t: f"cpu-{i // per}" for i, t in enumerate(order)}
    groups = {t.id: t.ops for t in costgraph.tasks}
    return build_plan(model, assignment, devices, groups=groups, model_name=name)


def bench_latency(names: list[str], n: int) -> list[dict]:
    rows = []
    devices = split_cpu(local_devices(), 2)
    for name in names:
        path = zoo.get(name)
        planned = plan_model(path, devices, input_shapes=zoo.input_shapes(name), time_limit=5)
        costgraph = build_costgraph(path, devices, zoo.input_shapes(name))
        inputs = inputs_for(planned.plan)
        session = single_session(planned.model)
        row = {"model": name, "single_ms": median_ms(partial(session.run, None, inputs), n)}
        for parts in (2, 3, 4):
            plan = split_plan(planned.model, costgraph, parts, planned.plan.model_name)
            # More stage servers than cores: no pinning, the OS shares the cores.
            row[f"chain{parts}_ms"] = served_latency_ms(plan, path, inputs, n, pin=parts <= 2)
        rows.append(row)
        print("latency", row, flush=True)
    return rows


# --------------------------------------------------------------- 2. per-hop
def loopback_bandwidth(nbytes: int) -> float:
    """Bytes/s of one transfer through a raw loopback TCP socket (best of 3)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    data = b"\1" * nbytes
    best = float("inf")
    for _ in range(3):

        def receive(buf: bytearray = bytearray(nbytes)) -> None:  # noqa: B008 - one per round
            conn, _ = server.accept()
            view, got = memoryview(buf), 0
            while got < nbytes:
                got += conn.recv_into(view[got:], nbytes - got)
            conn.sendall(b"k")
            conn.close()

        t = threading.Thread(target=receive)
        t.start()
        client = socket.create_connection(server.getsockname())
        t0 = time.perf_counter()
        client.sendall(data)
        client.recv(1)
        best = min(best, time.perf_counter() - t0)
        client.close()
        t.join()
    server.close()
    return nbytes / best


def hop_model(count: int):
    nodes = [helper.make_node("Neg", ["x"], ["a"], name="Neg_0"),
             helper.make_node("Abs", ["a"], ["y"], name="Abs_1")]  # fmt: skip
    graph = helper.make_graph(
        nodes, "hop", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [count])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [count])],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def bench_hops(sizes: list[int], tmp: Path) -> list[dict]:
    import onnx

    rows = []
    devices = [DeviceSpec("cpu-0", threads=1), DeviceSpec("cpu-1", threads=1)]
    for size in sizes:
        model = hop_model(size // 4)
        path = tmp / f"hop{size}.onnx"
        onnx.save(model, path)
        one = build_plan(model, {"Neg_0": "cpu-0", "Abs_1": "cpu-0"}, devices, model_name="hop")
        two = build_plan(model, {"Neg_0": "cpu-0", "Abs_1": "cpu-1"}, devices, model_name="hop")
        inputs = {"x": np.ones(size // 4, np.float32)}
        n = 30 if size <= 1 << 20 else 8
        base = served_latency_ms(one, path, inputs, n)
        chained = served_latency_ms(two, path, inputs, n)
        bandwidth = loopback_bandwidth(size)
        goal = 2 * size / bandwidth * 1000 + 0.5
        row = {
            "bytes": size,
            "one_stage_ms": base,
            "two_stages_ms": chained,
            "hop_ms": chained - base,
            "loopback_gb_s": bandwidth / 1e9,
            "goal_ms": goal,
            "met": chained - base <= goal,
        }
        rows.append(row)
        print("hop", row, flush=True)
    return rows


# ------------------------------------------------------------- 3. throughput
async def _rps(url: str, model: str, inputs, concurrency: int, total: int) -> float:
    client = AsyncInferenceClient(url)
    await client.infer(model, inputs, timeout_s=120)
    left = [total]

    async def worker() -> None:
        while left[0] > 0:
            left[0] -= 1
            await client.infer(model, inputs, timeout_s=120)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    await client.close()
    return total / elapsed


def bench_throughput(name: str, concurrencies: list[int], total: int) -> dict:
    path = zoo.get(name)
    devices = split_cpu(local_devices(), 2)
    planned = plan_model(
        path, devices, input_shapes=zoo.input_shapes(name), objective="throughput", time_limit=10
    )
    inputs = inputs_for(planned.plan)
    session = single_session(planned.model)
    single_rps = 1000.0 / median_ms(lambda: session.run(None, inputs), 10)
    result = {
        "model": name,
        "stages": len(planned.plan.stages),
        "predicted_period_ms": planned.plan.predicted.get("period_ms"),
        "single_rps": single_rps,
        "served_rps": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        d = LocalDeployment(planned.plan, path, Path(tmp))
        with d:
            for c in concurrencies:
                rps = asyncio.run(_rps(d.grpc_url, planned.plan.model_name, inputs, c, total))
                result["served_rps"][c] = rps
                print("throughput", name, c, rps, "single", single_rps, flush=True)
    return result


# ------------------------------------------------------- 4. predicted vs real
def bench_predicted(names: list[str], n: int) -> list[dict]:
    rows = []
    devices = split_cpu(local_devices(), 2)
    for name in names:
        path = zoo.get(name)
        planned = plan_model(path, devices, input_shapes=zoo.input_shapes(name), time_limit=5)
        inputs = inputs_for(planned.plan)
        rows.append(
            {
                "model": name,
                "stages": len(planned.plan.stages),
                "devices": len(planned.plan.used_devices),
                "predicted_ms": planned.plan.predicted["makespan_ms"],
                "measured_ms": served_latency_ms(planned.plan, path, inputs, n),
            }
        )
        print("predicted", rows[-1], flush=True)
    return rows


# ------------------------------------------------------------------ report
def report(results: dict) -> str:
    out = [
        "# Serving benchmark (`bench/runtime.py`)",
        "",
        f"{results['machine']['cores']} cores; load average before/after the run: "
        f"{results['machine']['load_before']:.1f} / {results['machine']['load_after']:.1f} "
        "(other processes on the machine skew every figure when it is above 0).",
        "",
    ]
    out += ["## Latency: single-process ORT (1 thread) vs chained stages (ms, median)", "",
            "| model | single | 2 stages | 3 stages | 4 stages |",
            "|---|---|---|---|---|"]  # fmt: skip
    for r in results["latency"]:
        out.append(f"| {r['model']} | {r['single_ms']:.1f} | {r['chain2_ms']:.1f} | "
                   f"{r['chain3_ms']:.1f} | {r['chain4_ms']:.1f} |")  # fmt: skip
    out += ["", "## Per-hop overhead vs tensor size", "",
            "| bytes | 1 stage ms | 2 stages ms | hop ms | loopback GB/s | goal ms | met |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results["hops"]:
        out.append(f"| {r['bytes']} | {r['one_stage_ms']:.2f} | {r['two_stages_ms']:.2f} | "
                   f"{r['hop_ms']:.2f} | {r['loopback_gb_s']:.2f} | {r['goal_ms']:.2f} | "
                   f"{'yes' if r['met'] else 'no'} |")  # fmt: skip
    t = results["throughput"]
    out += ["", f"## Throughput, {t['model']}: two 1-thread CPU devices, throughput plan "
            f"({t['stages']} stages, predicted period {t['predicted_period_ms']:.1f} ms)", "",
            "| concurrency | served req/s | single-process ORT req/s | speed-up |",
            "|---|---|---|---|"]  # fmt: skip
    for c, rps in t["served_rps"].items():
        out.append(f"| {c} | {rps:.1f} | {t['single_rps']:.1f} | {rps / t['single_rps']:.2f}x |")
    out += [
        "",
        "## Predicted (simulator) vs measured latency, latency plans",
        "",
        "| model | devices | stages | predicted ms | measured ms |",
        "|---|---|---|---|---|",
    ]
    for r in results["predicted"]:
        out.append(f"| {r['model']} | {r['devices']} | {r['stages']} | {r['predicted_ms']:.1f} | "
                   f"{r['measured_ms']:.1f} |")  # fmt: skip
    return "\n".join(out) + "\n"


def plots(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hops = results["hops"]
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r["bytes"] for r in hops]
    ax.loglog(x, [max(r["hop_ms"], 1e-3) for r in hops], "o-", label="measured hop overhead")
    ax.loglog(x, [r["goal_ms"] for r in hops], "--", label="goal: 2 x bytes/loopback + 0.5 ms")
    ax.loglog(x, [r["bytes"] / (r["loopback_gb_s"] * 1e9) * 1000 for r in hops], ":",
              label="bytes / loopback bandwidth")  # fmt: skip
    ax.set_xlabel("tensor bytes")
    ax.set_ylabel("ms")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "runtime_hops.png", dpi=120)
    t = results["throughput"]
    fig, ax = plt.subplots(figsize=(6, 4))
    cs = list(t["served_rps"])
    ax.plot(cs, list(t["served_rps"].values()), "o-", label="two-device pipeline")
    ax.axhline(t["single_rps"], linestyle="--", color="gray", label="single-process ORT, 1 thread")
    ax.set_xlabel("concurrency")
    ax.set_ylabel("requests/s")
    ax.set_title(t["model"])
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "runtime_throughput.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    n = 5 if args.quick else 15
    sizes = [1 << 10, 1 << 20, 64 << 20] if args.quick else [
        1 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20]  # fmt: skip
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        results: dict = {
            "hops": bench_hops(sizes, Path(tmp)),
            "latency": bench_latency(["squeezenet", "inception_v1"], n),
            "throughput": bench_throughput("inception_v1", [1, 4, 8, 16], 24 if args.quick else 48),
            "predicted": bench_predicted(["squeezenet", "shufflenet", "inception_v1"], n),
        }
    results["machine"] = {
        "cores": os.cpu_count(),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }
    (RESULTS / "runtime.json").write_text(json.dumps(results, indent=1) + "\n")
    text = report(results)
    (RESULTS / "runtime.md").write_text(text)
    plots(results)
    print(text)


if __name__ == "__main__":
    main()
