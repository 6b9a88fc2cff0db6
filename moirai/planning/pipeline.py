"""From a model to a stage plan: the pipeline as `moirai serve`, `moirai demo`, `moirai place`'s
callers and the operator run it.

    model (loaded once) → cost graph → solver → stage plan → served prediction
                                                    └─ with `auto`: the single-device comparison

The plan's groups are the cost graph's tasks (`Task.ops` are canonical node names) in the order
of the solver's schedule, so stages follow the schedule the solver predicted.

The plan's `predicted` keeps the solver's figures on the cost graph (`makespan_ms`, `period_ms`,
`lower_bound_ms`) and adds the plan's as served (`moirai.planning.prediction`): `latency_ms`
(what `moirai serve`, `moirai demo`, the operator and the validation benchmark report) with its
parts `served_ms` and `client_ms`, and `served_period_ms`.

The operator plans through `plan_model` too: it describes its node pools as a `DeviceSet`,
passes a `check` that refuses a model its pools cannot hold before the solver runs, and bounds
the solver's `threads`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx

from moirai.costgraph import CostGraph
from moirai.devices import DeviceSet
from moirai.errors import InfeasibleError
from moirai.partition import build_plan
from moirai.placement import Objective, solve
from moirai.placement.result import Placement
from moirai.planning.costgraph import LoadedModel, build_costgraph, load
from moirai.planning.prediction import Prediction, call_overheads, predict
from moirai.profile import Profile
from moirai.stageplan import DeviceSpec, StagePlan


@dataclass
class Planned:
    model: onnx.ModelProto
    costgraph: CostGraph
    placement: Placement
    plan: StagePlan


@dataclass(frozen=True)
class _Context:
    """What turning a placement into a served plan needs, fixed for one `plan_model` call."""

    model: LoadedModel
    costgraph: CostGraph
    specs: Sequence[DeviceSpec]
    call_ms: Mapping[str, float]

    def as_served(self, placement: Placement) -> tuple[StagePlan, Prediction]:
        """The stage plan of `placement` and its prediction as served."""
        plan = build_plan(
            self.model.proto,
            placement.assignment,
            self.specs,
            groups={t.id: t.ops for t in self.costgraph.tasks},
            start_ms={s.task: s.start_ms for s in placement.schedule},
            model_name=self.model.name,
            model_path=str(self.model.path),
            model_sha256=self.model.sha256,
            input_shapes=self.model.priced_shapes,
            dynamic=self.model.dynamic,
        )
        return plan, predict(self.costgraph, plan, self.call_ms)


def plan_model(
    model: str | Path | LoadedModel,
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
    """`model` is a file (loaded with `input_shapes`) or a model already loaded
    (`moirai.planning.inputs.resolve`); `profile` prices the tasks (default: the analytic
    model); `max_tasks` coarsens the fusion groups to at most that many tasks, which bounds how
    many stages the solver can cut the model into (every stage costs a hop on each side);
    `threads` bounds the solver's (default: every core); `check` sees the cost graph before the
    solver and raises to refuse it."""
    loaded = model if isinstance(model, LoadedModel) else load(model, input_shapes)
    costgraph = build_costgraph(loaded, devices, profile=profile, max_tasks=max_tasks)
    if check is not None:
        check(costgraph)
    placement = solve(
        costgraph, solver, objective, time_limit=time_limit, threads=threads, seed=seed
    )
    specs = [
        DeviceSpec(
            d.name,
            d.kind,
            threads=d.threads if d.kind == "cpu" else None,
            device_id=d.device_id if d.kind == "gpu" else None,
        )
        for d in devices.devices
    ]
    context = _Context(loaded, costgraph, specs, call_overheads(profile, devices.devices))
    plan, served = context.as_served(placement)
    if solver == "auto" and len(plan.stages) > 1:
        placement, plan, served = compare_single_device(
            context, objective, (placement, plan, served), threads=threads, seed=seed
        )
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
    return Planned(loaded.proto, costgraph, placement, plan)


def compare_single_device(
    context: _Context,
    objective: Objective,
    split: tuple[Placement, StagePlan, Prediction],
    *,
    threads: int | None,
    seed: int,
) -> tuple[Placement, StagePlan, Prediction]:
    """`auto`'s last step: the best device alone when it serves better than the split plan.

    The plan as served can lose what the solver's schedule gains: a stage runs once all its
    inputs are in (so a stage holding a branch and the join waits for the other branch), and
    each stage costs a session call the solvers do not price."""
    try:
        alone = solve(context.costgraph, "single", objective, threads=threads, seed=seed)
    except InfeasibleError:  # no device holds the whole model
        return split
    alone_plan, alone_served = context.as_served(alone)
    if served_cost(alone_served, objective) < served_cost(split[2], objective):
        return alone, alone_plan, alone_served
    return split


def served_cost(served: Prediction, objective: Objective) -> float:
    """What the objective minimises, as served."""
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
