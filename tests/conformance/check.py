"""What one conformance case checks: Moirai plans the model, cuts it, and the chained stages
compute what ONNX Runtime computes on the whole model.

`conform(case, folder)` goes the way `moirai place` and `moirai serve` go: the model is saved to
a file and loaded by `moirai.planning.load` (canonical names, static shapes at the test inputs'
shapes), its cost graph built on `DEVICES` with the analytic profile (fusion groups included),
and a solver places it (`plan_model`). Then several placements that force cuts are turned into
stage plans (`moirai.partition.build_plan`, with the file's dynamic shapes as serving plans):

- every node alone, on alternating devices (every data edge a cut);
- the fusion groups on random devices, and nodes on random devices at random start times
  (fixed seeds);
- the solver's own plan.

Each plan must be well formed (stages in a topological order of an acyclic stage DAG, every
input produced before it is read, every tensor routed, the JSON round trip exact), and its
stages, cut from the serving view of the model (`load_model(symbolic=True)`, as a stage server
cuts them) and run one after the other (`moirai.runtime.sequential`, the reference semantics of a
plan), must reproduce ONNX Runtime's outputs.

Moirai may refuse a model, but only with a one-line `MoiraiError`, and only for what serving
does not support (`LIMITS`): anything else, a traceback included, fails the case.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from moirai.costgraph import CostGraph
from moirai.devices import DeviceSet, DeviceSpec
from moirai.errors import MoiraiError
from moirai.graph import load_model
from moirai.partition import build_plan
from moirai.planning import build_costgraph, load, plan_model
from moirai.planning.cpu import SERVING_LOOPBACK
from moirai.runtime.sequential import run_sequential
from moirai.stageplan import GATEWAY, StagePlan
from moirai.stageplan import DeviceSpec as PlanDevice

from .cases import Case, assert_same

DEVICES = DeviceSet(
    tuple(
        DeviceSpec(f"cpu-{i}", "cpu", "CPUExecutionProvider", 20e9, 10e9, 8 * 2**30, threads=1)
        for i in range(3)
    ),
    default_link=SERVING_LOOPBACK,
)
PLAN_DEVICES = [PlanDevice(d.name, "cpu", threads=1) for d in DEVICES.devices]
RTOL, ATOL = 1e-3, 1e-5
"""ONNX's backend tests compare at rtol 1e-3, atol 1e-7; atol is 1e-5 here because a stage
runs its own fusions, which differ from the whole model's (a fused kernel sums in another
order), so values near zero may differ by a few float32 ulps of their neighbours."""

LIMITS = (
    "serving supports",  # a border tensor of a type the wire cannot carry (sequences, strings)
    "cannot cross a stage border",  # a tensor of unknown rank on a cut
)
"""Refusals that are Moirai's documented limits, not bugs (matched in the message)."""


@dataclass
class Outcome:
    plans: list[str] = field(default_factory=list)
    """The placements that were checked, with their number of stages."""
    refused: list[str] = field(default_factory=list)
    """The placements Moirai refused, with its one-line reason."""


def refusal(e: MoiraiError) -> str:
    text = str(e)
    assert "\n" not in text.strip(), f"a MoiraiError of several lines: {text!r}"
    assert any(limit in text for limit in LIMITS), f"refused: {type(e).__name__}: {text}"
    return text


def conform(case: Case, folder: Path) -> Outcome:
    outcome = Outcome()
    path = folder / "model.onnx"
    onnx.save(case.model, path)
    try:
        loaded = load(path, _input_shapes(case))
        costgraph = build_costgraph(loaded, DEVICES)
    except MoiraiError as e:
        outcome.refused.append(f"load: {refusal(e)}")
        return outcome
    serving = load_model(path, symbolic=True)
    model = loaded.proto
    names = [n.name for n in model.graph.node]
    rng = random.Random(case.name)
    placements: list[tuple[str, dict[str, Any]]] = []
    if not case.large:
        placements.append(
            ("alternating", {"node_device": {n: f"cpu-{i % 2}" for i, n in enumerate(names)}})
        )
    groups = {t.id: t.ops for t in costgraph.tasks}
    for k in range(1 if case.large else 2):
        placements.append(
            (
                f"groups-{k}",
                {
                    "node_device": {t: rng.choice(PLAN_DEVICES).name for t in groups},
                    "groups": groups,
                },
            )
        )
    if not case.large:
        placements.append(
            (
                "nodes-random",
                {
                    "node_device": {n: rng.choice(PLAN_DEVICES).name for n in names},
                    "start_ms": {n: rng.uniform(0, 10) for n in names},
                },
            )
        )
    for what, kwargs in placements:
        try:
            plan = build_plan(model, devices=PLAN_DEVICES, dynamic=loaded.dynamic, **kwargs)
        except MoiraiError as e:
            outcome.refused.append(f"{what}: {refusal(e)}")
            continue
        check_plan(case, serving, plan, what)
        outcome.plans.append(f"{what}: {len(plan.stages)} stages")
    try:
        planned = plan_model(loaded, DEVICES, solver="heft", time_limit=1, threads=1)
    except MoiraiError as e:
        outcome.refused.append(f"solver: {refusal(e)}")
    else:
        check_plan(case, serving, planned.plan, "solver")
        outcome.plans.append(f"solver: {len(planned.plan.stages)} stages")
    _check_costgraph(costgraph, names)
    return outcome


def _input_shapes(case: Case) -> dict[str, list[int]]:
    """The test inputs' shapes where the file leaves a dimension open (the shapes the model is
    priced at; an empty dimension is priced at 1, as a user must give it, and served at 0)."""
    shapes = {}
    for value in case.model.graph.input:
        t = value.type
        if t.WhichOneof("value") != "tensor_type" or value.name not in case.inputs:
            continue
        dims = t.tensor_type.shape.dim
        if not t.tensor_type.HasField("shape") or any(not d.HasField("dim_value") for d in dims):
            shape = [max(1, d) for d in getattr(case.inputs[value.name], "shape", ())]
            if shape:
                shapes[value.name] = shape
    return shapes


def _check_costgraph(costgraph: CostGraph, names: list[str]) -> None:
    ops = [op for t in costgraph.tasks for op in t.ops]
    assert len(ops) == len(set(ops)), "a node sits in two fusion groups"
    assert set(ops) <= set(names)


def check_plan(case: Case, serving: onnx.ModelProto, plan: StagePlan, what: str) -> None:
    where = f"{case.name} ({what})"
    check_structure(plan, where, serving)
    assert StagePlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan, where
    got = run_sequential(serving, plan, case.inputs)
    assert case.want is not None
    assert set(got) == set(case.want), f"{where}: outputs {sorted(got)}, not {sorted(case.want)}"
    for name, value in case.want.items():
        assert_same(got[name], value, f"{where}: {name}", RTOL, ATOL)


def check_structure(plan: StagePlan, where: str, model: onnx.ModelProto | None = None) -> None:
    """Stages in topological order (so the stage DAG is acyclic), none empty, every input
    produced before it is read, every tensor produced once and routed where it is read (and
    somewhere), the outputs routed out; and, given the `model`, no node but a Constant in two
    stages. The one check of a plan's structure: `tests/serving/test_partition.py` uses it too."""
    available = {t.name for t in plan.inputs}
    produced: dict[str, str] = {}
    for stage in plan.stages:
        assert stage.inputs or stage.nodes, f"{where}: {stage.id} is empty"
        for t in stage.inputs:
            assert t in available, f"{where}: {stage.id} reads {t!r} before it is produced"
            assert stage.id in plan.routing.get(t, ()), f"{where}: {t!r} not routed to {stage.id}"
        for t in stage.outputs:
            assert t not in produced, f"{where}: {t!r} produced by {produced[t]} and {stage.id}"
            produced[t] = stage.id
            available.add(t)
            assert plan.routing.get(t), f"{where}: {t!r} of {stage.id} goes nowhere"
    for o in plan.outputs:
        assert o.name in available, f"{where}: output {o.name!r} never produced"
        assert GATEWAY in plan.routing.get(o.name, ()), f"{where}: {o.name!r} not routed out"
    if model is not None:
        constants = {n.name for n in model.graph.node if n.op_type == "Constant"}
        placed = [n for s in plan.stages for n in s.nodes if n not in constants]
        assert len(placed) == len(set(placed)), f"{where}: a node sits in two stages"
