"""Cutting one stage's ONNX sub-model out of the model (`extract_stage`).

Every stage server, the sequential runtime and the measured profiler build their sessions from
the model and the plan alone: `moirai.partition.build_plan` says which nodes form a stage and
which tensors cross its border, and this module makes the sub-model of those nodes, with the
initializers they read and the border as its inputs and outputs. Weights stay where they are
(`moirai.weights`): an initializer whose data lie in a file is copied as its reference, so the
sub-model is the stage's graph, and its session maps only the stage's own weights.
"""

from __future__ import annotations

import onnx
from onnx import helper

from moirai.partition import node_inputs
from moirai.stageplan import ONNX_DATATYPES, PlanError, StagePlan, TensorSpec
from moirai.weights import folder_of, set_folder


def extract_stage(model: onnx.ModelProto, plan: StagePlan, stage_id: str) -> onnx.ModelProto:
    """The ONNX sub-model of one stage: its nodes, the initializers they read, its border typed
    as the plan types it (so a dimension the plan leaves open, -1, stays open)."""
    stage = plan.stage(stage_id)
    graph = model.graph
    wanted = set(stage.nodes)
    nodes = [n for n in graph.node if n.name in wanted]
    if len(nodes) != len(wanted):
        missing = sorted(wanted - {n.name for n in nodes})
        raise PlanError(
            f"stage {stage_id} names node {missing[0]!r}, which the model lacks: the plan was "
            "made for another model or other input shapes"
        )
    read = {t for n in nodes for t in node_inputs(n)}
    sub = helper.make_graph(
        nodes,
        f"{graph.name or 'model'}_{stage_id}",
        [_value_info(plan.spec(t)) for t in stage.inputs],
        [_value_info(plan.spec(t)) for t in stage.outputs],
        initializer=[i for i in graph.initializer if i.name in read],
        sparse_initializer=[s for s in graph.sparse_initializer if s.values.name in read],
    )
    stage_model = helper.make_model(
        sub,
        opset_imports=list(model.opset_import),
        ir_version=model.ir_version,
        functions=list(model.functions),
    )
    set_folder(stage_model, folder_of(model))
    return stage_model


def _value_info(spec: TensorSpec) -> onnx.ValueInfoProto:
    """A border tensor as the plan types it: -1 becomes a dimension of no fixed size, so the
    stage accepts every size the model does."""
    elem_type = next(e for e, d in ONNX_DATATYPES.items() if d == spec.datatype)
    dims = [d if d >= 0 else None for d in spec.shape]
    return helper.make_tensor_value_info(spec.name, elem_type, dims)
