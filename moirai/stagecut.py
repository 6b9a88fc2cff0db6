"""Cutting one stage's ONNX sub-model out of the model (`extract_stage`).

Every stage server, the sequential runtime and the measured profiler build their sessions from
the model and the plan alone: `moirai.partition.build_plan` says which nodes form a stage and
which tensors cross its border, and this module makes the sub-model of those nodes, with the
initializers they read and the border as its inputs and outputs.
"""

from __future__ import annotations

import onnx
from onnx import helper

from moirai.partition import node_inputs, typed_values
from moirai.stageplan import PlanError, StagePlan


def extract_stage(model: onnx.ModelProto, plan: StagePlan, stage_id: str) -> onnx.ModelProto:
    """The ONNX sub-model of one stage: its nodes, the initializers they read, its border."""
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
    types = typed_values(model, [*stage.inputs, *stage.outputs])
    sub = helper.make_graph(
        nodes,
        f"{graph.name or 'model'}_{stage_id}",
        [types[t] for t in stage.inputs],
        [types[t] for t in stage.outputs],
        initializer=[i for i in graph.initializer if i.name in read],
        sparse_initializer=[s for s in graph.sparse_initializer if s.values.name in read],
    )
    return helper.make_model(
        sub,
        opset_imports=list(model.opset_import),
        ir_version=model.ir_version,
        functions=list(model.functions),
    )
