"""Step 1 of the pipeline: load an ONNX model and describe it as an operator DAG.

Two things leave this module, and both are contracts:

- `load_model(path, input_shapes)` returns the `onnx.ModelProto` every later step works on —
  fusion analysis, profiling and planning. It is the file's model with (1) its weights left in
  their files (`moirai.weights`: external references that ONNX Runtime maps), (2) graph inputs
  that are really initializers (IR < 4 models list every weight as an input) dropped from
  `graph.input`, so the inputs left are the ones a client feeds, (3) the user's input shapes
  applied and shapes inferred (`value_info` filled in, every dimension static), and (4) every
  node renamed to its canonical name. The shapes are the *representative*
  ones the model is priced at: a symbolic first dimension of an input (its batch dimension, as
  in Triton) that the user gives no shape for is priced at 1; any other symbolic dimension needs
  `--input-shape`, since no default size would be representative of it.
- `load_model(path, symbolic=True)` is the serving view: the same model and names, but input
  dimensions stay as the file declares them, so the stage servers' sub-models accept every size
  the model accepts. `dynamic_shapes(path)` tells which dimensions of which tensors vary with
  those symbolic inputs or with the inputs' values (ONNX's symbolic shape inference): the stage
  plan marks them -1.
- `canonical_node_names(model)`: a node keeps its name when it is non-empty and unique in the
  graph, otherwise it becomes `f"{op_type}_{index}"` (made unique with a numeric suffix). The
  cost graph's `Task.ops` and the stage plans speak these names, so applying the rule twice
  changes nothing.

`build_graph(model)` then gives the analysis view (`OpGraph`): nodes in topological order with
their input and output tensors, the bytes of every tensor (dtype size × static shape) and the
weight bytes each node reads. A tensor is *constant* when it is an initializer or is computed
only from constants (a `Constant` node, `ConstantOfShape` of a shape initializer, a `Shape` of a
static tensor...): ONNX Runtime folds those nodes away at load time, so their outputs are weights
held in memory, not work done per request. A node's weight bytes are the constant tensors it
reads; constant nodes themselves read none, so a weight is counted where a kernel uses it,
exactly as ONNX Runtime holds it after folding.

Shapes come from `onnx.shape_inference`, without its data propagation: that represents every
1-D initializer as a shape of as many dimensions, about 60 bytes per element (3 × 0.7 GB of
1-D weights exhausted 23 GB). What it leaves open (shapes computed at run time from `Shape`
chains, operators without an ONNX schema such as ONNX Runtime's contrib operators,
data-dependent sizes) is asked of ONNX Runtime, whose session knows its own operators' shapes,
and what stays symbolic there is measured by one run on zero-filled inputs (one-filled where
zeros fail). (ONNX Runtime's symbolic shape inference script would need sympy, which is not a
dependency.) The answers go into `value_info`, so the returned model is fully typed — which
serving needs for the rank of the tensors crossing a stage border (their sizes that vary with
the inputs' values are `dynamic_shapes`'s). A tensor whose shape is still unknown counts as 0
bytes and is logged.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from moirai.errors import ModelError, one_line
from moirai.nodeinputs import node_inputs
from moirai.weights import ort_session, read_skeleton
from moirai.wording import counted

log = logging.getLogger(__name__)

InputShapes = Mapping[str, Sequence[int]]

# Nodes whose output depends only on the static shape of their input, which ONNX Runtime folds
# once shapes are static.
_SHAPE_OPS = frozenset({"Shape", "Size"})
_SUBGRAPHS = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
# Never folded: their output changes from run to run.
_NONDETERMINISTIC_OPS = frozenset(
    {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial"}
)


# ----------------------------------------------------------------------- names
def canonical_node_names(model: onnx.ModelProto) -> list[str]:
    """The canonical name of every node of the main graph, in graph order.

    `node.name` when it is non-empty and unique in the graph, else `f"{op_type}_{index}"`; a
    generated name that collides with another gets `_1`, `_2`, ... appended.
    """
    nodes = model.graph.node
    counts = Counter(n.name for n in nodes)
    kept = {n.name for n in nodes if n.name and counts[n.name] == 1}
    taken = set(kept)
    names = []
    for index, node in enumerate(nodes):
        if node.name in kept:
            names.append(node.name)
            continue
        base = name = f"{node.op_type}_{index}"
        suffix = 0
        while name in taken:
            suffix += 1
            name = f"{base}_{suffix}"
        taken.add(name)
        names.append(name)
    return names


# ---------------------------------------------------------------------- loading
def load_model(
    path: str | Path,
    input_shapes: InputShapes | None = None,
    *,
    symbolic: bool = False,
    check: bool = True,
) -> onnx.ModelProto:
    """Load, check and statically shape an ONNX model; nodes get their canonical names.

    With `symbolic`, input dimensions stay as the file declares them and no shapes are inferred
    (the serving view: module docstring); `input_shapes` must then be None.

    Raises `ModelError` (one line) for an unreadable or invalid file, an unknown input name, a
    shape that contradicts the model, or a symbolic input dimension other than the first that
    no input shape resolves. `check=False` skips ONNX's checker, which reads the whole file: for
    a stage server, whose plan names the digest of a model that was checked when it was planned.
    """
    if symbolic and input_shapes:
        raise ValueError("a symbolic load takes no input shapes")
    path = Path(path)
    model = _read(path, check)
    _tidy_interface(model)
    if not symbolic:
        _apply_input_shapes(model, input_shapes or {}, path)
        _price_batch_at_one(model, path)
        model = _infer_shapes(model, path, input_shapes)
        _check_static_inputs(model, path)
    for node, name in zip(model.graph.node, canonical_node_names(model), strict=True):
        node.name = name
    if not symbolic:
        _complete_shapes(model, path, input_shapes)
    return model


def dynamic_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """The shapes of a model's tensors as its file declares its inputs, -1 for a dimension that
    is not fixed: one that varies with a symbolic input dimension, or with the values of the
    inputs (a `Reshape` or `Pad` whose sizes a client sends, a `NonZero`), which no input shape
    fixes even when every input dimension is fixed.

    From ONNX's symbolic shape inference on the graph alone (external data is not read: shapes
    of weights are in their headers). A tensor that inference cannot shape is left out: the
    caller should treat all of its dimensions as varying. (The static shapes `load_model`
    completes by a run of ONNX Runtime on zero-filled inputs price the model, but hold only for
    those values.) Call it on a file that `load_model` accepted.

    Inference propagates the values of shape tensors (`data_prop`): a length computed from
    shapes (`Slice(Shape(x))`, `ConstantOfShape(Shape(...))`, as `torch.onnx.export` writes
    them) is then known, where without it such a tensor, and all that follows, is left open. A
    stage whose border typed the slice feeding a Resize's `sizes` with an open length was refused
    by ONNX Runtime (torchvision's raft_small, cut so). The memory that keeps `load_model`'s
    inference from propagating (module docstring) is not spent here: the skeleton's weights of
    1 KiB or more stay in their files, and propagation reads none of them (a model with 20M-element
    1-D weights: no growth of the peak resident size)."""
    path = Path(path)
    model = read_skeleton(path)
    _tidy_interface(model)
    del model.graph.value_info[:]  # a file's own value_info may be stale (exported at batch 1)
    try:
        model = _symbolic_inference(model)
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError) as e:
        log.warning("%s: symbolic shape inference failed (%s)", path, one_line(e))
    graph = model.graph
    shapes = {}
    for value in (*graph.input, *graph.value_info, *graph.output):
        tensor_type = value.type.tensor_type
        if tensor_type.HasField("shape"):
            shapes[value.name] = tuple(
                d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim
            )
    return shapes


def _symbolic_inference(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX's shape inference with the values of shape tensors propagated, else without them
    (`data_prop` is the younger path of ONNX's inference: where it fails, the plain one may not)."""
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError):
        return onnx.shape_inference.infer_shapes(model)


def _read(path: Path, check: bool) -> onnx.ModelProto:
    model = read_skeleton(path)
    if not model.graph.output:
        raise ModelError(
            f"{path}: the model has no outputs, so nothing to compute: list the tensors it "
            "returns as its graph's outputs"
        )
    if not model.graph.node:
        raise ModelError(f"{path}: the model has no nodes: nothing to place or serve")
    if not check:
        return model
    try:
        # Given the path, the checker resolves external data files relative to the model.
        onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, ValueError, RuntimeError) as e:
        problem = one_line(e)
        if _ort_refuses(model) is not None:
            raise ModelError(
                f"{path}: invalid ONNX model: {problem}; fix or re-export the model"
            ) from None
        log.warning(
            "%s: ONNX's checker refuses the model (%s), but ONNX Runtime loads it: going on",
            path,
            problem,
        )
    return model


def _probe_session(model: onnx.ModelProto, folded: bool = False) -> ort.InferenceSession:
    """A CPU session of `model`, unoptimised (`folded`: with the basic level's constant folding)
    and silent: it asks what ONNX Runtime makes of the model (whether it loads it, the shapes it
    gives), not for speed; a failure is the caller's to report."""
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        if folded
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.log_severity_level = 4
    return ort_session(model, options, ["CPUExecutionProvider"])


def _ort_refuses(model: onnx.ModelProto, folded: bool = False) -> str | None:
    """Why ONNX Runtime cannot load `model` (None when it can): it has the last word."""
    try:
        _probe_session(model, folded)
    except Exception as e:  # ORT raises its own exception types, without a common base
        return one_line(e)
    return None


def _tidy_interface(model: onnx.ModelProto) -> None:
    """The model's inputs and outputs as every later step reads them."""
    _drop_initializer_inputs(model)
    _open_negative_dims(model)
    _compute_constant_outputs(model)


def _compute_constant_outputs(model: onnx.ModelProto) -> None:
    """A model output that is an initializer becomes the output of an `Identity` of it (the
    initializer renamed), so that a node produces every output and a stage can send it: PyTorch's
    dynamo exporter writes a returned buffer or parameter so (its TorchScript exporter writes
    the Identity itself), and serving refused such a model. The Identity goes first, where every
    node that reads the name finds it already made."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    constant = [t for t in graph.initializer if t.name in outputs]
    if not constant:
        return
    taken = {t.name for t in graph.initializer} | {t for n in graph.node for t in n.output}
    identities = []
    for tensor in constant:
        name, renamed = tensor.name, f"{tensor.name}/initializer"
        while renamed in taken:
            renamed += "_"
        taken.add(renamed)
        tensor.name = renamed
        identities.append(helper.make_node("Identity", [renamed], [name], name=f"{name}/identity"))
    nodes = [*identities, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)


def _open_negative_dims(model: onnx.ModelProto) -> None:
    """A dimension some exporters write as the value -1 (PaddlePaddle's) is an open one, as
    ONNX Runtime reads it: it becomes a dimension of no fixed size."""
    graph = model.graph
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.HasField("tensor_type"):
            for dim in value.type.tensor_type.shape.dim:
                if dim.HasField("dim_value") and dim.dim_value < 0:
                    dim.ClearField("dim_value")


def _drop_initializer_inputs(model: onnx.ModelProto) -> None:
    """Inputs backed by an initializer are weights: keep only the inputs a client feeds.

    IR < 4 required every initializer to be listed as an input; from IR 4 such inputs are
    merely overridable defaults, which would stop ONNX Runtime from folding them.
    """
    weights = {t.name for t in model.graph.initializer}
    if not any(i.name in weights for i in model.graph.input):
        return
    kept = [i for i in model.graph.input if i.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    model.ir_version = max(model.ir_version, 4)


def _apply_input_shapes(model: onnx.ModelProto, shapes: InputShapes, path: Path) -> None:
    """The user's shapes, by input (`x=1x3x224x224`), or by the name of a symbolic dimension
    (`sequence=128`: that dimension of every input that has it, as ONNX Runtime's free
    dimension overrides; a transformer's dozens of cache inputs share one `past_sequence`)."""
    inputs = {i.name: i for i in model.graph.input}
    named = _symbolic_dims(model)
    sizes: dict[str, int] = {}
    for name, dims in shapes.items():
        if name not in inputs and name in named:
            dims = list(dims)
            if len(dims) != 1 or not isinstance(dims[0], int | np.integer) or dims[0] <= 0:
                raise ModelError(
                    f"{path}: --input-shape {name}=... names a dimension: give its size as one "
                    f"positive integer, e.g. {name}=128"
                )
            sizes[name] = int(dims[0])
            continue
        if name not in inputs:
            raise ModelError(
                f"{path}: --input-shape names unknown input {name!r}; the model's inputs are "
                f"{', '.join(inputs) or '(none)'}"
                + (f", its symbolic dimensions {', '.join(sorted(named))}" if named else "")
            )
        dims = list(dims)
        if not dims or not all(isinstance(d, int | np.integer) and d > 0 for d in dims):
            raise ModelError(
                f"{path}: input shape for {name!r} must be positive integers, e.g. "
                f"--input-shape {name}=1x3x224x224"
            )
        shape = inputs[name].type.tensor_type.shape
        if inputs[name].type.tensor_type.HasField("shape") and len(shape.dim) != len(dims):
            raise ModelError(
                f"{path}: input {name!r} has rank {len(shape.dim)} but --input-shape gives "
                f"{len(dims)} dimensions ({_dims_text(dims)})"
            )
        for axis, (dim, size) in enumerate(zip(shape.dim, dims, strict=True)):
            if dim.HasField("dim_value") and dim.dim_value != size:
                raise ModelError(
                    f"{path}: input {name!r} dimension {axis} is fixed at {dim.dim_value} in the "
                    f"model but --input-shape gives {size}"
                )
        del shape.dim[:]
        for size in dims:
            shape.dim.add().dim_value = int(size)
    for value in model.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in sizes:
                dim.dim_value = sizes[dim.dim_param]


def _symbolic_dims(model: onnx.ModelProto) -> set[str]:
    """The names of the inputs' symbolic dimensions."""
    return {
        d.dim_param
        for i in model.graph.input
        if i.type.HasField("tensor_type")
        for d in i.type.tensor_type.shape.dim
        if d.dim_param and not d.HasField("dim_value")
    }


def _price_batch_at_one(model: onnx.ModelProto, path: Path) -> None:
    """A symbolic first dimension left after the user's shapes is the batch: priced at 1."""
    for value in model.graph.input:
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape") or not tensor_type.shape.dim:
            continue
        first = tensor_type.shape.dim[0]
        if not first.HasField("dim_value"):
            log.info(
                "%s: input %r: symbolic batch dimension %r priced at 1 (give --input-shape to "
                "price another size)",
                path,
                value.name,
                first.dim_param or "unnamed",
            )
            first.dim_value = 1


def _infer_shapes(
    model: onnx.ModelProto, path: Path, given: InputShapes | None = None
) -> onnx.ModelProto:
    """ONNX's shapes in `value_info`; where ONNX cannot infer them, none (ONNX Runtime's are
    then asked for: `_complete_shapes`). Subgraphs (If/Loop/Scan bodies) stay as the file has
    them: ONNX Runtime infers their insides itself, and an inference of another ONNX version
    written into them could contradict it. Input shapes the user gave (`given`) that the
    model's operators cannot take are refused (`_inference`)."""
    # Keep only the shapes we are about to derive again from the (possibly new) input shapes:
    # a file's own may be stale (exported at batch 1).
    del model.graph.value_info[:]
    try:
        inferred = _inference(model, path, given)
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError) as e:
        log.warning(
            "%s: ONNX's shape inference fails (%s): the shapes are ONNX Runtime's",
            path,
            one_line(e),
        )
        return model
    for original, node in zip(model.graph.node, inferred.graph.node, strict=True):
        if any(a.type in _SUBGRAPHS for a in node.attribute):
            node.CopyFrom(original)
    return inferred


def _inference(model: onnx.ModelProto, path: Path, given: InputShapes | None) -> onnx.ModelProto:
    """ONNX's shape inference of `model`; at input shapes the user gave, strict first, so that
    shapes the operators cannot take (a YOLO detector at 33x47, whose Concat then joins feature
    maps of different sizes) are refused in ONNX's words, which name the node, where ONNX
    Runtime refuses the model at those shapes too (ONNX's inference alone can be stricter than
    ONNX Runtime). Else such shapes went on to a profile that cannot run them."""
    if given:
        try:
            return onnx.shape_inference.infer_shapes(model, strict_mode=True)
        except (onnx.shape_inference.InferenceError, ValueError, RuntimeError) as e:
            if "ShapeInferenceError" in str(e) and _ort_refuses(model) is not None:
                raise _cannot_run_at(path, given, one_line(e)) from None
    return onnx.shape_inference.infer_shapes(model)


def _cannot_run_at(path: Path, given: InputShapes, problem: str) -> ModelError:
    shapes = " ".join(f"{k}={'x'.join(map(str, v))}" for k, v in given.items())
    return ModelError(
        f"{path}: the model cannot run at --input-shape {shapes}: {problem}; "
        "give sizes its operators take"
    )


def _static(value_type: onnx.TypeProto) -> bool:
    tensor_type = value_type.tensor_type
    return tensor_type.HasField("shape") and all(
        d.HasField("dim_value") for d in tensor_type.shape.dim
    )


def _complete_shapes(model: onnx.ModelProto, path: Path, given: InputShapes | None = None) -> None:
    """Ask ONNX Runtime for the shapes that ONNX's inference left open (module docstring).

    Input shapes the user gave (`given`) that ONNX Runtime's own inference refuses once it has
    folded the constants are refused: a sequence longer than a CLIP text encoder's 77 position
    embeddings (exported by PyTorch, the embeddings' `Slice` ends come from a `Shape` chain that
    ONNX's inference leaves open) fails in the Add that broadcasts them. Else such shapes went
    on to fusion analysis, profiles and a plan priced at a size no session can run, with the
    same failure warned of at every step."""
    graph = model.graph
    known = {v.name for v in (*graph.input, *graph.value_info, *graph.output) if _static(v.type)}
    known.update(t.name for t in graph.initializer)
    outputs = {o.name: o for o in graph.output}
    used = {t for n in graph.node for t in n.input} | outputs.keys()
    missing = [t for n in graph.node for t in n.output if t in used and t not in known]
    if not missing:
        return
    # The probe is the model as its file has it, at the given input shapes: ONNX Runtime infers
    # every shape itself, so nothing ONNX inferred can contradict it.
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.value_info[:]
    probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in missing if t not in outputs)
    try:
        session = _probe_session(probe)
        answers = {o.name: (o.type, o.shape) for o in session.get_outputs()}
        # Sequences and maps (a ZipMap's output) have no shape to measure.
        tensors = [t for t in missing if answers[t][0].startswith("tensor(")]
        # A shape of [] is a scalar or a tensor of unknown rank (a Loop's output): measured.
        if not all(
            answers[t][1] and all(isinstance(d, int) for d in answers[t][1]) for t in tensors
        ):
            shapes = _probe_shapes(session, tensors)
            answers.update({t: (answers[t][0], s) for t, s in zip(tensors, shapes, strict=True)})
    except Exception as e:  # ORT raises its own exception types, without a common base
        refusal = _ort_refuses(probe, folded=True) if given else None
        if refusal is not None and "ShapeInferenceError" in refusal:
            raise _cannot_run_at(path, given or {}, refusal) from None
        log.warning("%s: ONNX Runtime could not shape %s: %s", path, missing[0], one_line(e))
        return
    partial = {v.name: v for v in graph.value_info}  # what ONNX shaped in part
    for name in missing:
        type_name, shape = answers[name]
        if not type_name.startswith("tensor(") or shape is None:
            continue  # sequences and maps carry no static size; a rank the values decide
        value = helper.make_tensor_value_info(name, _elem_type(type_name), shape)
        if name in outputs:
            outputs[name].CopyFrom(value)
        elif name in partial:
            partial[name].CopyFrom(value)
        else:
            graph.value_info.append(value)
    log.info(
        "%s: shapes of %s that ONNX's shape inference left open taken from ONNX Runtime",
        path,
        counted(len(missing), "tensor"),
    )


def open_measured_sizes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a model from `load_model` for sessions that run other values than zeros
    (measured profiling's random floats): the sizes that only ONNX Runtime's run on zero-filled
    inputs gave (`_complete_shapes`) are left open, each dimension under a name of its own, the
    ranks kept. Those sizes price the model; they hold for zeros alone where they depend on the
    values: a NonZero finds nothing in zeros. Told them, ONNX Runtime refused a sub-model whose
    border was declared of 0 rows and fed 33, and its memory planner failed on torchvision's
    retinanet_resnet50_fpn ('Shape mismatch attempting to re-use buffer. {1,0} != {1,833}'), so
    that measured profiling said the model could not be timed. The sessions infer those sizes
    themselves, as the stage servers' do (`moirai.stagecut` carries no inner shapes)."""
    plain = onnx.ModelProto()
    plain.CopyFrom(model)
    del plain.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(plain).graph
        onnx_static = {v.name for v in (*inferred.value_info, *inferred.output) if _static(v.type)}
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError):
        onnx_static = set()  # as `_infer_shapes` fell back: every shape was ONNX Runtime's
    opened = onnx.ModelProto()
    opened.CopyFrom(model)
    for value in (*opened.graph.value_info, *opened.graph.output):
        if value.name in onnx_static or not value.type.tensor_type.HasField("shape"):
            continue
        for i, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value"):
                dim.dim_param = f"moirai_measured_{value.name}_{i}"
    return opened


def _probe_shapes(session: ort.InferenceSession, outputs: list[str]) -> list[list[int] | None]:
    """The shapes of `outputs` in a run on zero-filled inputs, or where zeros are no valid input
    (a size or a count read from an input: node/test_affine_grid_2d_expanded), on inputs filled
    with ones. Where the model reads integer inputs, a second run with counting integers (0, 1,
    2...) checks the ranks: an output whose rank differs between the runs depends on the values
    (ReduceSum over axes that an input gives, where [0, 0] is one axis and [0, 1] two:
    node/test_reduce_log_sum_asc_axes_expanded), and its shape is None, unknown."""
    inputs = [
        (i.name, i.shape, helper.tensor_dtype_to_np_dtype(_elem_type(i.type)))
        for i in session.get_inputs()
    ]

    def run(fill: Callable[[Any, np.dtype], np.ndarray]) -> list[list[int]]:
        feeds = {name: fill(shape, dtype) for name, shape, dtype in inputs}
        return [list(r.shape) for r in session.run(outputs, feeds)]

    try:
        shapes = run(np.zeros)
    except Exception:  # ORT raises its own exception types, without a common base
        shapes = run(np.ones)
    if not any(np.issubdtype(dtype, np.integer) for *_, dtype in inputs):
        return list(shapes)
    try:
        other = run(_counting)
    except Exception:  # ORT raises its own exception types, without a common base
        return list(shapes)
    return [s if len(s) == len(o) else None for s, o in zip(shapes, other, strict=True)]


def _counting(shape: Any, dtype: np.dtype) -> np.ndarray:
    """Integers 0, 1, 2... in `shape` (zeros for other types)."""
    if not np.issubdtype(dtype, np.integer):
        return np.zeros(shape, dtype)
    return np.arange(int(np.prod(shape, dtype=np.int64))).reshape(shape).astype(dtype)


def _elem_type(ort_type: str) -> int:
    """`tensor(float16)` → `TensorProto.FLOAT16`."""
    return onnx.TensorProto.DataType.Value(ort_type.removeprefix("tensor(").rstrip(")").upper())


def _check_static_inputs(model: onnx.ModelProto, path: Path) -> None:
    """Refuses, in one message, every input that still has a symbolic dimension: a model
    exported by PyTorch with `dynamic_axes` as lists names each input's sequence dimension
    apart (`input_ids_dynamic_axes_2`, `attention_mask_dynamic_axes_2`), and naming one input
    at a time took a run per input to find them."""
    problems = []
    for value in model.graph.input:
        if value.type.WhichOneof("value") != "tensor_type":
            continue  # a sequence or an optional has no shape to give (serving refuses it)
        tensor_type = value.type.tensor_type
        dims = tensor_type.shape.dim
        unknown = [(axis, d) for axis, d in enumerate(dims) if not d.HasField("dim_value")]
        if not tensor_type.HasField("shape") or unknown:
            example = "x".join(_example_dim(d) for d in dims) or "1x3x224x224"
            what = (
                f"dimension {unknown[0][0]} ({unknown[0][1].dim_param or 'unnamed'!r}) is symbolic"
                if unknown
                else "has no shape"
            )
            by_name = (
                f" (or --input-shape {unknown[0][1].dim_param}=SIZE for every input that has it)"
                if unknown and unknown[0][1].dim_param.isidentifier()
                else ""
            )
            problems.append(
                f"input {value.name!r} {what}: give its size, e.g. "
                f"--input-shape {value.name}={example}{by_name}"
            )
    if problems:
        raise ModelError(f"{path}: {'; '.join(problems)}")


def _example_dim(dim: onnx.TensorShapeProto.Dimension) -> str:
    """A dimension in an example `--input-shape`: its size, or where it has none a placeholder
    named as the model names it (`<height>`), else `<size>`."""
    if dim.HasField("dim_value"):
        return str(dim.dim_value)
    return f"<{dim.dim_param}>" if dim.dim_param.isidentifier() else "<size>"


def _dims_text(dims: Iterable[int]) -> str:
    return "x".join(str(d) for d in dims)


# ------------------------------------------------------------------- the graph
STRING_ELEMENT_BYTES = 16
"""The size a string element (ONNX `tensor(string)`) is priced at, its length being known only
at run time: its 4-byte length prefix on the wire plus 12 bytes of text. String tensors are the
categories and words of tabular and text models (a city, a label, a token), short next to any
numeric tensor of the same model; a price off by a few times moves no cut that matters."""


@dataclass(frozen=True)
class Tensor:
    name: str
    elem_type: int
    """ONNX `TensorProto.DataType`; 0 when unknown (sequences, maps, missing shape info)."""
    shape: tuple[int, ...] | None
    """Static shape, or None when inference could not resolve it."""
    constant: bool
    """An initializer or computed from constants only: held as a weight after folding."""

    @property
    def nbytes(self) -> int:
        if self.shape is None or self.elem_type == 0:
            return 0
        if self.elem_type == onnx.TensorProto.STRING:
            return int(np.prod(self.shape, dtype=np.int64)) * STRING_ELEMENT_BYTES
        itemsize = helper.tensor_dtype_to_np_dtype(self.elem_type).itemsize
        return int(np.prod(self.shape, dtype=np.int64)) * itemsize

    @property
    def numel(self) -> int:
        return 0 if self.shape is None else int(np.prod(self.shape, dtype=np.int64))


@dataclass(frozen=True)
class Node:
    name: str
    op_type: str
    domain: str
    inputs: tuple[str, ...]
    """Tensors read: explicit inputs (empty optional ones left out), then the outer-scope
    tensors its subgraphs (If/Loop/Scan bodies) read."""
    outputs: tuple[str, ...]
    attributes: Mapping[str, object]
    constant: bool
    """Folded away by ONNX Runtime at load time: costs nothing per request."""


@dataclass(frozen=True)
class OpGraph:
    """The operator DAG of a loaded model (see the module docstring)."""

    name: str
    nodes: tuple[Node, ...]
    """In topological order (ONNX requires the graph's node list to be one)."""
    tensors: Mapping[str, Tensor]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    @cached_property
    def node(self) -> dict[str, Node]:
        return {n.name: n for n in self.nodes}

    @cached_property
    def producer(self) -> dict[str, str]:
        """Tensor name → name of the node that writes it (graph inputs and initializers have
        none)."""
        return {t: n.name for n in self.nodes for t in n.outputs}

    @cached_property
    def consumers(self) -> dict[str, tuple[str, ...]]:
        out: dict[str, list[str]] = {}
        for n in self.nodes:
            for t in dict.fromkeys(n.inputs):
                out.setdefault(t, []).append(n.name)
        return {t: tuple(c) for t, c in out.items()}

    def weight_bytes(self, node_names: Iterable[str]) -> int:
        """Bytes of the distinct constant tensors that the non-constant nodes among
        `node_names` read: the weights a device running them must hold."""
        return sum(self.tensors[t].nbytes for t in self.weights_read(node_names))

    def activation_bytes(self, node_names: Iterable[str]) -> int:
        """Bytes of the tensors that the non-constant nodes among `node_names` write."""
        return sum(
            self.tensors[t].nbytes
            for name in node_names
            if not (n := self.node[name]).constant
            for t in n.outputs
        )

    def weights_read(self, node_names: Iterable[str]) -> set[str]:
        return {
            t
            for name in node_names
            if not (n := self.node[name]).constant
            for t in n.inputs
            if self.tensors[t].constant
        }

    @cached_property
    def unknown_shapes(self) -> tuple[str, ...]:
        """Tensors in use (read, or a graph output) whose shape inference left unresolved:
        they count as 0 bytes."""
        used = self.consumers.keys() | set(self.outputs)
        return tuple(t.name for t in self.tensors.values() if t.shape is None and t.name in used)


def build_graph(model: onnx.ModelProto) -> OpGraph:
    """The operator DAG of a model returned by `load_model`."""
    graph = model.graph
    types: dict[str, onnx.TypeProto] = {}
    for value in (*graph.input, *graph.value_info, *graph.output):
        types[value.name] = value.type
    tensors: dict[str, Tensor] = {}
    for init in graph.initializer:
        tensors[init.name] = Tensor(init.name, init.data_type, tuple(init.dims), constant=True)
    for init in graph.sparse_initializer:
        values = init.values
        tensors[values.name] = Tensor(values.name, values.data_type, tuple(init.dims), True)

    def add(name: str, constant: bool) -> None:
        if name in tensors:
            return
        tensor_type = types[name].tensor_type if name in types else None
        shape = None
        if tensor_type is not None and tensor_type.HasField("shape"):
            dims = tensor_type.shape.dim
            if all(d.HasField("dim_value") for d in dims):
                shape = tuple(d.dim_value for d in dims)
        elem_type = tensor_type.elem_type if tensor_type is not None else 0
        tensors[name] = Tensor(name, elem_type, shape, constant)

    for value in graph.input:
        add(value.name, constant=False)
    nodes = []
    for node in graph.node:
        inputs = tuple(node_inputs(node))
        for name in inputs:
            add(name, constant=False)  # an undeclared input: the checker allows none here
        constant = _is_constant(node, [tensors[i] for i in inputs])
        for name in node.output:
            if name:
                add(name, constant)
        nodes.append(
            Node(
                name=node.name,
                op_type=node.op_type,
                domain=node.domain,
                inputs=inputs,
                outputs=tuple(o for o in node.output if o),
                attributes={a.name: helper.get_attribute_value(a) for a in node.attribute},
                constant=constant,
            )
        )
    op_graph = OpGraph(
        name=graph.name or "model",
        nodes=tuple(nodes),
        tensors=tensors,
        inputs=tuple(i.name for i in graph.input),
        outputs=tuple(o.name for o in graph.output),
    )
    unknown = op_graph.unknown_shapes
    if unknown:
        log.warning(
            "%s no static shape after inference (e.g. %s); %s as 0 bytes",
            "1 tensor has" if len(unknown) == 1 else f"{len(unknown)} tensors have",
            unknown[0],
            "it counts" if len(unknown) == 1 else "they count",
        )
    return op_graph


def _is_constant(node: onnx.NodeProto, inputs: Sequence[Tensor]) -> bool:
    if node.op_type in _NONDETERMINISTIC_OPS or node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type in _SHAPE_OPS:
        return inputs[0].shape is not None
    return all(t.constant for t in inputs)
