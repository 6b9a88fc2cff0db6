"""Tiny ONNX graphs built with `onnx.helper`, in the patterns ONNX Runtime fuses.

Shared by the graph, fusion, analytic and pipeline tests. Every builder returns an unchecked
`ModelProto`; `save` writes it where `load_model` can read it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

_rng = np.random.default_rng(0)


def tensor(name: str, shape: Sequence[int | str] | None, elem_type: int = TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem_type, shape)


def init(name: str, shape: Sequence[int], value: float | np.ndarray | None = None):
    if value is None:
        data = _rng.standard_normal(shape).astype(np.float32)
    else:
        data = np.broadcast_to(np.asarray(value, np.float32), shape).copy()
    return numpy_helper.from_array(data, name)


def model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Sequence[onnx.TensorProto] = (),
    opset: int = 17,
) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "tiny", list(inputs), list(outputs), list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def save(m: onnx.ModelProto, path: Path) -> Path:
    onnx.save(m, path)
    return path


def conv_bn_relu() -> onnx.ModelProto:
    """x(1,3,8,8) → Conv(4 filters 3×3, bias) → BatchNormalization → Relu → y."""
    return model(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"]),
            helper.make_node("BatchNormalization", ["c", "s", "bb", "mu", "var"], ["bn"]),
            helper.make_node("Relu", ["bn"], ["y"]),
        ],
        [tensor("x", [1, 3, 8, 8])],
        [tensor("y", [1, 4, 6, 6])],
        [
            init("w", [4, 3, 3, 3]),
            init("b", [4]),
            init("s", [4]),
            init("bb", [4]),
            init("mu", [4]),
            init("var", [4], 1.0),
        ],
    )


def matmul_add(batch_dims: Sequence[int] = (4,)) -> onnx.ModelProto:
    """x(..., 8) → MatMul(8×16) → Add(bias) → y."""
    return model(
        [
            helper.make_node("MatMul", ["x", "w"], ["mm"]),
            helper.make_node("Add", ["mm", "b"], ["y"]),
        ],
        [tensor("x", [*batch_dims, 8])],
        [tensor("y", [*batch_dims, 16])],
        [init("w", [8, 16]), init("b", [16])],
    )


def gelu() -> onnx.ModelProto:
    """y = x · ½(1 + erf(x/√2)): Div, Erf, Add, Mul, Mul."""
    return model(
        [
            helper.make_node("Div", ["x", "sqrt2"], ["d"]),
            helper.make_node("Erf", ["d"], ["e"]),
            helper.make_node("Add", ["e", "one"], ["a"]),
            helper.make_node("Mul", ["x", "a"], ["m"]),
            helper.make_node("Mul", ["m", "half"], ["y"]),
        ],
        [tensor("x", [2, 16])],
        [tensor("y", [2, 16])],
        [init("sqrt2", [], math.sqrt(2)), init("one", [], 1.0), init("half", [], 0.5)],
    )


def layer_norm() -> onnx.ModelProto:
    """The nine-node decomposed LayerNorm over the last axis of x(2,4,16)."""
    return model(
        [
            helper.make_node("ReduceMean", ["x"], ["mu"], axes=[-1]),
            helper.make_node("Sub", ["x", "mu"], ["d"]),
            helper.make_node("Pow", ["d", "two"], ["p"]),
            helper.make_node("ReduceMean", ["p"], ["v"], axes=[-1]),
            helper.make_node("Add", ["v", "eps"], ["ve"]),
            helper.make_node("Sqrt", ["ve"], ["sd"]),
            helper.make_node("Div", ["d", "sd"], ["n"]),
            helper.make_node("Mul", ["n", "g"], ["ng"]),
            helper.make_node("Add", ["ng", "b"], ["y"]),
        ],
        [tensor("x", [2, 4, 16])],
        [tensor("y", [2, 4, 16])],
        [init("two", [], 2.0), init("eps", [], 1e-5), init("g", [16]), init("b", [16])],
    )


def diamond() -> onnx.ModelProto:
    """x(1,64) → Relu → {Sigmoid, Tanh} → Add → y: two parallel branches."""
    return model(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            helper.make_node("Sigmoid", ["r"], ["s"], name="left"),
            helper.make_node("Tanh", ["r"], ["t"], name="right"),
            helper.make_node("Add", ["s", "t"], ["y"], name="join"),
        ],
        [tensor("x", [1, 64])],
        [tensor("y", [1, 64])],
    )


def string_column(rows: int = 4) -> onnx.ModelProto:
    """A scikit-learn-like tabular model: city (strings, rows×1) → LabelEncoder to upper case
    (`upper`, strings) → LabelEncoder to a code (int64) → Cast → + age (float) → y."""
    nodes = [
        helper.make_node("LabelEncoder", ["city"], ["upper"], name="upper", domain="ai.onnx.ml",
                         keys_strings=["a", "b"], values_strings=["A", "B"], default_string="?"),
        helper.make_node("LabelEncoder", ["upper"], ["code"], name="code", domain="ai.onnx.ml",
                         keys_strings=["A", "B"], values_int64s=[1, 2], default_int64=0),
        helper.make_node("Cast", ["code"], ["code_f"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Add", ["age", "code_f"], ["y"], name="add"),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "string_column",
        [tensor("city", [rows, 1], TensorProto.STRING), tensor("age", [rows, 1])],
        [tensor("y", [rows, 1])],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)
