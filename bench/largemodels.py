"""Large-model benchmark: a model over 2 GB split over devices that each hold part of it.

    flock /tmp/moirai-heavy.lock .venv/bin/python bench/largemodels.py [--quick] [--keep DIR]

Writes bench/results/largemodels.md and largemodels.json (with `--quick`, a 0.43 GB model, only
printed). The model is `moirai.zoo.matmul_chain`: x(1, 14000) through three 14000×14000 fp32
MatMuls, 2.35 GB of dense random weights in external data (written once into a temporary
folder, or `--keep DIR` to reuse). Everything is timed with the files in the page cache (each
is read once before), so the figures are the software's, not the disk's:

1. ONNX Runtime's own load: `InferenceSession(model.onnx)` with its default options in a fresh
   process (the median of 3), and that process's peak resident memory;
2. Moirai's planning on two CPU devices of 1.7 GiB each (two of the three 0.78 GB MatMuls and a
   stage server's overhead need more than 1.7e9 bytes; `plan_model`: load, digest, fusion
   analysis, analytic profile, solver, stage plan), in a fresh process, and its load: from
   starting the stage servers and the gateway (`LocalDeployment`) to ready; then the first and
   the following answers, compared with ONNX Runtime's, and every stage server's peak resident
   memory (VmHWM) against its plan: its tasks' weights and activations plus the fixed overhead
   the planner reserves (`moirai.sessions.STAGE_SERVER_OVERHEAD_BYTES`);
3. the same on one CPU device of 3 GiB: one stage;
4. the fixed overhead itself: the peak resident memory of a stage server holding a one-node
   model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moirai import zoo  # noqa: E402
from moirai.runtime.local import LocalDeployment  # noqa: E402
from moirai.sessions import STAGE_SERVER_OVERHEAD_BYTES  # noqa: E402
from moirai.stageplan import StagePlan  # noqa: E402
from stage_server.client import InferenceClient  # noqa: E402

RESULTS = ROOT / "bench" / "results"
GB = 1e9
GIB = float(1 << 30)

# Run in a fresh interpreter: ONNX Runtime's load of the model, timed, and its answer.
_ORT_LOAD = """
import sys, time, numpy as np, onnxruntime as ort
started = time.perf_counter()
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
seconds = time.perf_counter() - started
y = session.run(None, {"x": np.load(sys.argv[2])})[0]
np.save(sys.argv[3], y)
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(seconds, int(hwm.split()[1]) * 1024)
"""

# Moirai's planning in a fresh interpreter: the plan written, the time of plan_model printed.
_PLAN = """
import dataclasses, json, sys, time
from moirai.devices import DeviceSet, local_devices
from moirai.graph import build_graph
from moirai.planning import plan_model
from moirai.planning.cpu import split_cpu
memory, parts = float(sys.argv[2]), int(sys.argv[3])
machine = split_cpu(local_devices(), 1)
cpu = dataclasses.replace(machine.devices[0], memory_bytes=int(memory), threads=1)
devices = DeviceSet(
    tuple(dataclasses.replace(cpu, name=f"cpu-{i}", device_id=i) for i in range(parts)),
    machine.default_link,
)
started = time.perf_counter()
planned = plan_model(sys.argv[1], devices, time_limit=10)
seconds = time.perf_counter() - started
memory = {d.name: 0 for d in planned.costgraph.devices}
for task in planned.costgraph.tasks:
    memory[planned.placement.assignment[task.id]] += task.memory_bytes
# A device with room for packed copies of its weights holds them twice (moirai.weights).
graph = build_graph(planned.model)
for d in planned.plan.used_devices:
    if planned.plan.device(d).prepack:
        memory[d] += graph.weight_bytes(n for s in planned.plan.stages_on(d) for n in s.nodes)
planned.plan.save(sys.argv[4])
print(json.dumps({"seconds": seconds, "memory": memory}))
"""


def _peak_resident(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for {pid}")


def _python(code: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1])
    return done.stdout.strip().splitlines()[-1]


def _warm(files: list[Path]) -> None:
    """Read every file once, so that every figure sees them in the page cache."""
    for file in files:
        with file.open("rb") as f:
            while f.read(1 << 24):
                pass


def ort_load(model: Path, x_path: Path, y_path: Path, runs: int) -> dict:
    seconds, peaks = [], []
    for _ in range(runs):
        s, peak = _python(_ORT_LOAD, str(model), str(x_path), str(y_path)).split()
        seconds.append(float(s))
        peaks.append(int(peak))
    return {"seconds": statistics.median(seconds), "all_seconds": seconds, "peak": max(peaks)}


def moirai(model: Path, memory: float, parts: int, work: Path, x: np.ndarray, y: np.ndarray):
    plan_path = work / f"plan-{parts}.json"
    planned = json.loads(_python(_PLAN, str(model), str(memory), str(parts), str(plan_path)))
    plan = StagePlan.load(plan_path)
    started = time.perf_counter()
    deployment = LocalDeployment(plan, model, work / f"run-{parts}")
    deployment.start(ready_timeout_s=600)
    load_s = time.perf_counter() - started
    try:
        with InferenceClient(deployment.grpc_url) as client:
            answers = []
            for _ in range(4):
                t0 = time.perf_counter()
                got = client.infer(plan.model_name, {"x": x})["y"]
                answers.append(time.perf_counter() - t0)
                difference = float(np.abs(got - y).max())
                if not np.allclose(got, y, rtol=1e-4, atol=1e-4):
                    raise RuntimeError(f"served answer differs from ONNX Runtime's by {difference}")
        servers = [
            {
                "device": d,
                "stages": len(plan.stages_on(d)),
                "planned": planned["memory"][d],
                "peak": _peak_resident(deployment.pids[d]),
            }
            for d in plan.used_devices
        ]
    finally:
        deployment.stop()
    return {
        "devices": parts,
        "device_memory": memory,
        "stages": len(plan.stages),
        "planning_s": planned["seconds"],
        "load_s": load_s,
        "first_answer_s": answers[0],
        "answer_s": statistics.median(answers[1:]),
        "max_difference": difference,
        "servers": servers,
    }


def overhead(work: Path) -> int:
    """Peak resident memory of a stage server of a one-node model."""
    model = zoo.matmul_chain(work / "tiny" / "tiny.onnx", size=4, layers=1)
    plan_path = work / "plan-tiny.json"
    _python(_PLAN, str(model), "1e9", "1", str(plan_path))
    plan = StagePlan.load(plan_path)
    with LocalDeployment(plan, model, work / "run-tiny") as deployment:
        with InferenceClient(deployment.grpc_url) as client:
            for _ in range(20):
                client.infer(plan.model_name, {"x": np.ones((1, 4), np.float32)})
        return _peak_resident(deployment.pids[plan.used_devices[0]])


def report(r: dict) -> str:
    ort_s = r["ort"]["seconds"]
    lines = [
        f"# Large models: {r['model']['gb']:.2f} GB over devices smaller than it",
        "",
        f"`bench/largemodels.py`: {r['model']['layers']} MatMuls of "
        f"{r['model']['size']}x{r['model']['size']} fp32, weights in external data, files in "
        f"the page cache. Load average {r['load_before']:.2f} before, {r['load_after']:.2f} "
        "after (a shared machine: every time moves with it).",
        "",
        "| | seconds | x ORT load | peak resident |",
        "|---|---:|---:|---:|",
        f"| ONNX Runtime's own load (`InferenceSession`, default options, median of 3) "
        f"| {ort_s:.2f} | 1.00 | {r['ort']['peak'] / GB:.2f} GB |",
    ]
    for m in r["moirai"]:
        where = f"{m['devices']} CPU device(s) of {m['device_memory'] / GIB:.2f} GiB"
        biggest = max(s["peak"] for s in m["servers"])
        lines += [
            f"| Moirai planning, {where} ({m['stages']} stage(s)) | {m['planning_s']:.2f} "
            f"| {m['planning_s'] / ort_s:.2f} | |",
            f"| Moirai load: stage servers ready, {where} | {m['load_s']:.2f} "
            f"| {m['load_s'] / ort_s:.2f} | {biggest / GB:.2f} GB (largest server) |",
        ]
    lines += [
        "",
        "| devices | stage server | stages | planned: tasks (+ packed weights) + overhead "
        "| peak resident (VmHWM) "
        "| within plan | first answer | then | max abs difference from ORT |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for m in r["moirai"]:
        for s in m["servers"]:
            planned = s["planned"] + STAGE_SERVER_OVERHEAD_BYTES
            lines.append(
                f"| {m['devices']} x {m['device_memory'] / GIB:.2f} GiB | {s['device']} "
                f"| {s['stages']} | {planned / GB:.3f} GB | {s['peak'] / GB:.3f} GB "
                f"({s['peak'] / GIB:.3f} GiB) | {'yes' if s['peak'] <= planned else 'NO'} "
                f"| {m['first_answer_s'] * 1000:.0f} ms | {m['answer_s'] * 1000:.0f} ms "
                f"| {m['max_difference']:.2e} |"
            )
    lines += [
        "",
        f"Fixed overhead of a stage server (one-node model, peak resident): "
        f"{r['overhead'] / 2**20:.0f} MiB; the planner reserves "
        f"{STAGE_SERVER_OVERHEAD_BYTES / 2**20:.0f} MiB of every CPU device for it.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 0.43 GB model; print only")
    parser.add_argument("--keep", type=Path, help="folder to build the model in and keep")
    args = parser.parse_args()
    size = 6000 if args.quick else 14000
    # Two devices that each hold two weights but not three, and one that holds all three.
    small, large = (0.43 * GIB, 0.58 * GIB) if args.quick else (1.7 * GIB, 3 * GIB)
    work_dir = tempfile.TemporaryDirectory(prefix="moirai-large-")
    work = Path(work_dir.name)
    folder = args.keep or work
    model = folder / f"matmul_chain_{size}.onnx"
    if not model.exists():
        zoo.matmul_chain(model, size, 3, dense=True)
    data = model.with_name(model.name + ".data")
    _warm([model, data])
    x = np.random.default_rng(0).standard_normal((1, size)).astype(np.float32)
    np.save(work / "x.npy", x)
    load_before = os.getloadavg()[0]
    results = {
        "model": {"size": size, "layers": 3, "gb": data.stat().st_size / GB},
        "ort": ort_load(model, work / "x.npy", work / "y.npy", runs=3),
    }
    y = np.load(work / "y.npy")
    results["moirai"] = [
        moirai(model, small, 2, work, x, y),
        moirai(model, large, 1, work, x, y),
    ]
    results["overhead"] = overhead(work)
    results["load_before"], results["load_after"] = load_before, os.getloadavg()[0]
    text = report(results)
    print(text)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "largemodels.md").write_text(text, encoding="utf-8")
        (RESULTS / "largemodels.json").write_text(json.dumps(results, indent=1) + "\n")
    work_dir.cleanup()


if __name__ == "__main__":
    main()
