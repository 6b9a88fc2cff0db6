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
import json
import logging
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from moirai.costgraph import CostGraph
from moirai.devices import DeviceSet
from moirai.errors import InfeasibleError
from moirai.graph import OpGraph
from moirai.partition import build_plan
from moirai.placement import Objective, solve
from moirai.placement.result import Placement
from moirai.planning.costgraph import LoadedModel, build_costgraph, coarsening, load
from moirai.planning.lanes import merge_lanes, restrict
from moirai.planning.prediction import (
    LanePrediction,
    Prediction,
    balanced_weights,
    call_overheads,
    combine,
    front_end,
    predict_lane,
)
from moirai.planning.space import Layout, layouts
from moirai.profile import Profile
from moirai.stageplan import DeviceSpec, StagePlan
from moirai.wording import counted

log = logging.getLogger(__name__)


@dataclass
class Planned:
    model: onnx.ModelProto
    costgraph: CostGraph
    """The cost graph of the chosen devices (every lane's)."""
    placements: tuple[Placement, ...]
    """The solver's plan of each lane, on that lane's devices."""
    plan: StagePlan
    layout: Layout

    @property
    def placement(self) -> Placement:
        """The first lane's placement (the only one but for a throughput plan of lanes)."""
        return self.placements[0]

    def tasks_per_device(self) -> dict[str, int]:
        """How many of the cost graph's tasks each device runs, over every lane."""
        return dict(Counter(d for p in self.placements for d in p.assignment.values()))


@dataclass(frozen=True)
class _Context:
    """What turning a placement into a served plan needs, fixed for one device set."""

    model: LoadedModel
    costgraph: CostGraph
    specs: Sequence[DeviceSpec]
    call_ms: Mapping[str, float]

    def as_served(
        self, placement: Placement, fused: bool = True
    ) -> tuple[StagePlan, LanePrediction]:
        """The stage plan of `placement` and its prediction as served, the front end `fused`
        into its first stage's process (`moirai.planning.prediction.front_end`)."""
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
        entry = front_end(plan, fused)
        sizes = self.model.tensor_bytes
        return plan, predict_lane(self.costgraph, plan, self.call_ms, entry=entry, sizes=sizes)


@dataclass(frozen=True)
class DeclinedSplit:
    """A lane's split plan that `auto` predicted to serve better than the lane's best device
    alone, but by no more than `SPLIT_MARGIN`: the device alone serves instead."""

    devices: tuple[str, ...]
    split_ms: float
    alone_ms: float
    """The objective's figure as served (latency, or period for throughput) of each."""

    def to_dict(self) -> dict[str, Any]:
        return {"devices": list(self.devices), "split_ms": self.split_ms, "alone_ms": self.alone_ms}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DeclinedSplit:
        return cls(tuple(d["devices"]), d["split_ms"], d["alone_ms"])

    def describe(self) -> str:
        gain = 100 * (1 - self.split_ms / self.alone_ms)
        return (
            f"auto kept one device: a split over {', '.join(self.devices)} was predicted "
            f"{gain:.1f}% better ({self.split_ms:.2f} against {self.alone_ms:.2f} ms), under "
            f"the {100 * SPLIT_MARGIN:g}% margin a split must clear (--solver NAME serves it)"
        )


@dataclass(frozen=True)
class _Candidate:
    layout: Layout
    costgraph: CostGraph
    placements: tuple[Placement, ...]
    plan: StagePlan
    served: Prediction
    declined: tuple[DeclinedSplit, ...] = ()


def plan_model(
    model: str | Path | LoadedModel,
    devices: DeviceSet | Sequence[DeviceSet],
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
    fused_front_end: bool = True,
    stop: threading.Event | None = None,
) -> Planned:
    """The best plan of `model` on `devices` as served, with its prediction.

    `model` is a file (loaded with `input_shapes`) or a model already loaded
    (`moirai.planning.inputs.resolve`); `devices` one device set or several to choose from
    (`moirai.planning.space.cpu_groupings`); every layout of each (`moirai.planning.space`) is
    solved and served in prediction, and the one that serves best for `objective` wins.
    `profile` prices the tasks (default: the analytic model); `max_tasks` coarsens the fusion
    groups to at most that many tasks, which bounds how many stages the solver can cut the model
    into (every stage costs a hop on each side); `time_limit` is shared by the solves that
    search (lanes of one device need none); `threads` bounds the solver's (default: every
    core); `check` sees each cost graph before the solver and raises to refuse it;
    `fused_front_end` says whether the front end runs in the first stage's process, with
    every lane's first stage (as `moirai serve` runs a plan), or apart (the operator's
    gateway); `stop`, once set, ends the solves early with their best plans
    (`SolveOptions.stop`: the operator sets it when the PlacedModel being planned changed)."""
    loaded = model if isinstance(model, LoadedModel) else load(model, input_shapes)
    device_sets = [devices] if isinstance(devices, DeviceSet) else list(devices)
    contexts = []
    for i, device_set in enumerate(device_sets):
        costgraph = build_costgraph(loaded, device_set, profile=profile, max_tasks=max_tasks)
        if i == 0:  # the other sets: the same CPU grouped otherwise, the same groups
            log.info("%s", coarsening(costgraph))
        if check is not None:
            check(costgraph)
        specs = [
            DeviceSpec(
                d.name,
                d.kind,
                threads=d.threads if d.kind == "cpu" else None,
                device_id=d.device_id if d.kind == "gpu" else None,
            )
            for d in device_set.devices
        ]
        context = _Context(loaded, costgraph, specs, call_overheads(profile, device_set.devices))
        for layout in layouts([device_set], objective, _holds_the_model(costgraph)):
            contexts.append((context, layout))
    solves = _Solves(solver, objective, time_limit, threads, seed, fused_front_end, stop)
    for context, layout in contexts:
        for lane in layout.lanes:
            solves.expect(context.costgraph, lane)
    candidates = []
    for context, layout in contexts:
        try:
            candidates.append(_serve(context, layout, solves))
        except InfeasibleError:
            if len(contexts) == 1:
                raise
    if not candidates:
        raise InfeasibleError(
            "no layout of the devices can hold the model: "
            + "; ".join(layout.describe() for _, layout in contexts)
        )
    best = min(candidates, key=lambda c: served_cost(c.served, objective))
    lead = best.placements[0]
    predicted: dict[str, Any] = {
        "solver": lead.solver,
        "status": lead.status,
        "objective": lead.objective,
        "makespan_ms": lead.makespan_ms,
        "period_ms": lead.period_ms,
        "lower_bound_ms": lead.lower_bound_ms,
        **best.served.to_dict(),
        "layout": best.layout.describe(),
    }
    if len(best.placements) > 1:
        predicted["lanes"] = [
            {
                "devices": list(lane),
                "solver": p.solver,
                "makespan_ms": p.makespan_ms,
                "period_ms": p.period_ms,
            }
            for lane, p in zip(best.layout.lanes, best.placements, strict=True)
        ]
    if best.declined:
        predicted["declined_splits"] = [d.to_dict() for d in best.declined]
    if len(candidates) > 1:
        predicted["candidates"] = [
            {"layout": c.layout.describe(), "served_ms": served_cost(c.served, objective)}
            for c in candidates
        ]
    plan = dataclasses.replace(best.plan, predicted=predicted)
    plan = with_prepacking(plan, loaded.graph, best.costgraph)
    return Planned(loaded.proto, best.costgraph, best.placements, plan, best.layout)


def with_prepacking(plan: StagePlan, graph: OpGraph, costgraph: CostGraph) -> StagePlan:
    """`plan` with pre-packing (`moirai.weights`) on for each device whose memory for tasks
    holds its stages' weights twice beside their activations, and off for the others: there a
    stage server stays within the memory its tasks were planned at."""
    memory = {d.name: d.memory_bytes for d in costgraph.devices}

    def room(device: DeviceSpec) -> bool:
        ops = [n for stage in plan.stages_on(device.name) for n in stage.nodes]
        need = 2 * graph.weight_bytes(ops) + graph.activation_bytes(ops)
        return device.name not in memory or need <= memory[device.name]

    devices = tuple(dataclasses.replace(d, prepack=room(d)) for d in plan.devices)
    return dataclasses.replace(plan, devices=devices)


def _holds_the_model(costgraph: CostGraph) -> set[str]:
    """Devices that can run every task and hold all of them."""
    need = sum(t.memory_bytes for t in costgraph.tasks)
    return {
        d.name
        for d in costgraph.devices
        if d.memory_bytes >= need and all(d.name in t.compute_ms for t in costgraph.tasks)
    }


class _Solves:
    """The solver runs of one `plan_model` call: each distinct lane problem once (lanes on
    alike devices are one problem, their devices renamed), the time limit shared among those
    that search."""

    def __init__(
        self,
        solver: str,
        objective: Objective,
        time_limit: float,
        threads: int | None,
        seed: int,
        fused: bool,
        stop: threading.Event | None = None,
    ) -> None:
        self.solver, self.objective, self.time_limit = solver, objective, time_limit
        self.threads, self.seed, self.fused, self.stop = threads, seed, fused, stop
        self.searching: set[str] = set()
        self.done: dict[tuple[str, str], Placement] = {}

    @staticmethod
    def canonical(costgraph: CostGraph, lane: Sequence[str]) -> tuple[CostGraph, str]:
        """The lane's problem on devices named d0, d1, ..., and a key that says which."""
        problem = restrict(costgraph, lane, {d: f"d{i}" for i, d in enumerate(lane)})
        return problem, json.dumps(problem.to_dict(), sort_keys=True)

    def expect(self, costgraph: CostGraph, lane: Sequence[str]) -> None:
        if len(lane) > 1:
            self.searching.add(self.canonical(costgraph, lane)[1])

    def solve(self, costgraph: CostGraph, lane: Sequence[str], solver: str = "") -> Placement:
        """The placement of one lane, on the lane's own device names."""
        problem, key = self.canonical(costgraph, lane)
        solver = solver or (self.solver if len(lane) > 1 else "single")
        if (solver, key) not in self.done:
            limit = self.time_limit / max(1, len(self.searching))
            try:
                self.done[(solver, key)] = self._solve(problem, solver, limit)
            except InfeasibleError:
                # Said again on the lane's own device names, which the user knows.
                self._solve(restrict(costgraph, lane), solver, limit)
                raise
        return _renamed(self.done[(solver, key)], {f"d{i}": d for i, d in enumerate(lane)})

    def _solve(self, problem: CostGraph, solver: str, time_limit: float) -> Placement:
        return solve(
            problem,
            solver,
            self.objective,
            time_limit=time_limit,
            threads=self.threads,
            seed=self.seed,
            stop=self.stop,
        )


def _renamed(placement: Placement, names: Mapping[str, str]) -> Placement:
    plan = Placement.from_dict(placement.to_dict())
    plan.assignment = {t: names[d] for t, d in plan.assignment.items()}
    plan.schedule = [dataclasses.replace(s, device=names[s.device]) for s in plan.schedule]
    plan.transfers = [
        dataclasses.replace(x, from_device=names[x.from_device], to_device=names[x.to_device])
        for x in plan.transfers
    ]
    plan.costgraph = placement.costgraph
    return plan


def _serve(context: _Context, layout: Layout, solves: _Solves) -> _Candidate:
    """Solve each lane of `layout`, and serve them together in prediction."""
    placements, plans, served, declined = [], [], [], []
    for lane in layout.lanes:
        placement = solves.solve(context.costgraph, lane)
        plan, prediction = context.as_served(placement, solves.fused)
        if solves.solver == "auto" and len(plan.stages) > 1:
            (placement, plan, prediction), decline = compare_single_device(
                context, solves, lane, (placement, plan, prediction)
            )
            declined += [decline] if decline else []
        placements.append(placement)
        plans.append(plan)
        served.append(prediction)
    weights = balanced_weights(served) if len(served) > 1 else [1.0]
    prediction = combine(served, weights) if len(served) > 1 else served[0].prediction
    return _Candidate(
        layout,
        context.costgraph,
        tuple(placements),
        merge_lanes(plans, weights),
        prediction,
        tuple(declined),
    )


SPLIT_MARGIN = 0.05
"""How much better than its best device alone a lane's split plan must be predicted to serve for
`auto` to take it. Split plans pay costs the prediction does not see (tensors crossing between
cores' caches, a hop's spread on a busy machine): on this project's 2-core validation machine
they were served 2-10% above their prediction, one-device plans within 2%
(`bench/results/validation.md`). A split that gains less than that is as likely to lose, and it
has more processes to fail."""


def compare_single_device(
    context: _Context,
    solves: _Solves,
    lane: Sequence[str],
    split: tuple[Placement, StagePlan, LanePrediction],
) -> tuple[tuple[Placement, StagePlan, LanePrediction], DeclinedSplit | None]:
    """`auto`'s last step for a lane: its best device alone unless the split plan is predicted
    to serve better by more than `SPLIT_MARGIN`, and the split it declined for the margin
    alone. A stage costs a session call the solvers do not price, and a split that the solver
    overlaps can still lose to hops the schedule hid."""
    try:
        alone = solves.solve(context.costgraph, lane, "single")
    except InfeasibleError:  # no device of the lane holds the whole model
        return split, None
    alone_plan, alone_served = context.as_served(alone, solves.fused)
    split_ms = served_cost(split[2].prediction, solves.objective)
    alone_ms = served_cost(alone_served.prediction, solves.objective)
    if split_ms < (1 - SPLIT_MARGIN) * alone_ms:
        return split, None
    decline = DeclinedSplit(tuple(split[1].used_devices), split_ms, alone_ms)
    return (alone, alone_plan, alone_served), decline if split_ms < alone_ms else None


def served_cost(served: Prediction, objective: Objective) -> float:
    """What the objective minimises, as served."""
    return served.period_ms if objective == "throughput" else served.latency_ms


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def describe(plan: StagePlan) -> str:
    """A person's view of a plan: devices, lanes, stages with their border tensors,
    predictions, and the layouts it was chosen from."""
    p = plan.predicted
    lanes = len(plan.lanes)
    lines = [
        f"model {plan.model_name}: {_count(len(plan.stages), 'stage')} on "
        + ", ".join(
            f"{d.name} ({d.kind}, {_count(d.threads, 'thread') if d.threads else 'all threads'})"
            if d.kind == "cpu"
            else f"{d.name} (gpu {d.device_id or 0})"
            for d in plan.devices
            if d.name in plan.used_devices
        )
        + (f", in {lanes} lanes" if lanes > 1 else "")
    ]
    if "layout" in p:
        lines.append(f"layout: {p['layout']}")
    if p:
        lines.append(
            f"solver {p.get('solver')} ({p.get('status')}), objective {p.get('objective')}: "
            f"makespan {p.get('makespan_ms', 0):.2f} ms, period {p.get('period_ms') or 0:.2f} ms "
            f"(lower bound {p.get('lower_bound_ms', 0):.2f} ms)"
            + (" (lane 0)" if lanes > 1 else "")
        )
    if "served_ms" in p:
        served = Prediction.from_dict(p)
        lines.append(served.describe(period=p.get("objective") == "throughput"))
    for declined in p.get("declined_splits", []):
        lines.append(DeclinedSplit.from_dict(declined).describe())
    if p.get("candidates"):
        lines.append(
            "chosen from: "
            + "; ".join(f"{c['layout']} {c['served_ms']:.2f} ms" for c in p["candidates"])
            + (" (period as served)" if p.get("objective") == "throughput" else " (latency)")
        )
    for k, lane in enumerate(plan.lanes):
        if lanes > 1:
            lines.append(f"  lane {k} (weight {lane.weight:.2f}):")
        for s in plan.stages_of_lane(k):
            ins = ", ".join(s.inputs) or "-"
            outs = ", ".join(s.outputs)
            nodes = counted(len(s.nodes), "node")
            lines.append(f"  {s.id:>4} on {s.device:<8} {nodes:>10}  {ins} -> {outs}")
    return "\n".join(lines)
