"""`moirai place`: plan a model (or a cost graph) across devices and report the plan.

    moirai place MODEL.onnx --devices FILE|local [--cpu-devices N] \
        [--input-shape NAME=DIMS ...] [--profile analytic|measured|FILE] [--max-tasks N]
    moirai place --costgraph FILE.json
        [--solver auto] [--objective latency|throughput] [--time-limit 60] [--threads N] \
        [--seed 0] [--pin TASK=DEVICE ...] [--memory-limit DEVICE=BYTES ...] [-o plan.json] \
        [--costgraph-out FILE.json] [--compare] [--gantt FILE.png]

Prints a table (solver, status, makespan, period, lower bound, gap, seconds) and the busy time
and memory of every device (busy: computing, as a share of the makespan; for `throughput`, per
request with the transfers a device pays for, as a share of the period); `--compare` runs every
available solver with the same limits side by side and keeps the best plan. Improving
incumbents and bounds go to stderr while solving.
`--devices local` are the devices `moirai serve --devices local` plans for (the same resolver,
`moirai.planning.inputs.resolve`): the grouping of the CPU's cores that serves best unless
`--cpu-devices` says, priced by a measured profile unless `--profile` says. A thin shell over
`moirai.planning.build_costgraph` and `moirai.placement.solve`; every input error is one line
and exit status 2 (see `moirai.cli`).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from moirai.cli.options import (
    output_file,
    picture_file,
    positive_float,
    positive_int,
    resolve_from_args,
    solver_name,
    solver_options,
)
from moirai.errors import MoiraiError

if TYPE_CHECKING:
    from moirai.costgraph import CostGraph
    from moirai.placement import Placement, PlacementProblem, Progress


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("place", help="plan a model across devices and report the plan")
    p.add_argument("model", type=Path, nargs="?", help="ONNX model file")
    p.add_argument("--devices", help="devices YAML file, or 'local' (with MODEL)")
    p.add_argument(
        "--cpu-devices",
        type=positive_int,
        help="with --devices local: split the CPU into this many devices (default: the "
        "grouping `moirai serve` would choose)",
    )
    p.add_argument("--costgraph", type=Path, help="plan this moirai.costgraph/v1 file instead")
    p.add_argument(
        "--input-shape", action="append", default=[], metavar="NAME=DIMS", help="e.g. x=1x3x224x224"
    )
    p.add_argument(
        "--profile",
        metavar="analytic|measured|FILE",
        help="task costs for MODEL (default: measured with --devices local, else analytic)",
    )
    p.add_argument(
        "--max-tasks", type=positive_int, help="coarsen MODEL to at most this many tasks"
    )
    p.add_argument(
        "--solver", type=solver_name, default="auto", help="auto (default), cpsat, milp, heft, ..."
    )
    p.add_argument("--objective", choices=("latency", "throughput"), default="latency")
    p.add_argument("--time-limit", type=positive_float, default=60.0, help="seconds (default 60)")
    p.add_argument("--threads", type=positive_int, help="solver threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--pin", action="append", default=[], metavar="TASK=DEVICE", help="fix a task's device"
    )
    p.add_argument(
        "--memory-limit",
        action="append",
        default=[],
        metavar="DEVICE=BYTES",
        help="use at most this much of a device's memory (e.g. gpu-0=8e9)",
    )
    p.add_argument("-o", "--output", type=output_file, help="write the plan (moirai.placement/v1)")
    p.add_argument(
        "--costgraph-out", type=output_file, help="write the cost graph that was planned"
    )
    p.add_argument("--compare", action="store_true", help="run every available solver")
    p.add_argument(
        "--gantt", type=picture_file, help="draw the schedule to this picture (PNG, SVG, PDF...)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=run)


def _pairs(values: list[str], flag: str, example: str) -> dict[str, str]:
    out = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key or not val:
            raise MoiraiError(f"{flag} {value!r}: write {example}")
        if key in out:
            raise MoiraiError(f"{flag} {key} is given twice ({out[key]} and {val}): give it once")
        out[key] = val
    return out


def _memory_limits(values: list[str]) -> dict[str, int]:
    out = {}
    for dev, text in _pairs(values, "--memory-limit", "DEVICE=BYTES, e.g. gpu-0=8e9").items():
        try:
            out[dev] = int(float(text))
        except (ValueError, OverflowError):  # not a number, nan or inf
            raise MoiraiError(
                f"--memory-limit {dev}={text}: BYTES must be a finite number, e.g. 8e9"
            ) from None
    return out


def load_costgraph(args: argparse.Namespace) -> CostGraph:
    from moirai.costgraph import CostGraph

    if args.costgraph is not None:
        if args.model is not None:
            raise MoiraiError("give either MODEL.onnx or --costgraph FILE, not both")
        model_flags = {
            "--devices": args.devices,
            "--cpu-devices": args.cpu_devices,
            "--input-shape": args.input_shape,
            "--profile": args.profile,
            "--max-tasks": args.max_tasks,
        }
        given = [flag for flag, value in model_flags.items() if value]
        if given:  # they were ignored
            raise MoiraiError(
                f"{given[0]} applies to MODEL.onnx: a cost graph names its own devices and "
                "times (write one with --costgraph-out)"
            )
        return CostGraph.load(args.costgraph)
    if args.model is None:
        raise MoiraiError("nothing to place: give MODEL.onnx --devices FILE, or --costgraph FILE")
    if not args.devices:
        raise MoiraiError("MODEL.onnx needs --devices FILE (a devices YAML file) or 'local'")
    from moirai.planning import build_costgraph, plan_model
    from moirai.planning.costgraph import coarsening

    inputs = resolve_from_args(args, args.model)
    devices = inputs.device_sets[0]
    if len(inputs.device_sets) > 1:  # the grouping of the CPU `moirai serve` would choose
        planned = plan_model(
            inputs.model,
            inputs.device_sets,
            seed=args.seed,
            profile=inputs.profile,
            threads=args.threads,
            **solver_options(args),
        )
        devices = planned.layout.devices
        print(
            f"moirai: devices: {planned.layout.describe()} serves best (--cpu-devices N to choose)",
            file=sys.stderr,
        )
    costgraph = build_costgraph(
        inputs.model, devices, profile=inputs.profile, max_tasks=args.max_tasks
    )
    if len(inputs.device_sets) == 1:  # else plan_model said it
        print(f"moirai: {coarsening(costgraph)}", file=sys.stderr)
    return costgraph


class _Reporter:
    """Prints improving incumbents and bounds to stderr, once per improvement."""

    def __init__(self) -> None:
        self.best: dict[str, tuple[float, float]] = {}

    def __call__(self, event: Progress) -> None:
        inc, bound = self.best.get(event.solver, (math.inf, -math.inf))
        # improvements below the printed precision are not worth a line
        new_inc = event.incumbent_ms is not None and event.incumbent_ms < inc * (1 - 1e-4)
        new_bound = event.bound_ms is not None and event.bound_ms > bound * (1 + 1e-4) + 1e-12
        if not (new_inc or new_bound or event.message):
            return
        inc = min(inc, event.incumbent_ms if event.incumbent_ms is not None else math.inf)
        bound = max(bound, event.bound_ms if event.bound_ms is not None else -math.inf)
        self.best[event.solver] = (inc, bound)
        parts = [f"moirai: [{event.elapsed_s:6.1f}s] {event.solver}:"]
        if math.isfinite(inc):
            parts.append(f"best {inc:.4f} ms")
        if math.isfinite(bound) and bound > 0:
            parts.append(f"bound {bound:.4f} ms")
            if math.isfinite(inc) and inc > 0:
                parts.append(f"gap {max(0.0, (inc - bound) / inc):.2%}")
        if event.message:
            parts.append(f"({event.message})")
        print(" ".join(parts), file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from moirai.placement import (
        PlacementProblem,
        SolveOptions,
        default_threads,
        get_solver,
        solve_problem,
        solvers,
    )

    costgraph = load_costgraph(args)
    if args.costgraph_out is not None:
        costgraph.save(args.costgraph_out)
    problem = PlacementProblem(
        costgraph,
        args.objective,
        _pairs(args.pin, "--pin", "TASK=DEVICE, e.g. t3=gpu-0"),
        _memory_limits(args.memory_limit),
    )
    names = [args.solver]
    if args.compare:
        names = [s.name for s in solvers() if s.name != "milp" and s.available()[0]]
    else:
        get_solver(args.solver)  # unknown or unavailable: one line before any work
    progress = None if args.quiet else _Reporter()
    plans: list[Placement] = []
    asked: list[str] = []
    for name in names:
        options = SolveOptions(
            time_limit=args.time_limit,
            threads=args.threads or default_threads(),
            seed=args.seed,
            progress=progress,
        )
        try:
            plans.append(solve_problem(problem, name, options))
            asked.append(name)
        except MoiraiError as e:
            if not args.compare:
                raise
            print(f"moirai: {name}: {e}", file=sys.stderr)
    if not plans:
        raise MoiraiError("no solver produced a plan")
    best = min(plans, key=lambda plan: (plan.objective_ms, plan.solve_seconds))
    print(_summary(costgraph, problem, plans, asked, best))
    if args.output is not None:
        best.save(args.output)
        print(f"plan written to {args.output}")
    if args.gantt is not None:
        from moirai.placement.gantt import draw_gantt

        draw_gantt(best, problem.costgraph, args.gantt)
        print(f"schedule drawn to {args.gantt}")
    return 0


def _hop_work_line(costgraph: CostGraph) -> str:
    """Which devices do hop work (their transfers take their own time): Moirai's CPUs by
    default; in a cost graph file only those that say `transfers_occupy_device: true`."""
    paying = [d.name for d in costgraph.devices if d.pays_for_transfers]
    if not paying:
        return "execution model: the cost graph format's (no device does hop work)"
    return f"hop work (transfers take the device's own time) on {', '.join(paying)}"


ENDED_BY = {
    "proof": "proven optimal",
    "time": "ended by the time limit: a longer --time-limit may improve the plan or its bound",
    "stop": "stopped before the time limit",
}
"""How a plan's `stopped_by` reads in the report."""


def _ending(plan: Placement) -> str:
    """Which lower bound binds and why the search ended, where the solver says (`auto`'s
    `bound_from` and `stopped_by`): whether more time could pay."""
    parts = []
    if plan.extra.get("bound_from"):
        parts.append(f"binding bound: {plan.extra['bound_from']}")
    if plan.extra.get("stopped_by") in ENDED_BY:
        parts.append(ENDED_BY[plan.extra["stopped_by"]])
    return "; ".join(parts)


def _summary(
    costgraph: CostGraph,
    problem: PlacementProblem,
    plans: list[Placement],
    asked: list[str],
    best: Placement,
) -> str:
    from moirai.placement.problem import gib
    from moirai.placement.simulate import loads
    from moirai.wording import counted

    source = costgraph.extra.get("source", {})
    coarsening = ""
    if isinstance(source, dict) and "nodes" in source:
        groups = source.get("fusion_groups")
        coarsening = (
            f" ({counted(source['nodes'], 'node')} -> "
            f"{'?' if groups is None else counted(groups, 'group')})"
        )
    lines = [
        f"{costgraph.name}: {counted(len(costgraph.tasks), 'task')}{coarsening}, "
        f"{counted(len(costgraph.edges), 'edge')}, {counted(len(costgraph.devices), 'device')}; "
        f"objective {problem.objective}",
        _hop_work_line(costgraph),
        "",
        f"{'solver':<24} {'status':<10} {'makespan ms':>12} {'period ms':>10} "
        f"{'bound ms':>10} {'gap':>7} {'seconds':>8}",
    ]
    for name, plan in zip(asked, plans, strict=True):
        mark = " *" if plan is best and len(plans) > 1 else ""
        # a solver that handed over says so (e.g. milp-gurobi -> milp-highs)
        label = plan.solver if plan.solver.startswith(name) else f"{name}->{plan.solver}"
        lines.append(
            f"{label:<24} {plan.status:<10} {plan.makespan_ms:>12.4f} "
            f"{plan.period_ms or 0.0:>10.4f} {plan.lower_bound_ms:>10.4f} {plan.gap:>7.2%} "
            f"{plan.solve_seconds:>8.2f}{mark}"
        )
    ending = _ending(best)
    if ending:  # of the best plan, marked * when several are compared
        lines.append(f"* {ending}" if len(plans) > 1 else ending)
    busy = dict.fromkeys(problem.devices, 0.0)
    tasks = dict.fromkeys(problem.devices, 0)
    memory = dict.fromkeys(problem.devices, 0)
    for s in best.schedule:
        busy[s.device] += s.end_ms - s.start_ms
        tasks[s.device] += 1
        memory[s.device] += costgraph.task[s.task].memory_bytes
    span = best.makespan_ms
    if problem.objective == "throughput":  # per request, with the transfers a device pays for
        assignment = [problem.device_index[best.assignment[t]] for t in problem.tasks]
        per_device = loads(problem, assignment)[: problem.num_devices]
        busy = dict(zip(problem.devices, per_device, strict=True))
        span = best.period_ms or 0.0
    lines += [
        "",
        f"{'device':<14} {'tasks':>6} {'busy ms':>10} {'busy %':>7} {'memory':>10} {'of':>10}",
    ]
    for k, d in enumerate(problem.devices):
        share = busy[d] / span if span > 0 else 0.0
        lines.append(
            f"{d:<14} {tasks[d]:>6} {busy[d]:>10.4f} {share:>7.1%} {gib(memory[d]):>10} "
            f"{gib(problem.cap[k]):>10}"
        )
    sent = sum(x.end_ms - x.start_ms for x in best.transfers)
    lines.append(f"{len(best.transfers)} transfers, {sent:.4f} ms on the wire")
    return "\n".join(lines)
