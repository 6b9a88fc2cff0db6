"""From an ONNX file to a stage plan: the pipeline as `moirai serve` and `moirai demo` run it.

load → cost graph (analytic or measured profile) → solver → stage plan. The
plan's groups are the cost graph's tasks (`Task.ops` are canonical node names) in the order of
the solver's schedule, so stages follow the schedule the solver predicted.

The plan's `predicted` keeps the solver's figures on the cost graph (`makespan_ms`, `period_ms`,
`lower_bound_ms`) and adds the plan's as served (`moirai.runtime.prediction`): `latency_ms`
(what `moirai serve`, `moirai demo`, the operator and the validation benchmark report) with its
parts `served_ms` and `client_ms`, and `served_period_ms`.

The operator plans through `plan_model` too: it describes its node pools as a `DeviceSet`,
passes a `check` that refuses a model its pools cannot hold before the solver runs, and bounds
the solver's `threads`.

`--devices local` describes this machine as one CPU device with every core; serving wants one
stage server per core group, so `split_cpu` cuts it into N devices of cores/N threads each
(by default one per core, capped at 4), each later pinned to its own cores by the local runtime.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx

from moirai.costgraph import CostGraph, Link
from moirai.devices import DeviceSet
from moirai.errors import InfeasibleError, MoiraiError
from moirai.graph import load_model
from moirai.partition import build_plan
from moirai.pipeline import build_costgraph
from moirai.placement import Objective, solve
from moirai.placement.result import Placement
from moirai.profile import Profile
from moirai.runtime.prediction import Prediction, call_overheads, predict
from moirai.stageplan import DeviceSpec, StagePlan

MAX_LOCAL_CPU_DEVICES = 4
# What one hop between local stage servers costs, as the solver should see it. Measured on the
# 2-core development machine (bench/results/runtime.md): over the same-host fast path a push
# takes about 0.35 ms of wall time plus 1-1.4 GB/s, and with pipelined requests about 0.35 ms of
# CPU on each end. That is one end's cost: the throughput objective charges it to each CPU end
# (a CPU stage server pays for its transfers on its own core, docs/throughput-model.md), and a
# latency plan waits for it once per hop. A measured profile (`--profile measured`) brings its
# own measured link instead.
SERVING_LOOPBACK = Link(bandwidth_bytes_per_s=1.0e9, latency_ms=0.35)


def available_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]


def split_cpu(devices: DeviceSet, parts: int | None = None) -> DeviceSet:
    """Cut each CPU device into `parts` devices of equal thread count and peak, linked by
    `SERVING_LOOPBACK`."""
    cpus = [d for d in devices.devices if d.kind == "cpu"]
    out = []
    for d in devices.devices:
        if d.kind != "cpu":
            out.append(d)
            continue
        threads = d.threads or len(available_cores())
        n = parts or min(threads, MAX_LOCAL_CPU_DEVICES)
        if not 1 <= n <= threads:
            raise MoiraiError(
                f"--cpu-devices {n}: {d.name} has {threads} cores; use 1 to {threads}"
            )
        prefix = d.name.rsplit("-", 1)[0] if len(cpus) == 1 else d.name
        out += [
            dataclasses.replace(
                d,
                name=f"{prefix}-{i}",
                threads=threads // n,
                peak_flops=d.peak_flops / n,
                memory_bandwidth_bytes_per_s=d.memory_bandwidth_bytes_per_s / n,
                memory_bytes=d.memory_bytes // n,
                device_id=i,
            )
            for i in range(n)
        ]
    return dataclasses.replace(devices, devices=tuple(out), default_link=SERVING_LOOPBACK)


def core_sets(plan: StagePlan) -> dict[str, list[int]]:
    """Disjoint cores for the plan's CPU devices, in plan order (empty when they do not fit)."""
    cores = available_cores()
    out: dict[str, list[int]] = {}
    start = 0
    for d in plan.devices:
        if d.kind == "cpu" and d.threads:
            if start + d.threads > len(cores):
                return {}
            out[d.name] = cores[start : start + d.threads]
            start += d.threads
    return out


@dataclass
class Planned:
    model: onnx.ModelProto
    costgraph: CostGraph
    placement: Placement
    plan: StagePlan


def plan_model(
    model_path: str | Path,
    devices: DeviceSet,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    solver: str = "auto",
    objective: Objective = "latency",
    time_limit: float = 10.0,
    seed: int = 0,
    profile: Profile | None = None,
    max_tasks: int | None = None,
    threads: int | None = None,
    check: Callable[[CostGraph], None] | None = None,
) -> Planned:
    """`profile` prices the tasks (default: the analytic model; see `moirai.profile.resolve`);
    `max_tasks` coarsens the fusion groups to at most that many tasks, which bounds how many
    stages the solver can cut the model into (every stage costs a hop on each side); `threads`
    bounds the solver's (default: every core); `check` sees the cost graph before the solver
    and raises to refuse it."""
    model_path = Path(model_path)
    shapes = {k: list(v) for k, v in (input_shapes or {}).items()}
    costgraph = build_costgraph(
        model_path, devices, shapes or None, profile=profile, max_tasks=max_tasks
    )
    if check is not None:
        check(costgraph)
    placement = solve(
        costgraph, solver, objective, time_limit=time_limit, threads=threads, seed=seed
    )
    model = load_model(model_path, shapes or None)
    source = costgraph.extra.get("source", {})
    specs = [
        DeviceSpec(
            d.name,
            d.kind,
            threads=d.threads if d.kind == "cpu" else None,
            device_id=d.device_id if d.kind == "gpu" else None,
        )
        for d in devices.devices
    ]
    overheads = call_overheads(profile, devices.devices)

    def as_served(chosen: Placement) -> tuple[StagePlan, Prediction]:
        plan = build_plan(
            model,
            chosen.assignment,
            specs,
            groups={t.id: t.ops for t in costgraph.tasks},
            start_ms={s.task: s.start_ms for s in chosen.schedule},
            model_name=model_path.stem,
            model_path=str(model_path),
            model_sha256=str(source.get("sha256", "")),
            input_shapes=shapes,
        )
        return plan, predict(costgraph, plan, overheads)

    plan, served = as_served(placement)
    if solver == "auto" and len(plan.stages) > 1:
        # The plan as served can lose what the solver's schedule gains: a stage runs once all
        # its inputs are in (so a stage holding a branch and the join waits for the other
        # branch), and each stage costs a session call the solvers do not price.
        try:
            alone = solve(costgraph, "single", objective, threads=threads, seed=seed)
        except InfeasibleError:  # no device holds the whole model
            alone = None
        if alone is not None:
            alone_plan, alone_served = as_served(alone)
            if _served_cost(alone_served, objective) < _served_cost(served, objective):
                placement, plan, served = alone, alone_plan, alone_served
    plan = dataclasses.replace(
        plan,
        predicted={
            "solver": placement.solver,
            "status": placement.status,
            "objective": placement.objective,
            "makespan_ms": placement.makespan_ms,
            "period_ms": placement.period_ms,
            "lower_bound_ms": placement.lower_bound_ms,
            **served.to_dict(),
        },
    )
    return Planned(model, costgraph, placement, plan)


def _served_cost(served: Prediction, objective: Objective) -> float:
    return served.period_ms if objective == "throughput" else served.latency_ms


def describe(plan: StagePlan) -> str:
    """A person's view of a plan: devices, stages with their border tensors, predictions."""
    p = plan.predicted
    lines = [
        f"model {plan.model_name}: {len(plan.stages)} stages on "
        + ", ".join(
            f"{d.name} ({d.kind}, {d.threads or 'all'} threads)"
            if d.kind == "cpu"
            else f"{d.name} (gpu {d.device_id or 0})"
            for d in plan.devices
            if d.name in plan.used_devices
        )
    ]
    if p:
        lines.append(
            f"solver {p.get('solver')} ({p.get('status')}), objective {p.get('objective')}: "
            f"makespan {p.get('makespan_ms', 0):.2f} ms, period {p.get('period_ms') or 0:.2f} ms "
            f"(lower bound {p.get('lower_bound_ms', 0):.2f} ms)"
        )
    if "served_ms" in p:
        served = Prediction.from_dict(p)
        lines.append(served.describe(period=p.get("objective") == "throughput"))
    for s in plan.stages:
        ins = ", ".join(s.inputs) or "-"
        outs = ", ".join(s.outputs)
        lines.append(f"  {s.id:>4} on {s.device:<8} {len(s.nodes):>4} nodes  {ins} -> {outs}")
    return "\n".join(lines)


def parse_input_shapes(values: Sequence[str]) -> dict[str, list[int]]:
    """`NAME=1x3x224x224` (or commas) flags as a mapping."""
    shapes: dict[str, list[int]] = {}
    for value in values:
        name, sep, dims = value.partition("=")
        if name in shapes:
            raise MoiraiError(
                f"--input-shape {name} is given twice ({name}={'x'.join(map(str, shapes[name]))} "
                f"and {value}): give each input once"
            )
        try:
            shapes[name] = [int(d) for d in dims.replace(",", "x").split("x")]
        except ValueError:
            sep = ""
        if not sep or not name:
            raise MoiraiError(f"--input-shape {value!r}: write NAME=DIMS, e.g. input=1x3x224x224")
    return shapes
