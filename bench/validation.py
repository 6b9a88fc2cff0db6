"""Validation: predicted latency (the simulator on measured costs) against the measured end-to-end
latency of the served plan.

    .venv/bin/python bench/validation.py [--models squeezenet resnet50 ...] [--devices 2 ...]
                                         [--repeats 5] [--requests 10] [--time-limit 5]

For each zoo model and each device count N (CPU devices of one thread each, as `moirai serve
--cpu-devices N` makes them, pinned to their own cores when the machine has enough; with
`--with-gpus`, plus this machine's GPUs):

1. profile with `moirai.profile.measured` (fresh: a private cache for this run), which also
   measures the loopback link between two stage servers;
2. plan with the solver (`plan_model(..., profile=...)`, latency objective) — its makespan is
   the simulator's, on the measured costs;
3. serve the plan with the local runtime (`moirai.runtime.local`: one stage-server process per
   device and the gateway) and time `requests` requests from an Open Inference Protocol client
   (median, after one warm-up request).

The cost graph models what happens between the first stage receiving the inputs and the last
stage producing the outputs. A client sees two more loopback gRPC hops for the inputs (client →
gateway → first stages) and two for the outputs (last stages → gateway → client), so the
prediction compared with the client's latency is

    predicted = makespan + 2 · link(input bytes) + 2 · link(output bytes)

with the same measured link; the raw makespan is in the table too. The error is
|predicted − measured| / measured; the goal is a median below 15 %.

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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from runtime import inputs_for, served_latency_ms  # noqa: E402

from moirai import zoo  # noqa: E402
from moirai.devices import local_devices  # noqa: E402
from moirai.partition import StagePlan  # noqa: E402
from moirai.profile.cache import ProfileCache  # noqa: E402
from moirai.profile.measured import MeasuredProfile, Settings  # noqa: E402
from moirai.profile.targets import cpu_model  # noqa: E402
from moirai.runtime.planning import available_cores, plan_model, split_cpu  # noqa: E402
from stage_server.codec import DTYPES  # noqa: E402

RESULTS = ROOT / "bench" / "results"
GOAL = 0.15


def _bytes(plan: StagePlan, tensors: str) -> int:
    specs = plan.inputs if tensors == "inputs" else plan.outputs
    return sum(int(np.prod(t.shape)) * DTYPES[t.datatype].itemsize for t in specs)


def validate(
    name: str,
    parts: int,
    settings: Settings,
    cache: ProfileCache,
    requests: int,
    limit: float,
    gpus: bool = False,
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
    profile = MeasuredProfile(path, shapes, settings=settings, cache=cache)
    planned = plan_model(path, devices, input_shapes=shapes, time_limit=limit, profile=profile)
    link = profile.document.link
    assert link is not None
    hops = 2 * link.predict_ms(_bytes(planned.plan, "inputs")) + 2 * link.predict_ms(
        _bytes(planned.plan, "outputs")
    )
    makespan = planned.placement.makespan_ms
    measured = served_latency_ms(
        planned.plan, path, inputs_for(planned.plan), requests, pin=parts <= len(available_cores())
    )
    predicted = makespan + hops
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
        "makespan_ms": makespan,
        "hops_ms": hops,
        "predicted_ms": predicted,
        "measured_ms": measured,
        "error": abs(predicted - measured) / measured,
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
        f"predicted {predicted:9.2f} ms (makespan {makespan:.2f} + hops {hops:.2f}), "
        f"measured {measured:9.2f} ms, error {row['error']:6.1%} ({row['seconds']:.0f} s)",
        flush=True,
    )
    return row


def report(results: dict[str, Any]) -> str:
    rows = results["rows"]
    errors = [r["error"] for r in rows]
    median = statistics.median(errors)
    machine = results["machine"]
    out = [
        "# Validation: predicted vs measured latency (`bench/validation.py`)",
        "",
        f"{machine['cores']} cores ({machine['cpu']}); CPU devices of 1 thread each, pinned to "
        f"their own cores when they fit; warm-up {results['settings']['warmup']}, "
        f"{results['settings']['repeats']} profiled runs, median of "
        f"{results['settings']['requests']} served requests. Load average before/after: "
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
        "| model | CPU devices | GPUs | used | stages | whole model ms (1 CPU) | makespan ms "
        "| + hops ms | predicted ms | measured ms | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        run = "-" if r["run_ms"] is None else f"{r['run_ms']:.2f}"
        out.append(
            f"| {r['model']} | {r['devices']} | {r['gpus']} | {r['used_devices']} | "
            f"{r['stages']} | {run} | "
            f"{r['makespan_ms']:.2f} | {r['hops_ms']:.2f} | {r['predicted_ms']:.2f} | "
            f"{r['measured_ms']:.2f} | {r['error']:.1%} |"
        )
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
                rows.append(
                    validate(
                        name,
                        parts,
                        settings,
                        cache,
                        args.requests,
                        args.time_limit,
                        args.with_gpus,
                    )
                )
    results = {
        "rows": rows,
        "link": rows[0].pop("link"),
        "settings": {
            "warmup": args.warmup,
            "repeats": args.repeats,
            "requests": args.requests,
            "time_limit": args.time_limit,
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
    plot(rows, args.out)
    print(text)


if __name__ == "__main__":
    main()
