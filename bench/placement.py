"""Placement benchmark: every solver on every zoo model and heterogeneous device set.

    .venv/bin/python bench/placement.py [--time-limit 60] [--threads N] \
        [--models resnet50,bert_base] [--devices examples/devices/bench-3.yaml ...] \
        [--solvers single,heft,getf,msct,milp-highs,cpsat,auto]

For each zoo model (`moirai.zoo`) and each devices file (default: `examples/devices/bench-3.yaml`,
`bench-4.yaml` and `bench-gpus.yaml`), builds the cost graph with the analytic profile
(`moirai.planning.build_costgraph`) and runs each solver through `moirai.placement.solve`, which
re-checks every plan with the simulator. Records makespan, lower bound, gap, status and time,
the coarsening (ONNX nodes -> fusion groups -> tasks), and the speed-up of `auto` over the best
single device, HEFT, GETF and m-SCT (baseline makespan / auto makespan). `milp-highs` and
`cpsat` get the same time limit as `auto`, so the table also compares the paper's MILP with
CP-SAT directly.

Writes bench/results/placement.md (tables), placement.json (every number) and
placement_speedup.png / placement_gap.png (plots).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moirai import zoo  # noqa: E402
from moirai.errors import MoiraiError  # noqa: E402
from moirai.placement import default_threads, solve  # noqa: E402
from moirai.planning import build_costgraph  # noqa: E402

RESULTS = ROOT / "bench" / "results"
DEVICE_SETS = [
    ROOT / "examples" / "devices" / name
    for name in ("bench-3.yaml", "bench-4.yaml", "bench-gpus.yaml")
]
SOLVERS = ["single", "heft", "getf", "msct", "milp-highs", "cpsat", "auto"]
BASELINES = ["single", "heft", "getf", "msct"]
LABEL = {
    "single": "single",
    "heft": "HEFT",
    "getf": "GETF",
    "msct": "m-SCT",
    "milp-highs": "MILP (HiGHS)",
    "milp-gurobi": "MILP (Gurobi)",
    "cpsat": "CP-SAT",
    "auto": "auto",
}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for model in args.models:
        for devices in args.devices:
            started = time.monotonic()
            cg = build_costgraph(zoo.get(model), devices, zoo.input_shapes(model))
            source = cg.extra.get("source", {})
            row: dict[str, Any] = {
                "model": model,
                "devices": Path(devices).stem,
                "num_devices": len(cg.devices),
                "nodes": source.get("nodes"),
                "groups": source.get("fusion_groups"),
                "tasks": len(cg.tasks),
                "edges": len(cg.edges),
                "costgraph_seconds": round(time.monotonic() - started, 2),
                "solvers": {},
            }
            for name in args.solvers:
                try:
                    plan = solve(cg, name, time_limit=args.time_limit, threads=args.threads)
                except MoiraiError as e:
                    row["solvers"][name] = {"error": str(e)}
                    print(f"{model} {row['devices']} {name}: {e}", flush=True)
                    continue
                row["solvers"][name] = {
                    "solver": plan.solver,
                    "status": plan.status,
                    "makespan_ms": plan.makespan_ms,
                    "lower_bound_ms": plan.lower_bound_ms,
                    "gap": plan.gap,
                    "seconds": plan.solve_seconds,
                    "devices_used": len(set(plan.assignment.values())),
                    "transfers": len(plan.transfers),
                    "note": plan.extra.get("note", ""),
                }
                print(
                    f"{model:<13} {row['devices']:<8} {name:<11} {plan.makespan_ms:9.4f} ms "
                    f"bound {plan.lower_bound_ms:9.4f} gap {plan.gap:6.2%} {plan.status:<9} "
                    f"{plan.solve_seconds:6.1f} s",
                    flush=True,
                )
            auto = row["solvers"].get("auto", {}).get("makespan_ms")
            row["speedup"] = {
                b: row["solvers"][b]["makespan_ms"] / auto
                for b in BASELINES
                if auto and "makespan_ms" in row["solvers"].get(b, {})
            }
            rows.append(row)
    return rows


def _cell(result: dict[str, Any] | None) -> str:
    if not result:
        return "-"
    if "error" in result:
        return "n/a"
    return f"{result['makespan_ms']:.3f}"


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    solvers = args.solvers
    lines = [
        "# Placement benchmark",
        "",
        f"`bench/placement.py --time-limit {args.time_limit:g} --threads {args.threads}` on "
        f"{platform.machine()} ({args.threads} threads), analytic costs from "
        "`examples/devices/bench-3.yaml` (A100, T4, Xeon; 10 Gb/s Ethernet), `bench-4.yaml` "
        "(A100, two T4 on one PCIe node, Xeon) and `bench-gpus.yaml` (two A100 on NVLink and two "
        "T4, one PCIe node). Makespans in ms, re-checked by the simulator; "
        "`gap` = (makespan - lower bound) / makespan; speed-up = baseline makespan / auto "
        "makespan.",
        "",
        "## Makespan (ms) per solver",
        "",
        "| model | devices | nodes → groups → tasks | "
        + " | ".join(LABEL.get(s, s) for s in solvers)
        + " | auto bound | auto gap | auto status | auto s |",
        "|" + "---|" * (3 + len(solvers) + 4),
    ]
    for row in rows:
        auto = row["solvers"].get("auto", {})
        lines.append(
            f"| {row['model']} | {row['devices']} | {row['nodes']} → {row['groups']} → "
            f"{row['tasks']} | "
            + " | ".join(_cell(row["solvers"].get(s)) for s in solvers)
            + (
                f" | {auto['lower_bound_ms']:.3f} | {auto['gap']:.2%} | {auto['status']} | "
                f"{auto['seconds']:.1f} |"
                if "makespan_ms" in auto
                else " | - | - | - | - |"
            )
        )
    lines += [
        "",
        "## Speed-up of auto",
        "",
        "| model | devices | " + " | ".join(f"vs {LABEL[b]}" for b in BASELINES) + " |",
        "|---|---|" + "---|" * len(BASELINES),
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['devices']} | "
            + " | ".join(
                f"{row['speedup'][b]:.2f}x" if b in row["speedup"] else "-" for b in BASELINES
            )
            + " |"
        )
    exact = [s for s in ("milp-highs", "milp-gurobi", "cpsat", "auto") if s in solvers]
    lines += [
        "",
        "## Exact solvers: status, gap and seconds",
        "",
        "| model | devices | " + " | ".join(LABEL[s] for s in exact) + " |",
        "|---|---|" + "---|" * len(exact),
    ]
    for row in rows:
        cells = []
        for s in exact:
            r = row["solvers"].get(s, {})
            if "makespan_ms" not in r:
                cells.append("-")
                continue
            cells.append(f"{r['status']}, {r['gap']:.2%}, {r['seconds']:.1f} s")
        lines.append(f"| {row['model']} | {row['devices']} | " + " | ".join(cells) + " |")
    worse = [
        f"{row['model']}/{row['devices']}: {b}"
        for row in rows
        for b, v in row["speedup"].items()
        if v < 1 - 1e-9
    ]
    lines += [
        "",
        "auto is no worse than every heuristic on every instance."
        if not worse
        else "auto is worse than a heuristic on: " + ", ".join(worse),
        "",
    ]
    return "\n".join(lines)


def plots(rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [f"{r['model']}/{r['devices']}" for r in rows]
    x = np.arange(len(rows))
    width = 0.8 / len(BASELINES)
    fig, ax = plt.subplots(figsize=(max(8, 0.7 * len(rows)), 4.5))
    for n, b in enumerate(BASELINES):
        ax.bar(
            x + n * width,
            [r["speedup"].get(b, 0) for r in rows],
            width,
            label=f"vs {LABEL[b]}",
        )
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(x + width * (len(BASELINES) - 1) / 2, names, rotation=60, ha="right")
    ax.set_ylabel("speed-up of auto (x)")
    ax.set_title("auto's latency against the baselines (higher is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "placement_speedup.png", dpi=120)
    plt.close(fig)

    exact = [s for s in ("milp-highs", "cpsat", "auto") if any(s in r["solvers"] for r in rows)]
    fig, ax = plt.subplots(figsize=(max(8, 0.7 * len(rows)), 4.5))
    width = 0.8 / max(1, len(exact))
    for n, s in enumerate(exact):
        ax.bar(
            x + n * width,
            [100 * r["solvers"].get(s, {}).get("gap", 0) for r in rows],
            width,
            label=LABEL[s],
        )
    ax.set_xticks(x + width * (len(exact) - 1) / 2, names, rotation=60, ha="right")
    ax.set_ylabel("optimality gap (%)")
    ax.set_title("gap to the proven lower bound (lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "placement_gap.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per solve")
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--models", type=lambda s: s.split(","), default=zoo.names())
    parser.add_argument("--devices", nargs="+", default=[str(p) for p in DEVICE_SETS])
    parser.add_argument("--solvers", type=lambda s: s.split(","), default=SOLVERS)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = run(args)
    (RESULTS / "placement.json").write_text(json.dumps(rows, indent=1) + "\n")
    (RESULTS / "placement.md").write_text(markdown(rows, args))
    plots(rows)
    print(f"wrote {RESULTS / 'placement.md'}")


if __name__ == "__main__":
    main()
