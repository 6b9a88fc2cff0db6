"""Serving benchmark: chained stage servers against single-process ONNX Runtime.

    .venv/bin/python bench/runtime.py [--quick] [--only SECTION ...] [--sizes 64K 16M ...]

Writes bench/results/runtime.md (tables), runtime.json and runtime_*.png (plots); with `--only`
(repeatable: hops, latency, throughput, predicted) it runs those sections alone and only prints
their tables, so a change can be measured without overwriting the full report:

1. latency of single-process ORT against the same model chained over 2, 3 and 4 stages
   (contiguous splits of the fusion groups in topological order, one stage server per stage);
2. per-hop overhead against tensor size (1 KiB to 64 MiB): a two-node model served as one stage
   and as two stages on two servers, the difference being one extra hop, next to the machine's
   loopback copy bandwidth (a raw TCP socket); goal: overhead <= 2 x bytes / bandwidth + 0.5 ms.
   Both chain transports: the same-host fast path (what `moirai serve` uses) and gRPC only (the
   path between hosts), with the front end in a process of its own, so that the second stage
   adds exactly one push. Both deployments of a transport run at once and requests alternate
   between them, so each extra hop is a paired difference taken under the same load. The CPU
   each process spends per request is recorded beside the times: it moves less with the load;
3. throughput (requests/s) at concurrency 1, 4, 8 and 16: single-process ORT on one thread
   against a two-device throughput plan (each device one core and one thread), for plans priced
   by the analytic cost model and by measured profiling (each fusion group timed alone), the
   latter also coarsened to 48 tasks (`--max-tasks`); goal: >= 1.5x at concurrency 8.
   Single-process ORT runs as many requests as the served plan, in rounds alternating with it,
   so both see the same machine; the CPU each process spends per request gives the speed-up
   the plan allows when the cores are the benchmark's alone;
4. predicted against measured latency of latency plans: the latency of the plan as served
   (`moirai.planning.prediction`: stages, their hops, the gateway's pushes, the client's call),
   next to the solver's makespan.

Everything runs as real processes on loopback (`moirai.runtime.local.LocalDeployment`), with
the gateway and the load generator sharing the machine, as they would in `moirai serve`. The
report records the load average: on a shared machine every figure moves with it.
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

from loadgen import cpu_ms, median_ms  # noqa: E402

from moirai import zoo  # noqa: E402
from moirai.devices import local_devices  # noqa: E402
from moirai.partition import build_plan  # noqa: E402
from moirai.planning import build_costgraph, plan_model  # noqa: E402
from moirai.planning.cpu import split_cpu  # noqa: E402
from moirai.runtime.local import LocalDeployment  # noqa: E402
from moirai.stageplan import GATEWAY, DeviceSpec  # noqa: E402
from stage_server.client import AsyncInferenceClient, InferenceClient  # noqa: E402
from stage_server.codec import DTYPES  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def inputs_for(plan, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inputs = {}
    for t in plan.inputs:
        shape = plan.priced_shape(t.name)
        values = rng.integers(0, 100, shape) if t.datatype == "INT64" else rng.random(shape)
        inputs[t.name] = values.astype(DTYPES[t.datatype])
    return inputs


def single_session(path, threads: int = 1) -> ort.InferenceSession:
    """ONNX Runtime on the model file, as a user runs it (its default options otherwise)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


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
        session = single_session(path)
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


def _paired_ms(
    a: LocalDeployment, b: LocalDeployment, inputs: dict[str, np.ndarray], n: int
) -> tuple[float, float, float, dict, dict]:
    """Medians of alternating requests to `a` and `b`, the median of their differences, and the
    CPU milliseconds per request of each process of `a` and of `b`."""
    with InferenceClient(a.grpc_url) as ca, InferenceClient(b.grpc_url) as cb:
        for _ in range(3):
            ca.infer("hop", inputs, timeout_s=120)
            cb.infer("hop", inputs, timeout_s=120)
        before = [{k: cpu_ms([pid]) for k, pid in d.pids.items()} for d in (a, b)]
        ta, tb = [], []
        for _ in range(n):
            for client, times in ((ca, ta), (cb, tb)):
                t0 = time.perf_counter()
                client.infer("hop", inputs, timeout_s=120)
                times.append((time.perf_counter() - t0) * 1000)
    cpu = [
        {k: (cpu_ms([pid]) - start[k]) / n for k, pid in d.pids.items()}
        for d, start in zip((a, b), before, strict=True)
    ]
    diffs = [y - x for x, y in zip(ta, tb, strict=True)]
    return statistics.median(ta), statistics.median(tb), statistics.median(diffs), *cpu


def _stages_cpu(cpu: dict[str, float]) -> float:
    return sum(ms for name, ms in cpu.items() if name != GATEWAY)


def bench_hops(sizes: list[int], tmp: Path, n: int) -> list[dict]:
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
        reps = n if size <= 1 << 20 else max(5, n // 4)
        bandwidth = loopback_bandwidth(size)
        goal = 2 * size / bandwidth * 1000 + 0.5
        row = {"bytes": size, "loopback_gb_s": bandwidth / 1e9, "goal_ms": goal}
        for transport, same_host in (("same_host", True), ("grpc", False)):
            work = tmp / f"{transport}{size}"
            # The front end alone, so that two stages add exactly one push to one stage's two.
            a = LocalDeployment(one, path, work / "one", same_host=same_host, fused=False)
            b = LocalDeployment(two, path, work / "two", same_host=same_host, fused=False)
            with a, b:
                base, chained, hop, cpu_one, cpu_two = _paired_ms(a, b, inputs, reps)
            row[transport] = {
                "one_stage_ms": base,
                "two_stages_ms": chained,
                "hop_ms": hop,
                "cpu_ms_one": cpu_one,
                "cpu_ms_two": cpu_two,
                "hop_cpu_ms": _stages_cpu(cpu_two) - _stages_cpu(cpu_one),
            }
        row["met"] = row["same_host"]["hop_ms"] <= goal
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


def _single_rps(session: ort.InferenceSession, inputs, total: int) -> tuple[float, float]:
    """Requests/s of single-process ORT, and its CPU milliseconds per request."""
    t0, c0 = time.perf_counter(), time.thread_time()
    for _ in range(total):
        session.run(None, inputs)
    return total / (time.perf_counter() - t0), (time.thread_time() - c0) * 1000 / total


def _served(d: LocalDeployment, model: str, inputs, c: int, total: int) -> tuple[float, dict]:
    """Requests/s of the deployment at concurrency `c`, and CPU ms per request of each of its
    processes and of this one (the load generator)."""
    before = {name: cpu_ms([pid]) for name, pid in d.pids.items()}
    me = os.times()
    rps = asyncio.run(_rps(d.grpc_url, model, inputs, c, total))
    cpu = {name: (cpu_ms([pid]) - before[name]) / (total + 1) for name, pid in d.pids.items()}
    cpu["client"] = (sum(os.times()[:2]) - sum(me[:2])) * 1000 / (total + 1)
    return rps, cpu


def _capacity(cpu: dict, d: LocalDeployment, single_cpu_ms: float) -> float:
    """The speed-up the CPU costs allow when the machine is this benchmark's alone: each stage
    server process is bounded by its devices' cores (the lanes' first stages share the front
    end's process, `LocalDeployment.entries`), and everything together by all the cores."""
    cores = len(os.sched_getaffinity(0))
    bounds = [cores * 1000 / sum(cpu.values())]
    for name in d.pids:
        if devices := d.devices_of(name):  # a front end alone: bounded by all the cores only
            threads = sum(d.plan.device(device).threads or 1 for device in devices)
            bounds.append(threads * 1000 / cpu[name])
    return min(bounds) * single_cpu_ms / 1000


def bench_throughput(
    name: str,
    variants: list[tuple[str, int | None]],
    concurrencies: list[int],
    total: int,
    rounds: int,
) -> list[dict]:
    """For each (profile, max_tasks) variant: plan, serve, compare with single-process ORT."""
    from moirai.planning import load
    from moirai.planning.inputs import resolve_profile

    path = zoo.get(name)
    shapes = zoo.input_shapes(name)
    model = load(path, shapes)
    devices = split_cpu(local_devices(), 2)
    results = []
    for profile, max_tasks in variants:
        source = (
            resolve_profile("measured", model, method="submodel")
            if profile == "measured"
            else resolve_profile("analytic", model)
        )
        planned = plan_model(
            path,
            devices,
            input_shapes=shapes,
            objective="throughput",
            time_limit=10,
            profile=source,
            max_tasks=max_tasks,
        )
        inputs = inputs_for(planned.plan)
        session = single_session(path)
        single: list[float] = []
        single_cpu: list[float] = []
        served: dict[int, list[float]] = {c: [] for c in concurrencies}
        ratios: dict[int, list[float]] = {c: [] for c in concurrencies}
        capacity: dict[int, list[float]] = {c: [] for c in concurrencies}
        cpu_at_8: list[dict] = []
        with tempfile.TemporaryDirectory() as tmp:
            d = LocalDeployment(planned.plan, path, Path(tmp))
            with d:
                asyncio.run(_rps(d.grpc_url, planned.plan.model_name, inputs, 8, 8))  # warm up
                for _ in range(rounds):
                    for c in concurrencies:
                        rps_single, cpu_single = _single_rps(session, inputs, total)
                        single.append(rps_single)
                        single_cpu.append(cpu_single)
                        rps, cpu = _served(d, planned.plan.model_name, inputs, c, total)
                        served[c].append(rps)
                        ratios[c].append(rps / rps_single)
                        capacity[c].append(_capacity(cpu, d, cpu_single))
                        if c == 8:
                            cpu_at_8.append(cpu)
                        print("throughput", name, profile, c, rps, rps_single, cpu, flush=True)
        results.append(
            {
                "model": name,
                "plan": f"{profile} profile" + (f", --max-tasks {max_tasks}" if max_tasks else ""),
                "stages": len(planned.plan.stages),
                "layout": planned.plan.predicted.get("layout", "?"),
                # As served: the lanes together (a lane's own period is `period_ms`).
                "predicted_period_ms": planned.plan.predicted.get("served_period_ms"),
                "single_rps": statistics.median(single),
                "single_cpu_ms": statistics.median(single_cpu),
                "served_rps": {c: statistics.median(v) for c, v in served.items()},
                "speedup": {c: statistics.median(v) for c, v in ratios.items()},
                "capacity_speedup": {c: statistics.median(v) for c, v in capacity.items()},
                "cpu_ms_at_8": {
                    k: statistics.median(cpu[k] for cpu in cpu_at_8) for k in cpu_at_8[0]
                }
                if cpu_at_8
                else {},
            }
        )
    return results


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
                "makespan_ms": planned.plan.predicted["makespan_ms"],
                "predicted_ms": planned.plan.predicted["latency_ms"],
                "measured_ms": served_latency_ms(planned.plan, path, inputs, n),
            }
        )
        print("predicted", rows[-1], flush=True)
    return rows


# ------------------------------------------------------------------ report
def report(results: dict) -> str:
    m = results["machine"]
    out = [
        "# Serving benchmark (`bench/runtime.py`)",
        "",
        f"Run: `{m['command']}` on {m['cores']} cores; load average (1 min) before/after: "
        f"{m['load_before']:.1f} / {m['load_after']:.1f}. Other processes on the machine (it is "
        "shared) skew every figure when that is above 0; pairs of figures compared below were "
        "taken alternately under the same load.",
        "",
    ]
    if "latency" in results:
        out += ["## Latency: single-process ORT (1 thread) vs chained stages (ms, median)", "",
                "| model | single | 2 stages | 3 stages | 4 stages |",
                "|---|---|---|---|---|"]  # fmt: skip
        for r in results["latency"]:
            out.append(f"| {r['model']} | {r['single_ms']:.1f} | {r['chain2_ms']:.1f} | "
                       f"{r['chain3_ms']:.1f} | {r['chain4_ms']:.1f} |")  # fmt: skip
    if "hops" in results:
        out += ["", "## Per-hop overhead vs tensor size (ms, medians of paired requests)", "",
                "Goal: hop <= 2 x bytes / loopback bandwidth + 0.5 ms, for the same-host path that "
                "`moirai serve` uses; gRPC only is the path between hosts.", "",
                "Hop CPU: the CPU milliseconds per request that the stage servers spend more with "
                "two stages than with one (the gateway does the same work in both, and at large "
                "sizes its CPU varies by more than a hop costs).", "",
                "| bytes | loopback GB/s | goal | same-host: 1 stage | 2 stages | hop | met | "
                "hop CPU | gRPC: 1 stage | 2 stages | hop | hop CPU |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in results["hops"]:
            sh, g = r["same_host"], r["grpc"]
            out.append(f"| {r['bytes']} | {r['loopback_gb_s']:.2f} | {r['goal_ms']:.2f} | "
                       f"{sh['one_stage_ms']:.2f} | {sh['two_stages_ms']:.2f} | "
                       f"{sh['hop_ms']:.2f} | {'yes' if r['met'] else 'no'} | "
                       f"{sh['hop_cpu_ms']:.2f} | {g['one_stage_ms']:.2f} | "
                       f"{g['two_stages_ms']:.2f} | {g['hop_ms']:.2f} | "
                       f"{g['hop_cpu_ms']:.2f} |")  # fmt: skip
    for t in results.get("throughput", []):
        out += ["", f"## Throughput, {t['model']}, {t['plan']}: two 1-thread CPU "
                f"devices, throughput plan ({t.get('layout', '?')}: {t['stages']} stages, "
                "predicted period as served "
                f"{t['predicted_period_ms']:.1f} ms)", "",
                "Speed-up: served over single-process ORT requests/s, measured in alternating "
                "rounds (medians). CPU-bound speed-up: what the measured CPU per request allows "
                "with the cores to ourselves (each stage server by its devices' cores, all "
                "processes by all cores), against single-process ORT's CPU per request "
                f"({t['single_cpu_ms']:.1f} ms). CPU ms per request at concurrency 8: "
                + ", ".join(f"{k} {v:.1f}" for k, v in t["cpu_ms_at_8"].items()) + ".", "",
                "| concurrency | served req/s | single-process ORT req/s | speed-up | "
                "CPU-bound speed-up |",
                "|---|---|---|---|---|"]  # fmt: skip
        for c, rps in t["served_rps"].items():
            out.append(f"| {c} | {rps:.1f} | {t['single_rps']:.1f} | {t['speedup'][c]:.2f}x | "
                       f"{t['capacity_speedup'][c]:.2f}x |")  # fmt: skip
    if "predicted" in results:
        out += [
            "",
            "## Predicted vs measured latency, latency plans",
            "",
            "Predicted: the plan as served (`moirai.planning.prediction`: stages, hops, the "
            "gateway's pushes and the client's call); the solver's makespan beside it.",
            "",
            "| model | devices | stages | makespan ms | predicted ms | measured ms |",
            "|---|---|---|---|---|---|",
        ]
        for r in results["predicted"]:
            out.append(f"| {r['model']} | {r['devices']} | {r['stages']} | "
                       f"{r['makespan_ms']:.1f} | {r['predicted_ms']:.1f} | "
                       f"{r['measured_ms']:.1f} |")  # fmt: skip
    return "\n".join(out) + "\n"


def plots(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hops = results["hops"]
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r["bytes"] for r in hops]
    for transport, label in (("same_host", "same-host path"), ("grpc", "gRPC only")):
        ax.loglog(x, [max(r[transport]["hop_ms"], 1e-2) for r in hops], "o-",
                  label=f"hop overhead, {label}")  # fmt: skip
    ax.loglog(x, [r["goal_ms"] for r in hops], "--", label="goal: 2 x bytes/loopback + 0.5 ms")
    ax.loglog(x, [r["bytes"] / (r["loopback_gb_s"] * 1e9) * 1000 for r in hops], ":",
              label="bytes / loopback bandwidth")  # fmt: skip
    ax.set_xlabel("tensor bytes")
    ax.set_ylabel("ms")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "runtime_hops.png", dpi=120)
    fig, ax = plt.subplots(figsize=(6, 4))
    for t in results.get("throughput", []):
        cs = list(t["served_rps"])
        ax.plot(cs, list(t["speedup"].values()), "o-",
                label=f"{t['plan']} ({t['stages']} stages)")  # fmt: skip
    ax.axhline(1.5, linestyle="--", color="gray", label="goal at concurrency 8")
    ax.axhline(1.0, linestyle=":", color="gray")
    ax.set_xlabel("concurrency")
    ax.set_ylabel("served / single-process ORT requests/s")
    ax.set_title(f"{results['throughput'][0]['model']}: two 1-thread devices")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "runtime_throughput.png", dpi=120)


SECTIONS = ("hops", "latency", "throughput", "predicted")


def size(text: str) -> int:
    """A byte count such as 1024, 64K or 16M."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    scale = units.get(text[-1:].upper(), 1)
    return int(text[:-1] if scale > 1 else text) * scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    parser.add_argument(
        "--only",
        action="append",
        choices=SECTIONS,
        help="run this section alone (repeatable); prints its tables and writes no results",
    )
    parser.add_argument("--sizes", nargs="+", type=size, help="tensor sizes of the hops section")
    args = parser.parse_args()
    n = 5 if args.quick else 15
    sizes = args.sizes or ([1 << 10, 1 << 20, 64 << 20] if args.quick else [
        1 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20])  # fmt: skip
    sections = {
        "hops": lambda tmp: bench_hops(sizes, tmp, 20 if args.quick else 40),
        "latency": lambda tmp: bench_latency(["squeezenet", "inception_v1"], n),
        "throughput": lambda tmp: bench_throughput(
            "inception_v1",
            [("analytic", None), ("measured", None), ("measured", 48)],
            [1, 4, 8, 16],
            total=24 if args.quick else 48,
            rounds=1 if args.quick else 3,
        ),
        "predicted": lambda tmp: bench_predicted(["squeezenet", "shufflenet", "inception_v1"], n),
    }
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        results: dict = {
            name: run(Path(tmp))
            for name, run in sections.items()
            if name in (args.only or SECTIONS)
        }
    results["machine"] = {
        "command": " ".join(["bench/runtime.py", *sys.argv[1:]]),
        "cores": os.cpu_count(),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }
    text = report(results)
    if not args.only:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "runtime.json").write_text(json.dumps(results, indent=1) + "\n")
        (RESULTS / "runtime.md").write_text(text)
        plots(results)
    print(text)


if __name__ == "__main__":
    main()
