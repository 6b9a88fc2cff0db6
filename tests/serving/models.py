"""Small ONNX models built with onnx.helper, shaped to exercise the stage plan's corner cases."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 17)]


def _model(nodes, inputs, outputs, initializers, name: str) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=OPSET, ir_version=8)
    onnx.checker.check_model(model)
    return onnx.shape_inference.infer_shapes(model)


def _name(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    for i, n in enumerate(nodes):
        n.name = f"{n.op_type}_{i}"
    return nodes


def mlp(width: int = 64, depth: int = 6, batch: int = 1, seed: int = 0) -> onnx.ModelProto:
    """x → (MatMul → Add → Relu) × depth → y: a chain, the throughput benchmark's shape."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev = "x"
    for i in range(depth):
        w = numpy_helper.from_array(
            (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), f"w{i}"
        )
        b = numpy_helper.from_array(rng.standard_normal(width).astype(np.float32) * 0.1, f"b{i}")
        inits += [w, b]
        nodes += [
            helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
            helper.make_node("Relu", [f"a{i}"], ["y" if i == depth - 1 else f"h{i}"]),
        ]
        prev = f"h{i}"
    return _model(
        _name(nodes),
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, width])],
        inits,
        "mlp",
    )


def branchy(seed: int = 1) -> onnx.ModelProto:
    """Branches, a multi-output Split, shared Constants, a shared initializer, an If whose
    branches read an outer-scope tensor, dead code, two inputs and three outputs (one of them
    consumed inside the model too)."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")
    split = numpy_helper.from_array(np.array([4, 4], np.int64), "split")
    then_g = helper.make_graph(
        [helper.make_node("Add", ["p1", "r0"], ["then_out"], name="then_add")],
        "then",
        [],
        [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, [2, 4])],
    )
    else_g = helper.make_graph(
        [helper.make_node("Sub", ["p1", "r0"], ["else_out"], name="else_sub")],
        "else",
        [],
        [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, [2, 4])],
    )
    half = helper.make_tensor("half", TensorProto.FLOAT, [], [0.5])
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("Constant", [], ["c"], value=half),
        helper.make_node("Split", ["m", "split"], ["p0", "p1"], axis=1),
        helper.make_node("Mul", ["p0", "c"], ["q0"]),
        helper.make_node("Tanh", ["p1"], ["q1"]),
        helper.make_node("Relu", ["q0"], ["r0"]),
        helper.make_node("Sigmoid", ["q1"], ["dead"]),
        helper.make_node("ReduceSum", ["z"], ["zs"], keepdims=0),
        helper.make_node("Greater", ["zs", "c"], ["cond"]),
        helper.make_node("If", ["cond"], ["branch"], then_branch=then_g, else_branch=else_g),
        helper.make_node("Concat", ["r0", "branch"], ["cat"], axis=1),
        helper.make_node("MatMul", ["cat", "w"], ["y"]),
        helper.make_node("Mul", ["y", "c"], ["y2"]),
        helper.make_node("Add", ["y2", "y"], ["out"]),
    ]
    return _model(
        _name(nodes),
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [3]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8]),
            helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 8]),
            helper.make_tensor_value_info("q1", TensorProto.FLOAT, [2, 4]),
        ],
        [w, split],
        "branchy",
    )


def gather(rows: int = 16, width: int = 32, seed: int = 2) -> onnx.ModelProto:
    """x → MatMul → Relu → Gather(indices) → MatMul → y; out-of-range indices make ONNX Runtime
    fail inside the second half, which the failure tests use to inject stage failures."""
    rng = np.random.default_rng(seed)
    w0 = numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32), "w0")
    w1 = numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32), "w1")
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["m"]),
        helper.make_node("Relu", ["m"], ["r"]),
        helper.make_node("Gather", ["r", "idx"], ["g"], axis=0),
        helper.make_node("MatMul", ["g", "w1"], ["y"]),
    ]
    return _model(
        _name(nodes),
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, width]),
            helper.make_tensor_value_info("idx", TensorProto.INT64, [4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, width])],
        [w0, w1],
        "gather",
    )


def cnn(
    channels: int = 16, classes: int = 10, size: int | None = None, seed: int = 3
) -> onnx.ModelProto:
    """images[batch, 3, h, w] → Conv → Relu → Conv → Relu → GlobalAveragePool → Reshape [0, -1]
    → Gemm → Softmax → probs[batch, classes], and the first Relu's feature map as a second
    output: every dimension but the channels symbolic, like a CNN exported with dynamic axes
    (`size` fixes h and w, leaving the batch alone symbolic). At 64×64, a row of the feature map
    is 256 KiB: large enough for shared memory, so a cut after it exercises the dynamic
    outputs' path."""
    h, w = (size, size) if size else ("h", "w")
    rng = np.random.default_rng(seed)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        scale = 1 / np.sqrt(np.prod(shape[1:]))
        return numpy_helper.from_array(
            (rng.standard_normal(shape) * scale).astype(np.float32), name
        )

    inits = [
        weight("w0", channels, 3, 3, 3),
        weight("w1", channels, channels, 3, 3),
        weight("fc", classes, channels),
        numpy_helper.from_array(np.zeros(classes, np.float32), "fc_b"),
        numpy_helper.from_array(np.array([0, -1], np.int64), "flat"),
    ]
    nodes = [
        helper.make_node("Conv", ["images", "w0"], ["c0"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["features"]),
        helper.make_node("Conv", ["features", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("GlobalAveragePool", ["r1"], ["pooled"]),
        helper.make_node("Reshape", ["pooled", "flat"], ["flat_out"]),
        helper.make_node("Gemm", ["flat_out", "fc", "fc_b"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    return _model(
        _name(nodes),
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, h, w])],
        [
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", classes]),
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", channels, h, w]),
        ],
        inits,
        "cnn",
    )


def random_inputs(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for i in model.graph.input:
        t = i.type.tensor_type
        shape = [d.dim_value for d in t.shape.dim]
        if t.elem_type == TensorProto.INT64:
            out[i.name] = rng.integers(0, shape[0] if shape else 1, size=shape).astype(np.int64)
        else:
            out[i.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def strings(rows: int | str = "N") -> onnx.ModelProto:
    """A tabular model with a string column, as scikit-learn pipelines exported by skl2onnx
    are: `city` (strings) mapped to upper case by a LabelEncoder (`upper`, a string output the
    model also reads on), then to a code (a LabelEncoder from strings to integers, unknown
    cities 0), added to a numeric branch on `age`: `score` = relu(2 * age) + code. Cut in two
    by `split_plan`, `upper` crosses the border; `rows` is the batch dimension."""
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    nodes = [
        helper.make_node("LabelEncoder", ["city"], ["upper"], domain="ai.onnx.ml",
                         keys_strings=["a", "b", "c"], values_strings=["A", "B", "C"],
                         default_string="?"),
        helper.make_node("Mul", ["age", "two"], ["scaled"]),
        helper.make_node("Relu", ["scaled"], ["positive"]),
        helper.make_node("LabelEncoder", ["upper"], ["code"], domain="ai.onnx.ml",
                         keys_strings=["A", "B", "C"], values_int64s=[1, 2, 3], default_int64=0),
        helper.make_node("Cast", ["code"], ["code_f"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["positive", "code_f"], ["score"]),
    ]  # fmt: skip
    graph = helper.make_graph(
        _name(nodes),
        "strings",
        [
            helper.make_tensor_value_info("city", TensorProto.STRING, [rows, 1]),
            helper.make_tensor_value_info("age", TensorProto.FLOAT, [rows, 1]),
        ],
        [
            helper.make_tensor_value_info("upper", TensorProto.STRING, [rows, 1]),
            helper.make_tensor_value_info("score", TensorProto.FLOAT, [rows, 1]),
        ],
        initializer=[two],
    )
    opsets = [*OPSET, helper.make_opsetid("ai.onnx.ml", 3)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=8)
    onnx.checker.check_model(model)
    return onnx.shape_inference.infer_shapes(model)


CITIES = np.array(["a", "b", "c", "d", "", "ünïcödé"], dtype=object)
"""Cities for `strings`: known ones, unknown ones, the empty string, and non-ASCII text."""


def string_inputs(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of `strings` with `rows` rows."""
    rng = np.random.default_rng(seed)
    return {
        "city": rng.choice(CITIES, (rows, 1)),
        "age": (rng.random((rows, 1)) * 80 - 10).astype(np.float32),
    }
