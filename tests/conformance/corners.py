"""Hand-built graphs for the corners that ONNX's test models reach rarely or never: a model input
that is also an output, an output listed twice, an output also read inside the model, a
`Constant` output, nodes without inputs, empty optional inputs, zero-sized, bool and int64
tensors on the way, string tensors on the way, If/Loop/Scan bodies that read the outer scope (two
scopes up too), an initializer read by nodes far apart, a node that reads one tensor twice."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .cases import Case

OPSET = [helper.make_opsetid("", 17)]


def _model(name, nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=OPSET, ir_version=8)


def _f(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _i(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.INT64, shape)


def _b(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.BOOL, shape)


def passthrough() -> Case:
    """x is an input and an output; y is listed twice; a is an output read by later nodes."""
    model = _model(
        "passthrough",
        [
            helper.make_node("Relu", ["x"], ["a"]),
            helper.make_node("Neg", ["a"], ["b"]),
            helper.make_node("Add", ["a", "b"], ["y"]),
            helper.make_node("Mul", ["y", "y"], ["z"]),
        ],
        [_f("x", [2, 3])],
        [_f("x", [2, 3]), _f("a", [2, 3]), _f("y", [2, 3]), _f("z", [2, 3])],
    )
    x = np.arange(6, dtype=np.float32).reshape(2, 3) - 2
    return Case("corners/passthrough", model, {"x": x})


def constants() -> Case:
    """A Constant that is an output, Constants read by several nodes, a RandomNormal-free node
    without inputs (ConstantOfShape of an initializer), an initializer read at both ends."""
    w = numpy_helper.from_array(np.full((3,), 0.5, np.float32), "w")
    shape = numpy_helper.from_array(np.array([2, 3], np.int64), "shape")
    model = _model(
        "constants",
        [
            helper.make_node(
                "Constant", [], ["c"], value=numpy_helper.from_array(np.float32(2.0), "c")
            ),
            helper.make_node(
                "Constant", [], ["k"], value=numpy_helper.from_array(np.ones(3, np.float32), "k")
            ),
            helper.make_node("ConstantOfShape", ["shape"], ["z0"]),
            helper.make_node("Mul", ["x", "w"], ["m"]),
            helper.make_node("Add", ["m", "c"], ["a"]),
            helper.make_node("Add", ["a", "z0"], ["b"]),
            helper.make_node("Mul", ["b", "k"], ["d"]),
            helper.make_node("Sub", ["d", "w"], ["y"]),
        ],
        [_f("x", [2, 3])],
        [_f("y", [2, 3]), _f("k", [3])],
        [w, shape],
    )
    return Case("corners/constants", model, {"x": np.ones((2, 3), np.float32)})


def types() -> Case:
    """Bool, int64 and zero-sized tensors crossing borders; an empty optional input ("")."""
    model = _model(
        "types",
        [
            helper.make_node("Greater", ["x", "t"], ["mask"]),
            helper.make_node("Not", ["mask"], ["nmask"]),
            helper.make_node("Cast", ["nmask"], ["n64"], to=TensorProto.INT64),
            helper.make_node("ReduceSum", ["n64"], ["count"], keepdims=0),
            helper.make_node("Where", ["mask", "x", "t"], ["w"]),
            helper.make_node("Clip", ["w", "", "hi"], ["clipped"]),
            helper.make_node("Shape", ["x"], ["shape"]),
            helper.make_node("Slice", ["x", "zero", "zero", "zero"], ["empty"]),
            helper.make_node("Concat", ["empty", "empty"], ["empty2"], axis=0),
            helper.make_node("Relu", ["empty2"], ["nothing"]),
        ],
        [_f("x", [3, 4]), _f("t", [3, 4])],
        [_f("clipped", [3, 4]), _i("count", []), _i("shape", [2]), _f("nothing", [0, 4])],
        [
            numpy_helper.from_array(np.float32(0.5), "hi"),
            numpy_helper.from_array(np.array([0], np.int64), "zero"),
        ],
    )
    rng = np.random.default_rng(3)
    inputs = {
        "x": rng.standard_normal((3, 4)).astype(np.float32),
        "t": rng.standard_normal((3, 4)).astype(np.float32),
    }
    return Case("corners/types", model, inputs)


def scopes() -> Case:
    """An If whose branches read outer tensors, a Loop whose body holds an If that reads a
    tensor two scopes up, a Scan that reads an outer tensor; their inputs come from nodes that
    a cut may put elsewhere."""
    then_g = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["then_out"])], "then", [], [_f("then_out", [2])]
    )
    else_g = helper.make_graph(
        [helper.make_node("Sub", ["a", "b"], ["else_out"])], "else", [], [_f("else_out", [2])]
    )
    inner_then = helper.make_graph(
        [helper.make_node("Add", ["acc_in", "b"], ["it"])], "inner_then", [], [_f("it", [2])]
    )
    inner_else = helper.make_graph(
        [helper.make_node("Identity", ["acc_in"], ["ie"])], "inner_else", [], [_f("ie", [2])]
    )
    body = helper.make_graph(
        [
            helper.make_node(
                "If", ["flag"], ["acc_if"], then_branch=inner_then, else_branch=inner_else
            ),
            helper.make_node("Mul", ["acc_if", "a"], ["acc_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [_i("i", []), _b("cond_in", []), _f("acc_in", [2])],
        [_b("cond_out", []), _f("acc_out", [2])],
    )
    scan_body = helper.make_graph(
        [
            helper.make_node("Add", ["s_in", "row"], ["s_sum"]),
            helper.make_node("Mul", ["s_sum", "b"], ["s_out"]),
            helper.make_node("Identity", ["s_out"], ["s_scan"]),
        ],
        "scan_body",
        [_f("s_in", [2]), _f("row", [2])],
        [_f("s_out", [2]), _f("s_scan", [2])],
    )
    model = _model(
        "scopes",
        [
            helper.make_node("Sigmoid", ["x"], ["a"]),
            helper.make_node("Tanh", ["x"], ["b"]),
            helper.make_node("ReduceSum", ["a"], ["sa"], keepdims=0),
            helper.make_node("ReduceSum", ["b"], ["sb"], keepdims=0),
            helper.make_node("Greater", ["sa", "sb"], ["flag"]),
            helper.make_node("If", ["flag"], ["branch"], then_branch=then_g, else_branch=else_g),
            helper.make_node("Loop", ["trips", "", "branch"], ["looped"], body=body),
            helper.make_node("Unsqueeze", ["looped", "axis0"], ["rows0"]),
            helper.make_node("Concat", ["rows0", "rows0", "rows0"], ["rows"], axis=0),
            helper.make_node(
                "Scan",
                ["branch", "rows"],
                ["scanned", "per_row"],
                body=scan_body,
                num_scan_inputs=1,
            ),
            helper.make_node("Add", ["scanned", "looped"], ["y"]),
        ],
        [_f("x", [2])],
        [_f("y", [2]), _f("per_row", [3, 2]), _b("flag", [])],
        [
            numpy_helper.from_array(np.array(3, np.int64), "trips"),
            numpy_helper.from_array(np.array([0], np.int64), "axis0"),
        ],
    )
    return Case("corners/scopes", model, {"x": np.array([0.3, -0.7], np.float32)})


def strings() -> Case:
    """String tensors (OIP BYTES): a string input, strings crossing borders (`upper`) and leaving
    as an output (`same`), an empty string and non-ASCII text, beside a numeric branch that
    reads them (a scikit-learn pipeline's shape: LabelEncoder from the ONNX-ML domain)."""
    nodes = [
        helper.make_node("StringNormalizer", ["words"], ["upper"], case_change_action="UPPER",
                         locale="C"),
        helper.make_node("Identity", ["upper"], ["same"]),
        helper.make_node("LabelEncoder", ["same"], ["code"], domain="ai.onnx.ml",
                         keys_strings=["A", "B"], values_int64s=[1, 2], default_int64=0),
        helper.make_node("Cast", ["code"], ["code_f"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["x", "code_f"], ["y"]),
    ]  # fmt: skip
    words = helper.make_tensor_value_info("words", TensorProto.STRING, [1, 4])
    same = helper.make_tensor_value_info("same", TensorProto.STRING, [1, 4])
    graph = helper.make_graph(nodes, "strings", [words, _f("x", [1, 4])], [same, _f("y", [1, 4])])
    opsets = [*OPSET, helper.make_opsetid("ai.onnx.ml", 3)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=8)
    inputs = {
        "words": np.array([["a", "b", "", "ünïcödé"]], dtype=object),
        "x": np.arange(4, dtype=np.float32).reshape(1, 4),
    }
    return Case("corners/strings", model, inputs)


def cases() -> list[Case]:
    out = [passthrough(), constants(), types(), scopes(), strings()]
    for case in out:
        onnx.checker.check_model(case.model, full_check=True)
    return out
