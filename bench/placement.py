"""Placement benchmark: `auto` and the baselines on three instance sets, before and after.

    flock /tmp/moirai-heavy.lock .venv/bin/python bench/placement.py --set zoo
    flock /tmp/moirai-heavy.lock .venv/bin/python bench/placement.py --set paper,random
    .venv/bin/python bench/placement.py --set zoo --code DIR --label before   # another checkout
    .venv/bin/python bench/placement.py --report                              # tables only

Sets (cost graphs built once and cached under Moirai's cache folder, `bench-placement-v2/`):
- `zoo`: every zoo model (`moirai.zoo`) on `examples/devices/bench-3.yaml` (A100, T4, Xeon;
  10 Gb/s Ethernet), `bench-4.yaml` (A100, two T4 on one PCIe node, Xeon) and
  `bench-gpus.yaml` (two A100 on NVLink, two T4, one PCIe node), analytic costs; 60 s.
- `paper`: graphs in the style of the paper's published instances
  (`tests/placement/instances.inception_costgraph`): Inception-like networks of 144 to 1378
  tasks on 4 heterogeneous devices, a cost per task and device and a transfer matrix per edge,
  two of them with a fastest device too small for the whole model; 60 s. The fourth device is a
  CPU, which does hop work as Moirai's CPUs do.
- `random`: random DAGs (`tests/placement/instances.random_dag`) of 100 to 1500 tasks on 3 to 8
  devices, communication-to-computation ratios 0.3 and 1; 20 s. The devices are CPUs, so every
  hop is also work on both ends (`problem.hop_work`, since 998b171).
- `published`: the paper's own published instances (`bench/published.py`), read from a copy of
  its reference implementation's `sample-data/` folder (`--published DIR`; not in this
  repository; read anew on every run, the cache file only hands them to `moirai place`); 60 s.
  Run them with `--label no-hop-work` (the format's model, which they are in) and the issue's
  baseline with `--label old-main --code DIR`.

`--no-hop-work` solves the same graphs under the cost graph format's own execution model, where
no device does hop work (its instances are named with `-no-hop-work`): the model of the labels
`old-main` (the issue's baseline) and `pre-hop-work`, and of an instance file from elsewhere.

Each solve is its own `moirai place --costgraph FILE` process, so `--code DIR` runs the same
instances through another checkout's solvers (`before`: the main branch this work started
from). A run writes its numbers under its label in bench/results/placement.json; the report
(bench/results/placement.md, placement_gap.png) compares the labels `before` and `after`: the
makespan, the lower bound, the proven gap ((makespan - bound) / makespan), the binding bound,
and the medians per set. Keep one invocation under 20 minutes on 2 cores: one set per run
(`--quick` takes 10 s limits and the smaller instances, for development).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moirai.cachedir import cache_dir  # noqa: E402
from moirai.costgraph import CostGraph  # noqa: E402
from moirai.placement import default_threads  # noqa: E402

RESULTS = ROOT / "bench" / "results"
# v2: a file's devices pay for their transfers only where it says so (the format's model); the
# instances of before, saved without the key, would now load without their CPUs' hop work.
CACHE = cache_dir("bench-placement-v2")
DEVICE_SETS = ("bench-3", "bench-4", "bench-gpus")
HEURISTICS = ("single", "heft", "getf", "msct")
LABEL = {"single": "single", "heft": "HEFT", "getf": "GETF", "msct": "m-SCT", "auto": "auto"}
TIME_LIMIT = {"zoo": 60.0, "paper": 60.0, "random": 20.0, "published": 60.0}
PAPER = [  # (seed, Inception modules, memory-tight): 144 to 1378 tasks
    (1, 16, False),
    (2, 16, True),
    (3, 35, False),
    (4, 71, False),
    (5, 119, True),
    (6, 163, False),
]
RANDOM = [  # (seed, tasks, devices, ccr)
    (1, 100, 3, 0.3),
    (2, 100, 8, 1.0),
    (3, 200, 4, 1.0),
    (4, 300, 5, 0.3),
    (5, 400, 3, 1.0),
    (6, 600, 6, 0.3),
    (7, 800, 8, 1.0),
    (8, 1000, 4, 0.3),
    (9, 1500, 3, 1.0),
    (10, 1500, 8, 0.3),
]


def instances(
    which: str, quick: bool, published: Path | None = None
) -> list[tuple[str, Callable[[], CostGraph]]]:
    """(name, builder) of every instance of a set; built lazily, cached as JSON."""
    from tests.placement.instances import inception_costgraph, random_dag

    if which == "published":
        import published as paper_data

        if published is None:
            raise SystemExit("--set published needs --published DIR (the paper's sample-data)")
        return [(n, partial(paper_data.read_xls, p)) for n, p in paper_data.instances(published)]
    if which == "zoo":
        from moirai import zoo
        from moirai.planning import build_costgraph

        models = zoo.names()[:3] if quick else zoo.names()
        return [
            (
                f"{m}/{d}",
                lambda m=m, d=d: build_costgraph(
                    zoo.get(m), ROOT / "examples" / "devices" / f"{d}.yaml", zoo.input_shapes(m)
                ),
            )
            for m in models
            for d in DEVICE_SETS
        ]
    if which == "paper":
        return [
            (
                f"inception-{seed}{'-tight' if tight else ''}",
                lambda s=seed, m=modules, t=tight: inception_costgraph(s, m, memory_tight=t),
            )
            for seed, modules, tight in (PAPER[:2] if quick else PAPER)
        ]
    if which == "random":
        return [
            (
                f"random-{seed}-{n}x{k}-ccr{ccr:g}",
                lambda s=seed, n=n, k=k, c=ccr: random_dag(s, n, k, ccr=c),
            )
            for seed, n, k, ccr in (RANDOM[:3] if quick else RANDOM)
        ]
    raise SystemExit(f"unknown set {which!r}: use zoo, paper, random or published")


def without_hop_work(build: Callable[[], CostGraph]) -> CostGraph:
    """The instance with no device paying for its transfers: the format's execution model."""
    cg = build()
    devices = tuple(replace(d, transfers_occupy_device=False) for d in cg.devices)
    return replace(cg, devices=devices)


def cached(name: str, build: Callable[[], CostGraph], refresh: bool = False) -> Path:
    path = CACHE / (name.replace("/", "__") + ".json")
    if refresh or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        build().save(path)
    return path


def place(
    costgraph: Path, solver: str, time_limit: float, threads: int, code: Path | None
) -> dict[str, Any]:
    """One solve in its own process (`moirai place`, from `code` when given)."""
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = str(code)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "plan.json"
        argv = [sys.executable, "-m", "moirai", "place", "--costgraph", str(costgraph)]
        argv += ["--solver", solver, "--time-limit", f"{time_limit:g}"]
        argv += ["--threads", str(threads), "-q", "-o", str(out)]
        started = time.monotonic()
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=code or ROOT)
        wall = time.monotonic() - started
        if proc.returncode != 0:
            return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1], "wall_s": wall}
        plan = json.loads(out.read_text())
    return {
        "solver": plan["solver"],
        "status": plan["status"],
        "makespan_ms": plan["makespan_ms"],
        "lower_bound_ms": plan["lower_bound_ms"],
        "gap": plan["gap"],
        "bound_from": plan.get("bound_from", ""),
        "seconds": plan["solve_seconds"],
        "wall_s": wall,
        "devices_used": len(set(plan["assignment"].values())),
    }


def run(args: argparse.Namespace) -> None:
    path = RESULTS / "placement.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    if not isinstance(data, dict) or "runs" not in data:  # another layout: start afresh
        data = {}
    runs = data.setdefault("runs", {}).setdefault(args.label, {})
    solvers = args.solvers or (["auto"] if args.label == "before" else [*HEURISTICS, "auto"])
    for which in args.set:
        limit = 10.0 if args.quick else TIME_LIMIT[which]
        for name, build in instances(which, args.quick, args.published):
            if args.no_hop_work and which != "published":  # those are in the format's model
                name, build = f"{name}-no-hop-work", partial(without_hop_work, build)
            cg_path = cached(name, build, refresh=which == "published")
            cg = CostGraph.load(cg_path)
            row = runs.setdefault(name, {})
            row.update(
                set=which,
                tasks=len(cg.tasks),
                edges=len(cg.edges),
                devices=len(cg.devices),
                time_limit=limit,
                threads=args.threads,
            )
            for solver in solvers:
                result = place(cg_path, solver, limit, args.threads, args.code)
                row[solver] = result
                shown = (
                    f"{result['makespan_ms']:9.4f} ms bound {result['lower_bound_ms']:9.4f} "
                    f"gap {result['gap']:6.2%} {result['status']:<9} "
                    f"{result['seconds']:5.1f} s {result['bound_from']}"
                    if "error" not in result
                    else result["error"]
                )
                print(f"{args.label:<6} {name:<34} {solver:<6} {shown}", flush=True)
            path.write_text(json.dumps(data, indent=1) + "\n")  # keep what is done
    data.setdefault("machine", {})[args.label] = (
        f"{platform.machine()}, {os.cpu_count()} cores, --threads {args.threads}"
    )
    path.write_text(json.dumps(data, indent=1) + "\n")


# ---------------------------------------------------------------------- report
def _auto(row: dict[str, Any] | None) -> dict[str, Any] | None:
    result = (row or {}).get("auto")
    return result if result and "error" not in result else None


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.2%}" if values else "-"


def report(data: dict[str, Any]) -> str:
    runs = data.get("runs", {})
    before, after = runs.get("before", {}), runs.get("after", {})
    names = [n for n in after if n in before] + [n for n in after if n not in before]
    lines = [
        "# Placement benchmark",
        "",
        "`bench/placement.py` (see its docstring): `auto` before (the main branch this work "
        "started from) and after, on the same instances, the same time limit and "
        f"`--threads` ({data.get('machine', {}).get('after', '?')}; before: "
        f"{data.get('machine', {}).get('before', '?')}). Makespans and bounds in ms; gap = "
        "(makespan - lower bound) / makespan, proven; `bound` = the binding lower bound: "
        "`series` (the series decomposition), a solver's own (`cpsat`, `milp-highs`) or a "
        "simple one (`critical path`, `device critical path`, `sequenced critical path`, `work`) "
        "or an LP's (`windowed load`, `path LP`; both built on the sequenced heads and tails "
        "of `moirai.placement.bounds`, and both counting the devices' hop work where they pay "
        "for their transfers). ▼ marks a plan or bound worse than before.",
        "",
    ]
    summary = [
        "## Summary",
        "",
        "| set | instances | median gap before | median gap after | open before | open after "
        "| plan better / worse | bound better / worse |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for which in ("zoo", "paper", "random", None):
        group = [n for n in names if which is None or after[n].get("set") == which]
        pairs = [(_auto(before.get(n)), _auto(after[n])) for n in group]
        pairs = [(b, a) for b, a in pairs if b is not None and a is not None]
        if not pairs:
            continue
        tol = 1e-6
        summary.append(
            f"| {which or 'all'} | {len(pairs)} | {_median([b['gap'] for b, _ in pairs])} | "
            f"{_median([a['gap'] for _, a in pairs])} | "
            f"{sum(b['gap'] > 1e-4 for b, _ in pairs)} | "
            f"{sum(a['gap'] > 1e-4 for _, a in pairs)} | "
            f"{sum(a['makespan_ms'] < b['makespan_ms'] * (1 - tol) for b, a in pairs)} / "
            f"{sum(a['makespan_ms'] > b['makespan_ms'] * (1 + tol) for b, a in pairs)} | "
            f"{sum(a['lower_bound_ms'] > b['lower_bound_ms'] * (1 + tol) for b, a in pairs)} / "
            f"{sum(a['lower_bound_ms'] < b['lower_bound_ms'] * (1 - tol) for b, a in pairs)} |"
        )
    lines += summary
    for which in ("zoo", "paper", "random"):
        group = [n for n in names if after[n].get("set") == which]
        if not group:
            continue
        heur = [h for h in HEURISTICS if any(h in after[n] for n in group)]
        lines += [
            "",
            f"## {which} ({after[group[0]]['time_limit']:g} s)",
            "",
            "| instance | tasks | devices | "
            + " | ".join(LABEL[h] for h in heur)
            + " | before | bound | gap | after | bound | gap | bound from | status | s |",
            "|---|---|---|" + "---|" * len(heur) + "---|---|---|---|---|---|---|---|---|",
        ]
        for n in group:
            row, old, new = after[n], _auto(before.get(n)), _auto(after[n])
            cells = [n, str(row["tasks"]), str(row["devices"])]
            for h in heur:
                r = row.get(h, {})
                cells.append(f"{r['makespan_ms']:.3f}" if "makespan_ms" in r else "n/a")
            if old is not None:
                cells += [
                    f"{old['makespan_ms']:.3f}",
                    f"{old['lower_bound_ms']:.3f}",
                    f"{old['gap']:.1%}",
                ]
            else:
                cells += ["-", "-", "-"]
            if new is not None:
                worse_plan = old is not None and new["makespan_ms"] > old["makespan_ms"] * (
                    1 + 1e-6
                )
                worse_bound = old is not None and new["lower_bound_ms"] < old["lower_bound_ms"] * (
                    1 - 1e-6
                )
                cells += [
                    f"**{new['makespan_ms']:.3f}**" + (" ▼" if worse_plan else ""),
                    f"{new['lower_bound_ms']:.3f}" + (" ▼" if worse_bound else ""),
                    f"{new['gap']:.1%}",
                    new["bound_from"] or "-",
                    new["status"],
                    f"{new['seconds']:.1f}",
                ]
            else:
                cells += ["-"] * 6
            lines.append("| " + " | ".join(cells) + " |")
    previous = runs.get("previous", {})
    pairs = [(n, _auto(previous.get(n)), _auto(after[n])) for n in names]
    shown = [(n, old, new) for n, old, new in pairs if old is not None and new is not None]
    if shown:
        lines += [
            "",
            "## Against the previous run",
            "",
            "The label `previous` holds an earlier `after` run (the main branch this change "
            "started from, same instances, limits and machine): its plan, bound and the "
            "bound's source, next to this run's.",
            "",
            "| instance | previous | bound | gap | bound from | after | bound | gap | bound from |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for n, old, new in shown:
            cells = [n]
            for r in (old, new):
                cells += [
                    f"{r['makespan_ms']:.3f}",
                    f"{r['lower_bound_ms']:.3f}",
                    f"{r['gap']:.1%}",
                    r["bound_from"] or "-",
                ]
            lines.append("| " + " | ".join(cells) + " |")
        was = _median([old["gap"] for _, old, _ in shown])
        now = _median([new["gap"] for _, _, new in shown])
        lines.append(f"| median | | | {was} | | | | {now} | |")
    lines += _report_without_hop_work(runs)
    lines.append("")
    return "\n".join(lines)


NO_HOP_WORK = ("old-main", "pre-hop-work", "no-hop-work")
"""Labels solved under the format's own model: the issue's baseline, the last run before hop
work, and `--no-hop-work --label no-hop-work`."""


def _report_without_hop_work(runs: dict[str, Any]) -> list[str]:
    """The format's execution model: the `no-hop-work` run against the issue's baseline and the
    last run before hop work, on the same graphs."""
    latest = runs.get("no-hop-work", {})
    if not latest:
        return []
    lines = [
        "",
        "## Under the format's execution model (no hop work)",
        "",
        "The same graphs with no device doing hop work, as the cost graph format defines them "
        "and as instances from elsewhere are solved: `old-main` (the issue's baseline), "
        "`pre-hop-work` (the last run before hop work) and `no-hop-work` "
        "(`--no-hop-work --label no-hop-work`); and the paper's published instances "
        "(`published-`, `--set published`), which are in that model. `error`: that "
        "checkout's `auto` stopped with an error (its message is in placement.json).",
        "",
        "| instance | " + " | ".join(f"{label} | bound | gap" for label in NO_HOP_WORK) + " |",
        "|---|" + "---|---|---|" * len(NO_HOP_WORK),
    ]
    gaps: dict[tuple[str, str], list[float]] = {}
    for name, result in latest.items():
        base = name.removesuffix("-no-hop-work")
        row = [runs.get("old-main", {}).get(base), runs.get("pre-hop-work", {}).get(base), result]
        cells = [base]
        for label, raw in zip(NO_HOP_WORK, row, strict=True):
            r = _auto(raw)
            if r is None:  # not run, or stopped with an error
                cells += ["error" if (raw or {}).get("auto") else "-", "-", "-"]
                continue
            cells += [f"{r['makespan_ms']:.3f}", f"{r['lower_bound_ms']:.3f}", f"{r['gap']:.1%}"]
            gaps.setdefault((result["set"], label), []).append(r["gap"])
        lines.append("| " + " | ".join(cells) + " |")
    for which in dict.fromkeys(r["set"] for r in latest.values()):
        medians = [_median(gaps.get((which, label), [])) for label in NO_HOP_WORK]
        lines.append(f"| median gap, {which} | " + " | ".join(f"| | {m}" for m in medians) + " |")
    return lines


def plot(data: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs = data.get("runs", {})
    before, after = runs.get("before", {}), runs.get("after", {})
    names = [n for n in after if _auto(after[n]) and _auto(before.get(n))]
    if not names:
        return
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(8, 0.35 * len(names)), 4.5))
    for shift, (label, run) in zip(
        (-0.2, 0.2), (("before", before), ("after", after)), strict=True
    ):
        ax.bar(x + shift, [100 * run[n]["auto"]["gap"] for n in names], 0.4, label=label)
    ax.set_xticks(x, names, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("proven gap of auto (%)")
    ax.set_title("gap to the lower bound, before and after (lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "placement_gap.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", type=lambda s: s.split(","), default=["zoo"])
    parser.add_argument("--label", default="after", help="where the numbers go (after, before)")
    parser.add_argument("--code", type=Path, help="run this checkout's solvers (PYTHONPATH)")
    parser.add_argument("--threads", type=int, default=min(2, default_threads()))
    parser.add_argument("--solvers", type=lambda s: s.split(","))
    parser.add_argument(
        "--published", type=Path, help="the paper's sample-data folder (for --set published)"
    )
    parser.add_argument("--quick", action="store_true", help="10 s limits, fewer instances")
    parser.add_argument("--report", action="store_true", help="only rewrite the report")
    parser.add_argument(
        "--no-hop-work",
        action="store_true",
        help="solve under the cost graph format's own execution model (no device does hop work), "
        "as the labels old-main and pre-hop-work were",
    )
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not args.report:
        run(args)
    data = json.loads((RESULTS / "placement.json").read_text())
    (RESULTS / "placement.md").write_text(report(data))
    plot(data)
    print(f"wrote {RESULTS / 'placement.md'}")


if __name__ == "__main__":
    main()
