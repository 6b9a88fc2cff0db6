"""Cutting one stage's ONNX sub-model out of the model (`extract_stage`).

Every stage server, the sequential runtime and the measured profiler build their sessions from
the model and the plan alone: `moirai.partition.build_plan` says which nodes form a stage and
which tensors cross its border, and this module makes the sub-model of those nodes, with the
initializers they read and the border as its inputs and outputs. Weights stay where they are
(`moirai.weights`): an initializer whose data lie in a file is copied as its reference, so the
sub-model is the stage's graph, and its session maps only the stage's own weights.

A stage's border keeps the model's names of its symbolic dimensions (`batch`, where the plan
says only -1). Without them ONNX Runtime cannot tell that two open dimensions are the same, and
may run other kernels than on the whole model: a dynamically quantised BERT was served 0.09 away
from in-process ONNX Runtime (rounding differences that its quantisation amplified), where with
them a stage computes the same bits. For the same reason a stage carries the model's shapes of
the tensors inside it (`value_info`) that name a symbolic dimension: PyTorch's dynamo exporter
writes them, and ONNX Runtime fuses the residual Add into the LayerNormalization after it
(SkipLayerNormalization) only where it knows both Add inputs' shapes, which its own inference
of a Reshape to a computed shape does not give: a BERT's stage ran without those fusions,
1.2e-6 away from the whole model (4.3e-4 dynamically quantised, on a fully masked input,
which `moirai demo` called a mismatch). Shapes with no symbolic dimension are not carried: a
file's may be stale (exported at batch 1), and a stage would then fail on a batch the plan
opens (`moirai.graph.dynamic_shapes` ignores them too).

A `Dropout` in training mode (a PyTorch module exported without `.eval()`: `training_mode`
true) is cut as an inference-mode one, where the whole model's session would drop it: ONNX
Runtime's optimised sessions remove every such Dropout whose mask nobody reads, whatever its
`training_mode`, except one whose output leaves the graph. A stage border made it such an
output, and the stage then zeroed half the values at random: a BERT exported in training mode
was served 3.5 away from in-process ONNX Runtime, differently on every call.
"""

from __future__ import annotations

import onnx
from onnx import helper

from moirai.nodeinputs import node_inputs
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
    if any(n.op_type == "Dropout" for n in nodes):
        outputs = {o.name for o in graph.output}
        everything_read = {t for n in graph.node for t in node_inputs(n)}
        nodes = [_as_dropped(n, outputs, everything_read) for n in nodes]
    read = {t for n in nodes for t in node_inputs(n)}
    declared = {v.name: v for v in (*graph.input, *graph.output, *graph.value_info)}
    border = {*stage.inputs, *stage.outputs}
    inside = {t for n in nodes for t in n.output} - border
    sub = helper.make_graph(
        nodes,
        f"{graph.name or 'model'}_{stage_id}",
        [_value_info(plan.spec(t), declared.get(t)) for t in stage.inputs],
        [_value_info(plan.spec(t), declared.get(t)) for t in stage.outputs],
        initializer=[i for i in graph.initializer if i.name in read],
        value_info=[v for v in graph.value_info if v.name in inside and _names_a_dimension(v)],
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


def _as_dropped(node: onnx.NodeProto, outputs: set[str], read: set[str]) -> onnx.NodeProto:
    """`node`, or where it is a Dropout that the whole model's session removes (module
    docstring), a Dropout in inference mode: an identity, as ONNX Runtime makes it. `outputs`
    are the model's outputs, `read` every tensor its nodes read."""
    if node.op_type != "Dropout" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return node
    if node.output[0] in outputs or (len(node.output) > 1 and node.output[1] in read | outputs):
        return node  # the session keeps it: a model output, or its mask is read
    plain = onnx.NodeProto()
    plain.CopyFrom(node)
    del plain.input[1:]
    return plain


def _names_a_dimension(value: onnx.ValueInfoProto) -> bool:
    """Whether a tensor's declared shape has a symbolic dimension (module docstring)."""
    tensor_type = value.type.tensor_type
    return value.type.HasField("tensor_type") and any(d.dim_param for d in tensor_type.shape.dim)


def _value_info(spec: TensorSpec, declared: onnx.ValueInfoProto | None) -> onnx.ValueInfoProto:
    """A border tensor as the plan types it: -1 becomes a dimension of no fixed size, so the
    stage accepts every size the model does, named as the model names it (`declared`, when
    the model gives this tensor a shape of the same rank: module docstring)."""
    elem_type = next(e for e, d in ONNX_DATATYPES.items() if d == spec.datatype)
    names: list[str | None] = [None] * len(spec.shape)
    if declared is not None and declared.type.tensor_type.HasField("shape"):
        dims = declared.type.tensor_type.shape.dim
        if len(dims) == len(spec.shape):
            names = [d.dim_param or None for d in dims]
    shape = [d if d >= 0 else name for d, name in zip(spec.shape, names, strict=True)]
    return helper.make_tensor_value_info(spec.name, elem_type, shape)
