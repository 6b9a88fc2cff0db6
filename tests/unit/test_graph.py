"""moirai.graph: loading, canonical names, shapes, tensor and weight bytes, one-line errors."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from moirai import zoo
from moirai.errors import ModelError
from moirai.graph import build_graph, canonical_node_names, dynamic_shapes, load_model
from moirai.nodeinputs import node_inputs

from .onnx_patterns import conv_bn_relu, init, model, save, tensor


def _relus(names: list[str]) -> onnx.ModelProto:
    nodes = []
    for i, name in enumerate(names):
        nodes.append(helper.make_node("Relu", [f"t{i}"], [f"t{i + 1}"], name=name))
    n = len(names)
    return model(nodes, [tensor("t0", [1, 4])], [tensor(f"t{n}", [1, 4])])


def _one_line(e: pytest.ExceptionInfo[ModelError]) -> str:
    message = str(e.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------ names
def test_canonical_names_keep_unique_names_and_generate_the_rest() -> None:
    m = _relus(["", "a", "dup", "dup", "", "Relu_0"])
    assert canonical_node_names(m) == ["Relu_0_1", "a", "Relu_2", "Relu_3", "Relu_4", "Relu_0"]


def test_load_model_applies_canonical_names_idempotently(tmp_path: Path) -> None:
    path = save(_relus(["", "dup", "dup"]), tmp_path / "m.onnx")
    loaded = load_model(path)
    names = [n.name for n in loaded.graph.node]
    assert names == ["Relu_0", "Relu_1", "Relu_2"]
    assert canonical_node_names(loaded) == names
    assert [n.name for n in build_graph(loaded).nodes] == names


# ----------------------------------------------------------- bytes, weights
def test_tensor_bytes_and_weight_bytes(tmp_path: Path) -> None:
    graph = build_graph(load_model(save(conv_bn_relu(), tmp_path / "m.onnx")))
    assert graph.inputs == ("x",) and graph.outputs == ("y",)
    assert graph.tensors["x"].nbytes == 1 * 3 * 8 * 8 * 4
    assert graph.tensors["c"].shape == (1, 4, 6, 6)
    assert graph.tensors["c"].nbytes == 4 * 36 * 4
    conv, bn, relu = (n.name for n in graph.nodes)
    assert graph.weight_bytes([conv]) == (4 * 27 + 4) * 4
    assert graph.weight_bytes([bn]) == 4 * 4 * 4
    assert graph.weight_bytes([relu]) == 0
    assert graph.consumers["c"] == (bn,)
    assert graph.producer["bn"] == bn


def test_constant_node_weights_count_where_they_are_used(tmp_path: Path) -> None:
    value = numpy_helper.from_array(np.ones((16, 16), np.float32), "value")
    m = model(
        [
            helper.make_node("Constant", [], ["w"], value=value),
            helper.make_node("MatMul", ["x", "w"], ["y"]),
        ],
        [tensor("x", [2, 16])],
        [tensor("y", [2, 16])],
    )
    graph = build_graph(load_model(save(m, tmp_path / "m.onnx")))
    constant, matmul = graph.nodes
    assert constant.constant and not matmul.constant
    assert graph.tensors["w"].constant
    assert graph.weight_bytes([matmul.name]) == 16 * 16 * 4
    assert graph.weight_bytes([constant.name]) == 0


def test_shape_of_a_static_tensor_is_constant(tmp_path: Path) -> None:
    m = model(
        [
            helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node("Reshape", ["x", "s"], ["y"]),
        ],
        [tensor("x", [2, 3])],
        [tensor("y", [2, 3])],
    )
    shape, reshape = build_graph(load_model(save(m, tmp_path / "m.onnx"))).nodes
    assert shape.constant and not reshape.constant


def test_light_model_weights_are_not_inputs() -> None:
    """IR 3 models list every initializer as an input; only the image stays an input."""
    loaded = load_model(zoo.get("squeezenet"))
    assert [i.name for i in loaded.graph.input] == ["data_0"]
    assert loaded.ir_version >= 4
    graph = build_graph(loaded)
    params = graph.weight_bytes([n.name for n in graph.nodes]) / 4
    assert 1.2e6 < params < 1.3e6  # SqueezeNet 1.0 has 1.24 M parameters


# ------------------------------------------------------------ input shapes
def _symbolic(tmp_path: Path) -> Path:
    m = model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [tensor("x", ["batch", 3, "height", 8])],
        [tensor("y", ["batch", 3, "height", 8])],
    )
    return save(m, tmp_path / "m.onnx")


def test_input_shapes_make_every_tensor_static(tmp_path: Path) -> None:
    loaded = load_model(_symbolic(tmp_path), {"x": [2, 3, 5, 8]})
    graph = build_graph(loaded)
    assert graph.tensors["y"].shape == (2, 3, 5, 8)
    assert graph.tensors["y"].nbytes == 2 * 3 * 5 * 8 * 4


def test_unresolved_dimension_names_input_and_suggests_flag(tmp_path: Path) -> None:
    """The symbolic batch is priced at 1; 'height' has no representative size."""
    with pytest.raises(ModelError) as e:
        load_model(_symbolic(tmp_path))
    message = _one_line(e)
    assert "'x'" in message and "'height'" in message
    assert "--input-shape x=1x3x<height>x8" in message


def test_every_unresolved_input_is_named_in_one_refusal(tmp_path: Path) -> None:
    """PyTorch's exporter with `dynamic_axes` as lists names each input's sequence apart
    (`input_ids_dynamic_axes_2`, `attention_mask_dynamic_axes_2`): the refusal named one input,
    and the next run the other."""
    m = model(
        [helper.make_node("Add", ["ids", "mask"], ["y"], name="add")],
        [
            tensor("ids", ["ids_axis_1", "ids_axis_2"]),
            tensor("mask", ["mask_axis_1", "mask_axis_2"]),
        ],
        [tensor("y", ["ids_axis_1", "ids_axis_2"])],
    )
    path = save(m, tmp_path / "two.onnx")
    with pytest.raises(ModelError) as e:
        load_model(path)
    message = _one_line(e)
    assert "--input-shape ids=1x<ids_axis_2>" in message
    assert "--input-shape mask=1x<mask_axis_2>" in message
    assert build_graph(load_model(path, {"ids_axis_2": [5], "mask_axis_2": [5]})).tensors[
        "y"
    ].shape == (1, 5)


def _batch_only(tmp_path: Path) -> Path:
    """A symbolic batch through a Reshape and a MatMul, to a [batch, 4] output."""
    m = model(
        [
            helper.make_node("Reshape", ["x", "flat"], ["r"]),
            helper.make_node("MatMul", ["r", "w"], ["y"]),
        ],
        [tensor("x", ["N", 2, 3])],
        [tensor("y", ["N", 4])],
        [
            numpy_helper.from_array(np.array([0, 6], np.int64), "flat"),
            numpy_helper.from_array(np.ones((6, 4), np.float32), "w"),
        ],
    )
    return save(m, tmp_path / "b.onnx")


def test_symbolic_batch_is_priced_at_one(tmp_path: Path) -> None:
    graph = build_graph(load_model(_batch_only(tmp_path)))
    assert graph.tensors["x"].shape == (1, 2, 3)
    assert graph.tensors["y"].shape == (1, 4)


def test_given_shape_prices_another_batch(tmp_path: Path) -> None:
    graph = build_graph(load_model(_batch_only(tmp_path), {"x": [8, 2, 3]}))
    assert graph.tensors["r"].shape == (8, 6)


def test_symbolic_load_keeps_the_file_s_dimensions(tmp_path: Path) -> None:
    loaded = load_model(_batch_only(tmp_path), symbolic=True)
    dims = loaded.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "N" and [d.dim_value for d in dims[1:]] == [2, 3]
    assert [n.name for n in loaded.graph.node] == ["Reshape_0", "MatMul_1"]
    with pytest.raises(ValueError):
        load_model(_batch_only(tmp_path), {"x": [1, 2, 3]}, symbolic=True)


def test_a_dimension_written_as_minus_one_is_open(tmp_path: Path) -> None:
    """PaddlePaddle writes an open dimension as the value -1 (PP-OCR's classifier takes
    [-1, 3, '?', '?']), which ONNX Runtime reads as open: `--input-shape x=1x2x3` was refused
    with "dimension 0 is fixed at -1 in the model"."""
    path = _batch_only(tmp_path)
    m = onnx.load(path)
    for value in (m.graph.input[0], m.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = -1
    onnx.save(m, path)
    assert build_graph(load_model(path, {"x": [8, 2, 3]})).tensors["r"].shape == (8, 6)
    assert build_graph(load_model(path)).tensors["y"].shape == (1, 4)  # priced at 1
    assert dynamic_shapes(path)["x"] == (-1, 2, 3)
    assert dynamic_shapes(path)["y"] == (-1, 4)
    served = load_model(path, symbolic=True).graph.input[0].type.tensor_type.shape.dim
    assert not served[0].HasField("dim_value")


def test_input_shapes_the_operators_cannot_take_are_refused_naming_the_node(
    tmp_path: Path,
) -> None:
    """A Concat that joins the input with a 4-wide constant takes only width 4: `x=1x5` went
    on to a profile that could not run it (a YOLO detector at 33x47); now it is refused in
    ONNX's words. A width the Concat takes loads."""
    m = model(
        [helper.make_node("Concat", ["x", "c"], ["y"], name="join", axis=0)],
        [tensor("x", ["N", "W"])],
        [tensor("y", ["M", "W"])],
        [numpy_helper.from_array(np.ones((1, 4), np.float32), "c")],
    )
    path = save(m, tmp_path / "join.onnx")
    with pytest.raises(ModelError) as e:
        load_model(path, {"x": [1, 5]})
    message = _one_line(e)
    assert "cannot run at --input-shape x=1x5" in message and "join" in message
    assert build_graph(load_model(path, {"x": [2, 4]})).tensors["y"].shape == (3, 4)


def test_a_sequence_longer_than_the_position_table_is_refused(tmp_path: Path) -> None:
    """PyTorch's export of a CLIP text encoder: the 77 position embeddings are sliced to the
    sequence length by a `Shape` chain that ONNX's inference leaves open, and added to the
    tokens' embeddings. `sequence=128` went on, warned of in every step, to a plan priced at a
    size no session can run; now it is refused naming the Add. A length the table holds loads."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "one"], ["length"], axis=0),
        helper.make_node("Unsqueeze", ["length", "axis0"], ["end"]),
        helper.make_node("Slice", ["table", "axis0", "end", "axis1"], ["positions"]),
        helper.make_node("Unsqueeze", ["x", "axis2"], ["x3"]),
        helper.make_node("Add", ["x3", "positions"], ["y"], name="embed"),
    ]
    m = model(
        nodes,
        [tensor("x", ["batch", "sequence"])],
        [tensor("y", ["batch", "sequence", 4])],
        [
            numpy_helper.from_array(np.ones((1, 77, 4), np.float32), "table"),
            numpy_helper.from_array(np.array(1, np.int64), "one"),
            numpy_helper.from_array(np.array([0], np.int64), "axis0"),
            numpy_helper.from_array(np.array([1], np.int64), "axis1"),
            numpy_helper.from_array(np.array([2], np.int64), "axis2"),
        ],
    )
    path = save(m, tmp_path / "positions.onnx")
    with pytest.raises(ModelError) as e:
        load_model(path, {"sequence": [128]})
    message = _one_line(e)
    assert "cannot run at --input-shape sequence=128" in message and "(embed)" in message
    assert build_graph(load_model(path, {"sequence": [64]})).tensors["y"].shape == (1, 64, 4)


def test_a_zipmap_output_leaves_the_other_tensors_shaped(caplog: pytest.LogCaptureFixture) -> None:
    """ONNX Runtime's own example of a scikit-learn classifier: its probabilities leave as a
    ZipMap's sequence of maps, which has no shape to measure. Measuring it made the probe fail
    for every tensor, and planning then stopped on 'probability_tensor_normalized has no type'
    instead of on the sequence that serving cannot carry."""
    from onnxruntime.datasets import get_example

    graph = build_graph(load_model(get_example("logreg_iris.onnx")))
    assert graph.tensors["probability_tensor_normalized"].shape == (3, 3)
    assert "could not shape" not in caplog.text


def test_a_symbolic_dimension_is_sized_by_name_for_every_input(tmp_path: Path) -> None:
    """A transformer's inputs share their sequence dimensions (a decoder's cache inputs, one
    `past` each): `--input-shape seq=5` sizes it in every input that has it, where each input
    had to be given whole, one refusal at a time."""
    m = model(
        [helper.make_node("Concat", ["a", "b"], ["y"], name="join", axis=1)],
        [tensor("a", ["N", "seq", 4]), tensor("b", ["N", "past", 4])],
        [tensor("y", ["N", "total", 4])],
    )
    path = save(m, tmp_path / "kv.onnx")
    with pytest.raises(ModelError) as e:
        load_model(path)
    assert "--input-shape seq=SIZE for every input that has it" in _one_line(e)
    graph = build_graph(load_model(path, {"seq": [5], "past": [3]}))
    assert graph.tensors["a"].shape == (1, 5, 4) and graph.tensors["y"].shape == (1, 8, 4)
    graph = build_graph(load_model(path, {"past": [3], "a": [2, 7, 4], "N": [2]}))
    assert graph.tensors["y"].shape == (2, 10, 4)  # an input given whole keeps its shape
    with pytest.raises(ModelError, match=r"give its size as one positive integer, e\.g\. seq=128"):
        load_model(path, {"seq": [1, 5], "past": [3]})
    with pytest.raises(ModelError, match="its symbolic dimensions N, past, seq"):
        load_model(path, {"nope": [1]})


def test_dynamic_shapes_mark_what_varies_with_the_batch(tmp_path: Path) -> None:
    shapes = dynamic_shapes(_batch_only(tmp_path))
    assert shapes["x"] == (-1, 2, 3)
    assert shapes["r"] == (-1, 6)
    assert shapes["y"] == (-1, 4)


def test_dynamic_shapes_of_a_static_model_are_static(tmp_path: Path) -> None:
    shapes = dynamic_shapes(save(_relus(["a"]), tmp_path / "s.onnx"))
    assert shapes and all(-1 not in shape for shape in shapes.values())


def test_dynamic_shapes_mark_sizes_that_come_from_input_values(tmp_path: Path) -> None:
    """Every input dimension is fixed, but the Reshape's target is an input: its output's
    dimensions vary with what a client sends (node/test_center_crop_pad_pad_expanded)."""
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["x", "shape"], ["y"]),
            helper.make_node("Relu", ["y"], ["z"]),
        ],
        "reshape_by_input",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
    )
    path = save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "r.onnx"
    )
    shapes = dynamic_shapes(path)
    assert shapes["x"] == (2, 6)
    assert shapes.get("y", (-1, -1)) == (-1, -1)


def test_unknown_input_name_lists_the_real_inputs(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as e:
        load_model(_symbolic(tmp_path), {"images": [1, 3, 4, 8]})
    message = _one_line(e)
    assert "'images'" in message and "inputs are x" in message


def test_light_model_inputs_exclude_initializers_in_the_error() -> None:
    with pytest.raises(ModelError, match=r"inputs are data_0$"):
        load_model(zoo.get("squeezenet"), {"conv1_w_0": [1]})


@pytest.mark.parametrize(
    ("shape", "needle"),
    [
        ([2, 3, 5], "rank 4"),
        ([2, 4, 5, 8], "dimension 1 is fixed at 3"),
        ([0, 3, 5, 8], "positive"),
    ],
)
def test_contradicting_input_shapes(tmp_path: Path, shape: list[int], needle: str) -> None:
    with pytest.raises(ModelError) as e:
        load_model(_symbolic(tmp_path), {"x": shape})
    assert needle in _one_line(e)


# ------------------------------------------------------------- bad files
def test_truncated_model_is_one_line_model_error(tmp_path: Path) -> None:
    whole = conv_bn_relu().SerializeToString()
    for cut in (len(whole) // 3, len(whole) // 2, len(whole) - 7):
        path = tmp_path / f"cut{cut}.onnx"
        path.write_bytes(whole[:cut])
        with pytest.raises(ModelError) as e:
            load_model(path)
        assert str(path) in _one_line(e)


def test_missing_and_garbage_files(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such ONNX file"):
        load_model(tmp_path / "absent.onnx")
    (tmp_path / "text.onnx").write_text("this is not a model\n" * 10)
    with pytest.raises(ModelError, match=r"not a valid ONNX model|invalid ONNX model"):
        load_model(tmp_path / "text.onnx")


def test_invalid_graph_is_model_error(tmp_path: Path) -> None:
    m = model(
        [helper.make_node("Relu", ["nowhere"], ["y"])],
        [tensor("x", [1])],
        [tensor("y", [1])],
    )
    with pytest.raises(ModelError, match="invalid ONNX model"):
        load_model(save(m, tmp_path / "m.onnx"))


def test_missing_external_data_is_model_error(tmp_path: Path) -> None:
    m = model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [tensor("x", [1, 256])],
        [tensor("y", [1, 256])],
        [init("w", [256, 256])],
    )
    onnx.save(m, tmp_path / "m.onnx", save_as_external_data=True, location="m.data")
    (tmp_path / "m.data").unlink()
    with pytest.raises(ModelError) as e:
        load_model(tmp_path / "m.onnx")
    assert "m.onnx" in _one_line(e)


def test_integer_tensors_use_their_itemsize(tmp_path: Path) -> None:
    m = model(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.INT64)],
        [tensor("x", [3, 5])],
        [tensor("y", [3, 5], TensorProto.INT64)],
    )
    graph = build_graph(load_model(save(m, tmp_path / "m.onnx")))
    assert graph.tensors["x"].nbytes == 60 and graph.tensors["y"].nbytes == 120


def test_onnx_runtime_shapes_contrib_and_data_dependent_outputs(tmp_path: Path) -> None:
    m = model(
        [
            helper.make_node("Gelu", ["x"], ["g"], domain="com.microsoft"),
            helper.make_node("Relu", ["g"], ["r"]),
            helper.make_node("NonZero", ["x"], ["nz"]),
            helper.make_node("Transpose", ["nz"], ["y"]),
        ],
        [tensor("x", [2, 3])],
        [tensor("r", [2, 3]), tensor("y", ["n", 2], TensorProto.INT64)],
    )
    m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    graph = build_graph(load_model(save(m, tmp_path / "m.onnx")))
    assert graph.tensors["g"].shape == (2, 3)  # ONNX knows no com.microsoft.Gelu
    assert graph.tensors["nz"].shape == (2, 0)  # measured: zero inputs have no non-zeros
    assert graph.tensors["y"].shape == (0, 2)
    assert not graph.unknown_shapes


def test_shapes_computed_from_shape_chains_are_resolved(tmp_path: Path) -> None:
    """Reshape(x, Concat(Gather(Shape(x), 0), -1)): known only once the chain is evaluated."""
    m = model(
        [
            helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node("Gather", ["s", "zero"], ["b"], axis=0),
            helper.make_node("Concat", ["b", "minus_one"], ["target"], axis=0),
            helper.make_node("Reshape", ["x", "target"], ["r"]),
            helper.make_node("Relu", ["r"], ["y"]),
        ],
        [tensor("x", ["n", 3, 4])],
        [tensor("y", ["n", "m"])],
        [
            numpy_helper.from_array(np.array([0], np.int64), "zero"),
            numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
        ],
    )
    graph = build_graph(load_model(save(m, tmp_path / "m.onnx"), {"x": [2, 3, 4]}))
    assert graph.tensors["r"].shape == (2, 12) and graph.tensors["y"].nbytes == 2 * 12 * 4
    assert not graph.unknown_shapes


def test_a_rank_that_the_input_values_decide_is_left_unknown(tmp_path: Path) -> None:
    """ReduceSum over axes that an input gives: the zero-filled probe reduces over [0, 0], one
    axis, where [0, 1] reduces two, so the probe's rank is no rank at all
    (node/test_reduce_log_sum_asc_axes_expanded)."""
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=0),
            helper.make_node("Log", ["s"], ["y"]),
        ],
        "reduce_by_input",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4, 5]),
            helper.make_tensor_value_info("axes", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    loaded = load_model(save(model, tmp_path / "r.onnx"))
    shaped = {v.name for v in loaded.graph.value_info if v.type.tensor_type.HasField("shape")}
    assert "s" not in shaped


def test_a_loop_output_is_measured_not_taken_for_a_scalar(tmp_path: Path) -> None:
    """ONNX Runtime types a Loop's output as shape [], which is also a scalar's: the probe
    measures it (corners/scopes in tests/conformance)."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["c"], ["c_out"]),
            helper.make_node("Add", ["acc", "x"], ["acc_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, None),
        ],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Loop", ["n", "", "x"], ["looped"], body=body),
            helper.make_node("Relu", ["looped"], ["y"]),
        ],
        "loop",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        initializer=[numpy_helper.from_array(np.array(2, np.int64), "n")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    loaded = load_model(save(model, tmp_path / "l.onnx"))
    shapes = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in loaded.graph.value_info
    }
    assert shapes["looped"] == [2, 3]


@pytest.mark.parametrize(
    ("nodes", "outputs", "says"),
    [
        ([helper.make_node("Relu", ["x"], ["y"])], [], "the model has no outputs"),
        ([], [tensor("x", [1, 4])], "the model has no nodes: nothing to place or serve"),
    ],
    ids=["no-outputs", "no-nodes"],
)
def test_a_model_with_nothing_to_compute_is_refused(
    tmp_path: Path, nodes: list, outputs: list, says: str
) -> None:
    """Without outputs, `moirai serve` planned no stage and died in an IndexError; without
    nodes, the error spoke of the cost graph's tasks."""
    path = save(model(nodes, [tensor("x", [1, 4])], outputs), tmp_path / "m.onnx")
    for symbolic in (False, True):
        with pytest.raises(ModelError, match=f"^{re.escape(str(path))}: {says}"):
            load_model(path, symbolic=symbolic)


# ------------------------------------------------------------------ what a node reads
def test_node_inputs_include_what_nested_subgraphs_read_from_outside() -> None:
    """A Loop whose body holds an If: the If's branch reads `outer` (from outside the Loop) and
    `carried` (the body's own input) and `inner` (made earlier in the body); only `outer` is
    read from the Loop's scope. Empty optional inputs are left out, repeats read once."""
    then_branch = helper.make_graph(
        [
            helper.make_node("Add", ["outer", "inner"], ["t"]),
            helper.make_node("Add", ["t", "carried"], ["r"]),
        ],
        "then",
        [],
        [tensor("r", [1])],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["outer"], ["r2"])], "else", [], [tensor("r2", [1])]
    )
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["carried"], ["inner"]),
            helper.make_node(
                "If", ["cond_in"], ["out"], then_branch=then_branch, else_branch=else_branch
            ),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            tensor("i", [], TensorProto.INT64),
            tensor("cond_in", [], TensorProto.BOOL),
            tensor("carried", [1]),
        ],
        [tensor("cond_out", [], TensorProto.BOOL), tensor("out", [1])],
    )
    loop = helper.make_node("Loop", ["trips", "", "x"], ["y"], body=body)
    assert node_inputs(loop) == ["trips", "x", "outer"]
    assert node_inputs(helper.make_node("Add", ["a", "a"], ["b"])) == ["a"]
