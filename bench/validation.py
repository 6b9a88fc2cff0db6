"""Validation: predicted latency (the simulator on measured costs) against the measured end-to-end
latency of the served plan.

    .venv/bin/python bench/validation.py [--models squeezenet resnet50 ...] [--devices 2 ...]
                                         [--repeats 5] [--requests 10] [--time-limit 5]
                                         [--solver cpsat] [--out DIR]

For each zoo model and each device count N (CPU devices of one thread each, as `moirai serve
--cpu-devices N` makes them, pinned to their own cores when the machine has enough; with
`--with-gpus`, plus this machine's GPUs):

1. profile with `moirai.profile.measured` (fresh: a private cache for this run), which also
   measures the loopback link between two stage servers;
2. plan with the solver (`plan_model(..., profile=...)`, latency objective), which predicts the
   plan *as served* (`moirai.planning.prediction`, what `moirai serve` and `moirai demo` print):
   the runtime runs stages, not groups — a stage starts once all its inputs are in and sends
   its outputs when all its groups are done, and each run is one session call — so the stage
   plan becomes a cost graph of its own (one task per stage: its groups' measured times plus
   the device's call overhead; one edge per stage pair: the bytes crossing; the gateway's pushes
   of the inputs and collection of the outputs) whose makespan, on the measured link, plus the
   client's call to the gateway, is the predicted latency; the solver's own makespan (group by
   group) is in the table too;
3. serve the plan with the local runtime (`moirai.runtime.local`: one stage-server process per
   device and the gateway) and time `requests` requests from an Open Inference Protocol client
   (median, after one warm-up request).

Where the plan is split over several devices, the best device alone (`--solver single`, the
plan `auto` compares against) is served too, so the table says whether the split beats one
device as measured; and a split plan's measured latency is set against the solver's makespan:
the goal is at most 10% above it plus the frame (the hops in and out and the client's call).

For reference, the serving frame alone (the client's call, the gateway and its hops, the same
for any placement) is measured too: a model with the same inputs and outputs that computes
nothing (`frame_model`), served on the same runtime; its latency beside the plan's tells the
frame's share of an error from the stages'.

The error is |predicted − measured| / measured; the goal is a median below 15 %.

Writes bench/results/validation.md (table and summary), validation.json and validation.png
(predicted against measured, with the ±15 % band). The machine's load average before and after
is recorded: other processes on a shared machine move every figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from runtime import inputs_for, served_latency_ms  # noqa: E402

from moirai import zoo  # noqa: E402
from moirai.devices import available_cores, local_devices  # noqa: E402
from moirai.errors import MoiraiError  # noqa: E402
from moirai.graph import load_model  # noqa: E402
from moirai.partition import build_plan  # noqa: E402
from moirai.planning import plan_model  # noqa: E402
from moirai.planning.cpu import split_cpu  # noqa: E402
from moirai.profile.cache import ProfileCache  # noqa: E402
from moirai.profile.measured import MeasuredProfile, Settings  # noqa: E402
from moirai.profile.targets import cpu_model  # noqa: E402
from moirai.runtime.linkprobe import measure_loopback  # noqa: E402
from moirai.stageplan import ONNX_DATATYPES, StagePlan, TensorSpec  # noqa: E402
from stage_server.allocator import keep_freed_memory  # noqa: E402

RESULTS = ROOT / "bench" / "results"
GOAL = 0.15
SCHEDULE_GOAL = 0.10  # a split plan's measured latency over its solver's makespan, frame apart


def within_schedule(row: dict[str, Any]) -> bool:
    """The split plan served as scheduled: measured <= 1.1 x makespan + frame."""
    return row["measured_ms"] <= (1 + SCHEDULE_GOAL) * row["solver_makespan_ms"] + row["frame_ms"]


def frame_model(plan: StagePlan, model: onnx.ModelProto) -> onnx.ModelProto:
    """A model with the plan's inputs and outputs that does (almost) nothing: every input summed
    to one number, broadcast to every output's shape as `model` (the planned model, statically
    shaped) gives it. Served, it costs what the serving frame costs — client, gateway, and the
    hops in and out of the stages — and no compute."""
    nodes, inputs, outputs, initializers = [], [], [], []
    sums = []
    static = {
        o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output
    }
    for i, spec in enumerate(plan.inputs):
        shape = plan.priced_shape(spec.name)
        inputs.append(helper.make_tensor_value_info(spec.name, _onnx_type(spec), shape))
        nodes.append(helper.make_node("Cast", [spec.name], [f"f{i}"], to=TensorProto.FLOAT))
        nodes.append(helper.make_node("ReduceSum", [f"f{i}"], [f"s{i}"], keepdims=0))
        sums.append(f"s{i}")
    nodes.append(helper.make_node("Sum", sums, ["total"]))
    for i, spec in enumerate(plan.outputs):
        shape = numpy_helper.from_array(np.array(static[spec.name], np.int64), f"shape{i}")
        initializers.append(shape)
        nodes.append(helper.make_node("Expand", ["total", f"shape{i}"], [f"e{i}"]))
        nodes.append(helper.make_node("Cast", [f"e{i}"], [spec.name], to=_onnx_type(spec)))
        outputs.append(
            helper.make_tensor_value_info(spec.name, _onnx_type(spec), static[spec.name])
        )
    graph = helper.make_graph(nodes, "frame", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _onnx_type(spec: TensorSpec) -> int:
    return next(t for t, name in ONNX_DATATYPES.items() if name == spec.datatype)


def frame_ms(plan: StagePlan, planned: onnx.ModelProto, requests: int, workdir: Path) -> float:
    """Served latency of `frame_model` (median) on the device of the plan's first stage, so
    that a GPU's host↔device copies of the inputs and outputs are part of its frame."""
    model = frame_model(plan, planned)
    path = workdir / "frame.onnx"
    onnx.save(model, path)
    loaded = load_model(path)
    device = plan.device(plan.stages[0].device)
    frame = build_plan(
        loaded,
        dict.fromkeys((n.name for n in loaded.graph.node), device.name),
        [device],
        model_name="frame",
    )
    return served_latency_ms(frame, path, inputs_for(plan), requests)


def validate(
    name: str,
    parts: int,
    settings: Settings,
    cache: ProfileCache,
    requests: int,
    limit: float,
    gpus: bool = False,
    solver: str = "auto",
) -> dict[str, Any]:
    started = time.monotonic()
    path = zoo.get(name)
    shapes = zoo.input_shapes(name)
    local = local_devices()
    # One thread per CPU device: split a CPU of `parts` threads into `parts` devices.
    local = dataclasses.replace(
        local,
        devices=tuple(
            dataclasses.replace(d, threads=parts) if d.kind == "cpu" else d
            for d in local.devices
            if gpus or d.kind == "cpu"
        ),
    )
    devices = split_cpu(local, parts)
    profile = MeasuredProfile(
        path, shapes, settings=settings, cache=cache, link_probe=measure_loopback
    )
    planned = plan_model(
        path, devices, input_shapes=shapes, solver=solver, time_limit=limit, profile=profile
    )
    link = profile.document.link
    assert link is not None
    p = planned.plan.predicted
    predicted = p["latency_ms"]
    measured = served_latency_ms(
        planned.plan, path, inputs_for(planned.plan), requests, pin=parts <= len(available_cores())
    )
    with tempfile.TemporaryDirectory(prefix="moirai-frame-") as tmp:
        frame = frame_ms(planned.plan, planned.model, requests, Path(tmp))
    single = None
    if len(planned.plan.used_devices) > 1:
        alone = plan_model(
            path, devices, input_shapes=shapes, solver="single", time_limit=limit, profile=profile
        )
        single = {
            "predicted_ms": alone.plan.predicted["latency_ms"],
            "measured_ms": served_latency_ms(
                alone.plan,
                path,
                inputs_for(alone.plan),
                requests,
                pin=parts <= len(available_cores()),
            ),
        }
    entry = next(e for e in profile.document.devices.values() if e.target.startswith("cpu"))
    row = {
        "model": name,
        "devices": parts,
        "gpus": sum(d.kind == "gpu" for d in devices.devices),
        "used_devices": len(planned.plan.used_devices),
        "stages": len(planned.plan.stages),
        "tasks": len(planned.costgraph.tasks),
        "solver": planned.placement.solver,
        "run_ms": entry.run_ms,
        "solver_makespan_ms": p["makespan_ms"],
        "served_ms": p["served_ms"],
        "client_ms": p["client_ms"],
        "predicted_ms": predicted,
        "frame_ms": frame,
        "measured_ms": measured,
        "error": abs(predicted - measured) / measured,
        "single": single,
        "seconds": time.monotonic() - started,
        "link": {
            "latency_ms": link.latency_ms,
            "bandwidth_bytes_per_s": link.bandwidth_bytes_per_s,
            "r2": link.r2,
        },
    }
    print(
        f"{name:>14} N={parts}+{row['gpus']} GPU: {row['used_devices']} devices, "
        f"{row['stages']} stages, "
        f"predicted {predicted:9.2f} ms (served {p['served_ms']:.2f} + client "
        f"{p['client_ms']:.2f}; solver {p['makespan_ms']:.2f}), "
        f"measured {measured:9.2f} ms (frame {frame:.2f}), error {row['error']:6.1%} "
        + ("" if single is None else f"; one device {single['measured_ms']:.2f} ms ")
        + f"({row['seconds']:.0f} s)",
        flush=True,
    )
    return row


def report(results: dict[str, Any]) -> str:
    rows = [r for r in results["rows"] if "failed" not in r]
    failed = [r for r in results["rows"] if "failed" in r]
    errors = [r["error"] for r in rows]
    median = statistics.median(errors)
    machine = results["machine"]
    split = [r for r in rows if r["used_devices"] > 1]
    out = [
        "# Validation: predicted vs measured latency (`bench/validation.py`)",
        "",
        f"{machine['cores']} cores ({machine['cpu']}); CPU devices of 1 thread each, pinned to "
        f"their own cores when they fit; warm-up {results['settings']['warmup']}, "
        f"{results['settings']['repeats']} profiled runs, median of "
        f"{results['settings']['requests']} served requests, solver "
        f"`{results['settings'].get('solver', 'auto')}`. Load average before/after: "
        f"{machine['load_before']:.1f} / {machine['load_after']:.1f}.",
        "",
        f"Measured link (two stage servers over gRPC on loopback): "
        f"{results['link']['latency_ms']:.3f} ms + bytes / "
        f"{results['link']['bandwidth_bytes_per_s'] / 1e9:.3f} GB/s "
        f"(R² {results['link']['r2']:.3f}).",
        "",
        f"**Median absolute error {median:.1%}** over {len(rows)} model × device-count cases "
        f"(goal <= {GOAL:.0%}: {'met' if median <= GOAL else 'not met'}); "
        f"{sum(e <= GOAL for e in errors)} of {len(rows)} within {GOAL:.0%}.",
        "",
        f"**Split plans**: {len(split)} of {len(rows)} latency plans use several devices; "
        f"{sum(r['measured_ms'] < r['single']['measured_ms'] for r in split)} of them serve "
        f"faster than the best device alone (measured); "
        f"{sum(within_schedule(r) for r in split)} of {len(split)} within "
        f"{SCHEDULE_GOAL:.0%} + frame of the solver's makespan (goal: all).",
        "",
        "Predicted: the plan as served (stages, their hops and the gateway's) plus the client's "
        "call, as `moirai serve` prints it. Frame: the measured latency of a model with the same "
        "inputs and outputs that computes nothing, served the same way. One device: the best "
        "device alone (`--solver single`), served, beside a split plan.",
        "",
        "| model | CPU devices | GPUs | used | stages | whole model ms (1 CPU) | solver makespan "
        "ms | served plan ms | + client ms | predicted ms | measured ms | error | frame ms "
        "| one device ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        run = "-" if r["run_ms"] is None else f"{r['run_ms']:.2f}"
        out.append(
            f"| {r['model']} | {r['devices']} | {r['gpus']} | {r['used_devices']} | "
            f"{r['stages']} | {run} | {r['solver_makespan_ms']:.2f} | "
            f"{r['served_ms']:.2f} | {r['client_ms']:.2f} | {r['predicted_ms']:.2f} | "
            f"{r['measured_ms']:.2f} | {r['error']:.1%} | {r['frame_ms']:.2f} | "
            + ("-" if not r.get("single") else f"{r['single']['measured_ms']:.2f}")
            + " |"
        )
    if failed:
        out += ["", "Cases that failed (left out of the figures above):", ""]
        out += [f"- {r['model']}, {r['devices']} CPU devices: {r['failed']}" for r in failed]
    return "\n".join(out) + "\n"


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    measured = [r["measured_ms"] for r in rows]
    predicted = [r["predicted_ms"] for r in rows]
    low, high = min(measured + predicted) * 0.7, max(measured + predicted) * 1.4
    line = np.geomspace(low, high, 50)
    ax.fill_between(line, line * (1 - GOAL), line * (1 + GOAL), color="0.9", label="±15 %")
    ax.plot(line, line, "--", color="0.5", linewidth=1)
    for parts in sorted({r["devices"] for r in rows}):
        mine = [r for r in rows if r["devices"] == parts]
        ax.scatter(
            [r["measured_ms"] for r in mine],
            [r["predicted_ms"] for r in mine],
            label=f"{parts} devices",
            zorder=3,
        )
        for r in mine:
            ax.annotate(r["model"], (r["measured_ms"], r["predicted_ms"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    ax.set_xlabel("measured end-to-end latency (ms)")
    ax.set_ylabel("predicted latency (ms)")
    ax.set_title("Moirai: predicted vs served latency, measured profiles")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "validation.png", dpi=120)


def main() -> None:
    keep_freed_memory()  # this process is the latency client: no page faults per request
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=zoo.names(), choices=zoo.names())
    parser.add_argument(
        "--devices", nargs="+", type=int, default=[2], help="device counts (default 2)"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="profiled runs per device")
    parser.add_argument("--requests", type=int, default=7, help="served requests timed")
    parser.add_argument("--time-limit", type=float, default=5.0, help="solver time limit, s")
    parser.add_argument(
        "--with-gpus", action="store_true", help="add this machine's GPUs to the CPU devices"
    )
    parser.add_argument(
        "--solver",
        default="auto",
        help="the latency plan's solver (default auto; a named one, e.g. cpsat, keeps its split "
        "where auto would serve one device: to check what a split is predicted against served)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    settings = Settings(args.warmup, args.repeats)
    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="moirai-validation-") as tmp:
        cache = ProfileCache.at(tmp)  # fresh measurements, shared by the device counts
        for name in args.models:
            for parts in args.devices:
                try:
                    row = validate(
                        name,
                        parts,
                        settings,
                        cache,
                        args.requests,
                        args.time_limit,
                        args.with_gpus,
                        args.solver,
                    )
                except (MoiraiError, grpc.RpcError) as e:  # a case that fails is reported
                    message = " ".join(str(e).split())[:160]
                    print(f"{name:>14} N={parts}: failed: {message}", flush=True)
                    row = {"model": name, "devices": parts, "failed": message}
                rows.append(row)
    done = [r for r in rows if "failed" not in r]
    results = {
        "rows": rows,
        "link": done[0].pop("link") if done else {},
        "settings": {
            "warmup": args.warmup,
            "repeats": args.repeats,
            "requests": args.requests,
            "time_limit": args.time_limit,
            "solver": args.solver,
        },
        "machine": {
            "cores": len(available_cores()),
            "cpu": cpu_model(),
            "load_before": load_before,
            "load_after": os.getloadavg()[0],
        },
    }
    for row in rows:
        row.pop("link", None)
    (args.out / "validation.json").write_text(json.dumps(results, indent=1) + "\n")
    text = report(results)
    (args.out / "validation.md").write_text(text)
    plot(done, args.out)
    print(text)


if __name__ == "__main__":
    main()
