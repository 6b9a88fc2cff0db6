"""The stage plan: a placement turned into chained ONNX sub-models (`moirai.stageplan/v1`).

A placement says on which device each fused group runs; serving needs more: which nodes run
together in one ONNX Runtime session (a *stage*), which tensors cross between stages, and where
each crossing tensor goes. `build_plan` derives that; `moirai.stagecut.extract_stage` then cuts
one stage's sub-model out of the model, so every stage server builds its own sessions from the
model and the plan alone (no artefact store).

How stages are formed: as the schedule runs them. A stage server runs a stage once all its
inputs are in and sends its outputs once all its groups are done, so a stage must not hold a
group that waits for something its first group did not, nor a group whose output another device
wants before the stage would end. Groups are visited in a topological order of the model's data
flow that follows the schedule (earliest start first, model order on ties). Each group joins the
open stage of its device, except that it opens a new stage there when

- it reads a tensor from a stage on another device that the open stage does not already wait
  for (the schedule has the group wait for that input, the open stage has not: joining would
  hold the whole stage back until the input arrives);
- joining would close a cycle in the stage DAG (a stage it depends on depends on the open
  stage).

And a stage closes when a group on another device reads from it: the groups of its device that
the schedule starts later form a new stage, so the reader gets its input when the schedule says,
not when the device's later groups are done. Stages are otherwise maximal runs of groups on one
device in schedule order; a device holds several stages when the plan returns to it or waits on
the way, and the stage DAG is acyclic, which is what lets the stages run in order in one process
and reproduce the whole model. The served plan then overlaps what the schedule overlaps
(`moirai.planning.prediction` predicts it), at the price of one session call per stage.
Dependencies come from the ONNX graph itself (including tensors that subgraphs of
If/Loop/Scan read from the outer scope), not from the cost graph's edges, so a plan is correct
even where the cost graph dropped an edge. `Constant` nodes feeding other nodes are copied into
every stage that reads them instead of being shipped between stages. Nodes no group names (a cost
graph may skip some) follow the device of their first consumer.

The plan's format (`moirai.stageplan/v1`) and its dataclasses live in `moirai.stageplan`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import onnx

from moirai.dag import topological_order
from moirai.errors import ModelError, MoiraiError
from moirai.nodeinputs import node_inputs
from moirai.stageplan import (
    GATEWAY,
    ONNX_DATATYPES,
    DeviceSpec,
    Stage,
    StagePlan,
    TensorSpec,
    border_problem,
)


# ------------------------------------------------------------------ graph helpers
def _is_shared_constant(node: onnx.NodeProto, model_outputs: set[str]) -> bool:
    return (
        node.op_type == "Constant"
        and node.domain in ("", "ai.onnx")
        and not any(o in model_outputs for o in node.output)
    )


def _value_types(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    g = model.graph
    return {v.name: v for v in (*g.value_info, *g.input, *g.output)}


def typed_values(model: onnx.ModelProto, names: Iterable[str]) -> dict[str, onnx.ValueInfoProto]:
    """ValueInfo of each tensor, running ONNX shape inference when the model lacks some."""
    names = list(names)
    types = _value_types(model)
    if any(n not in types for n in names):
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception as e:  # onnx raises several unrelated types here
            raise ModelError(f"ONNX shape inference failed: {e}") from None
        types.update(_value_types(inferred))
    missing = [n for n in names if n not in types]
    if missing:
        raise ModelError(_untyped(model, missing[0]))
    return {n: types[n] for n in names}


def _untyped(model: onnx.ModelProto, name: str) -> str:
    """Why tensor `name` has no type, and what to do: static input shapes where an input has
    an open dimension; otherwise neither ONNX nor ONNX Runtime typed it at the shapes given
    (`moirai.graph` warns why ONNX Runtime could not), and no input shape would help."""
    producer = next((n for n in model.graph.node if name in n.output), None)
    made = f" ({producer.op_type} node {producer.name!r})" if producer is not None else ""
    weights = {i.name for i in model.graph.initializer}
    open_inputs = [
        i.name
        for i in model.graph.input
        if i.name not in weights
        and i.type.HasField("tensor_type")
        and not all(d.HasField("dim_value") for d in i.type.tensor_type.shape.dim)
    ]
    if open_inputs:
        return (
            f"tensor {name!r}{made} has no inferable type; give static input shapes "
            f"(--input-shape {open_inputs[0]}=...) so that shape inference can type it"
        )
    return (
        f"tensor {name!r}{made} has no type: neither ONNX's shape inference nor ONNX Runtime "
        "could type it at the input shapes given (a warning above may say why), so no stage "
        "border can carry it"
    )


def _spec(
    value: onnx.ValueInfoProto, dynamic: Mapping[str, Sequence[int]] | None = None
) -> TensorSpec:
    """The tensor's plan type; with `dynamic` (`moirai.graph.dynamic_shapes`), a dimension that
    varies there is -1, and so is every dimension of a tensor it could not shape."""
    problem = border_problem(value.type)
    if problem is not None:
        raise ModelError(f"tensor {value.name!r} {problem}")
    t = value.type.tensor_type
    datatype = ONNX_DATATYPES[t.elem_type]
    shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
    if dynamic:
        varies = dynamic.get(value.name)
        if varies is None or len(varies) != len(shape):
            shape = (-1,) * len(shape)
        else:
            shape = tuple(-1 if v == -1 else d for d, v in zip(shape, varies, strict=True))
    return TensorSpec(value.name, datatype, shape)


# -------------------------------------------------------------------- planning
def build_plan(
    model: onnx.ModelProto,
    node_device: Mapping[str, str],
    devices: Sequence[DeviceSpec],
    *,
    groups: Mapping[str, Sequence[str]] | None = None,
    start_ms: Mapping[str, float] | None = None,
    model_name: str | None = None,
    model_path: str = "",
    model_sha256: str = "",
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    predicted: Mapping[str, Any] | None = None,
    dynamic: Mapping[str, Sequence[int]] | None = None,
) -> StagePlan:
    """The stage plan of `model` under an assignment.

    `node_device` assigns ONNX node names (or group ids, with `groups` mapping each group id to
    its node names) to device names; `start_ms` gives each group's (or node's) scheduled start,
    which orders the groups (model order where absent). Nodes that no entry covers follow their
    first consumer's device. `input_shapes` are the shapes the model was priced at; `dynamic`
    (`moirai.graph.dynamic_shapes` of the model's file) marks the dimensions that vary as -1 in
    the plan's types, where `model` itself was shaped statically.
    """
    graph = model.graph
    nodes = list(graph.node)
    names = [n.name for n in nodes]
    if any(not n for n in names) or len(set(names)) != len(names):
        raise ModelError(
            "node names must be unique and non-empty: load the model with "
            "moirai.graph.load_model, which gives canonical names"
        )
    index = {n: i for i, n in enumerate(names)}
    by_name = {n.name: n for n in nodes}
    device_names = [d.name for d in devices]
    initializers = {i.name for i in graph.initializer} | {
        s.values.name for s in graph.sparse_initializer
    }
    model_inputs = [i.name for i in graph.input if i.name not in initializers]
    model_outputs = [o.name for o in graph.output]
    output_set = set(model_outputs)
    for o in model_outputs:
        if o in initializers:
            raise ModelError(f"model output {o!r} is an initializer; serving cannot route it")

    producer: dict[str, str] = {}  # tensor -> node
    for n in nodes:
        for o in n.output:
            if o:
                producer[o] = n.name
    live = _live_nodes(nodes, index, producer, model_outputs)

    # Units: the groups (or single nodes) that stages are made of; dead nodes are left out.
    shared = {n.name for n in nodes if n.name in live and _is_shared_constant(n, output_set)}
    groups = dict(groups) if groups is not None else {n: [n] for n in node_device}
    unit_of: dict[str, str] = {}
    for unit, ops in groups.items():
        for op in ops:
            if op not in index:
                raise ModelError(f"group {unit!r} names node {op!r}, which the model lacks")
            if op in live and op not in shared:
                unit_of[op] = unit
    groups = {u: ops for u, ops in groups.items() if any(op in unit_of for op in ops)}
    unit_device: dict[str, str] = {}
    for unit in groups:
        if unit not in node_device:
            raise MoiraiError(f"the placement assigns no device to {unit!r}")
        if node_device[unit] not in device_names:
            raise MoiraiError(f"{unit!r} is placed on unknown device {node_device[unit]!r}")
        unit_device[unit] = node_device[unit]

    nodes = [n for n in nodes if n.name in live]
    consumers: dict[str, list[str]] = {}  # tensor -> nodes
    for n in nodes:
        for t in node_inputs(n):
            consumers.setdefault(t, []).append(n.name)

    # Uncovered nodes follow their first consumer's device (else their producer's, else the
    # first device), visited in reverse model order so chains of uncovered nodes resolve.
    uncovered = [n for n in nodes if n.name not in unit_of and n.name not in shared]
    fallback: dict[str, str] = {}
    for n in reversed(uncovered):
        later = sorted(
            (index[c] for o in n.output for c in consumers.get(o, []) if c not in shared),
        )
        dev = None
        for c in later:
            dev = unit_device.get(unit_of.get(names[c], ""), fallback.get(names[c]))
            if dev:
                break
        fallback[n.name] = dev or ""
    for n in uncovered:
        if not fallback[n.name]:
            preds = [producer[t] for t in node_inputs(n) if t in producer]
            devs = [unit_device.get(unit_of.get(p, ""), fallback.get(p, "")) for p in preds]
            fallback[n.name] = next((d for d in devs if d), device_names[0])
        unit_of[n.name] = n.name
        unit_device[n.name] = fallback[n.name]
    members: dict[str, list[str]] = {}
    for n in nodes:
        if n.name in unit_of:
            members.setdefault(unit_of[n.name], []).append(n.name)

    # Unit dependencies from the data flow.
    unit_preds: dict[str, set[str]] = {u: set() for u in members}
    for u, ops in members.items():
        for op in ops:
            for t in node_inputs(by_name[op]):
                p = producer.get(t)
                if p is not None and p not in shared and unit_of[p] != u:
                    unit_preds[u].add(unit_of[p])
    order = _schedule_order(members, unit_preds, index, start_ms or {})

    # Greedy stage formation (see the module docstring).
    stage_units: list[list[str]] = []
    stage_device: list[str] = []
    reach: list[set[int]] = []  # stages each stage depends on, transitively
    stage_of: dict[str, int] = {}
    open_stage: dict[str, int] = {}
    for u in order:
        dev = unit_device[u]
        preds = {stage_of[p] for p in unit_preds[u]}
        for p in preds:  # a reader on another device: its producer stage ends here
            if stage_device[p] != dev and open_stage.get(stage_device[p]) == p:
                del open_stage[stage_device[p]]
        s = open_stage.get(dev)
        if (
            s is None
            or any(s in reach[p] for p in preds if p != s)
            or any(stage_device[p] != dev and p not in reach[s] for p in preds if p != s)
        ):
            s = len(stage_units)
            stage_units.append([])
            stage_device.append(dev)
            reach.append(set())
            open_stage[dev] = s
        stage_units[s].append(u)
        stage_of[u] = s
        added = set().union(*(reach[p] | {p} for p in preds if p != s)) if preds else set()
        if not added <= reach[s]:
            reach[s] |= added
            for r in reach:
                if s in r:
                    r |= reach[s]

    # Stage DAG in topological order (a stage may have absorbed groups after later stages).
    topo = _topological_stages(reach)
    stage_id = {s: f"s{k}" for k, s in enumerate(topo)}
    node_stage = {op: stage_id[stage_of[u]] for u, ops in members.items() for op in ops}

    stages: list[Stage] = []
    routing: dict[str, set[str]] = {}
    for s in topo:
        sid = stage_id[s]
        own = sorted((op for u in stage_units[s] for op in members[u]), key=index.__getitem__)
        produced = {o for op in own for o in by_name[op].output if o}
        reads: list[str] = []
        consts: set[str] = set()
        for op in own:
            for t in node_inputs(by_name[op]):
                if t in produced or t in initializers:
                    continue
                if producer.get(t) in shared:
                    consts.add(producer[t])
                elif t not in reads:
                    reads.append(t)
        for t in reads:
            routing.setdefault(t, set()).add(sid)
        outputs = [
            o
            for op in own
            for o in by_name[op].output
            if o
            and (
                o in output_set
                or any(c not in shared and node_stage.get(c) != sid for c in consumers.get(o, []))
            )
        ]
        stages.append(
            Stage(
                id=sid,
                device=stage_device[s],
                nodes=tuple(sorted([*consts, *own], key=index.__getitem__)),
                inputs=tuple(reads),
                outputs=tuple(outputs),
            )
        )
    for o in model_outputs:
        routing.setdefault(o, set()).add(GATEWAY)
    for t in routing:
        if t not in producer and t not in model_inputs:
            raise ModelError(f"tensor {t!r} is read but neither produced nor a model input")

    types = typed_values(model, [*model_inputs, *model_outputs, *routing])
    border = {t for s in stages for t in (*s.inputs, *s.outputs)}
    return StagePlan(
        model_name=model_name or graph.name or "model",
        model_path=model_path,
        model_sha256=model_sha256,
        input_shapes={k: tuple(v) for k, v in (input_shapes or {}).items()},
        devices=tuple(devices),
        inputs=tuple(_spec(types[i], dynamic) for i in model_inputs),
        outputs=tuple(_spec(types[o], dynamic) for o in model_outputs),
        tensors={
            t: _spec(types[t], dynamic)
            for t in sorted(border, key=lambda t: index.get(producer.get(t, ""), -1))
            if t not in model_inputs and t not in output_set
        },
        stages=tuple(stages),
        routing={t: tuple(sorted(c)) for t, c in routing.items()},
        predicted=dict(predicted or {}),
    )


def _live_nodes(
    nodes: Sequence[onnx.NodeProto],
    index: Mapping[str, int],
    producer: Mapping[str, str],
    outputs: Iterable[str],
) -> set[str]:
    """Nodes that some model output depends on; the rest is dead code that no stage runs."""
    live: set[str] = set()
    stack = [producer[o] for o in outputs if o in producer]
    while stack:
        name = stack.pop()
        if name in live:
            continue
        live.add(name)
        stack.extend(producer[t] for t in node_inputs(nodes[index[name]]) if t in producer)
    return live


def _schedule_order(
    members: Mapping[str, list[str]],
    preds: Mapping[str, set[str]],
    index: Mapping[str, int],
    start_ms: Mapping[str, float],
) -> list[str]:
    """Units in a topological order that follows the schedule (Kahn's, by start then model)."""
    succs: dict[str, list[str]] = {u: [] for u in members}
    for u, ps in preds.items():
        for p in ps:
            succs[p].append(u)

    def key(u: str) -> tuple[float, int]:
        return (start_ms.get(u, float("inf")), min(index[op] for op in members[u]))

    order = topological_order(members, succs, key)
    if order is None:
        raise ModelError(
            "the groups form a cycle over the model's data flow: a fusion group must not have a "
            "path that leaves it and comes back"
        )
    return order


def _topological_stages(reach: Sequence[set[int]]) -> list[int]:
    """Stage indices ordered so that every stage comes after the stages it depends on."""
    order: list[int] = []
    placed: set[int] = set()
    pending = list(range(len(reach)))
    while pending:
        for s in pending:
            if reach[s] <= placed:
                order.append(s)
                placed.add(s)
                pending.remove(s)
                break
        else:  # pragma: no cover - build_plan keeps the stage DAG acyclic
            raise AssertionError("stage DAG has a cycle")
    return order
