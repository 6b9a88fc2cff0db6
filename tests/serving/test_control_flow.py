"""Whatever ONNX Runtime runs, Moirai places: where ONNX's checker, its shape inference or the
fusion analysis cannot handle a model, ONNX Runtime's own view is taken, said in one line."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from moirai.devices import local_devices
from moirai.fusion import CPU, fusion_groups
from moirai.graph import build_graph, load_model
from moirai.partition import build_plan
from moirai.planning import plan_model
from moirai.planning.cpu import split_cpu
from moirai.runtime.sequential import run_sequential
from moirai.stageplan import DeviceSpec

SEQ, BATCH, FEATURES, HIDDEN = 5, 2, 8, 16
SHAPES = {"x": [SEQ, BATCH, FEATURES], "h0": [1, BATCH, HIDDEN]}


def stateful(path: Path) -> Path:
    """A recurrent step as exporters write it: x → MatMul → If(first step?) with an LSTM
    from the state h0 in one branch and the state kept in the other → Tanh. The branches'
    outputs carry no shape (ONNX's checker refuses that; ONNX Runtime runs it)."""
    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name)

    lstm = helper.make_node(
        "LSTM", ["xp", "W", "R", "B", "", "h0"], ["", "h_new"], hidden_size=HIDDEN
    )
    then_branch = helper.make_graph(
        [lstm], "step", [], [helper.make_tensor_value_info("h_new", TensorProto.FLOAT, None)]
    )
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["h0"], ["h_kept"])],
        "keep",
        [],
        [helper.make_tensor_value_info("h_kept", TensorProto.FLOAT, None)],
    )
    nodes = [
        helper.make_node("MatMul", ["x", "P"], ["xp"]),
        helper.make_node("If", ["step"], ["h1"], then_branch=then_branch, else_branch=else_branch),
        helper.make_node("Tanh", ["h1"], ["h"]),
    ]
    graph = helper.make_graph(
        nodes,
        "stateful",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["seq", "batch", FEATURES]),
            helper.make_tensor_value_info("step", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, "batch", HIDDEN]),
        ],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, None)],
        initializer=[
            weight("P", FEATURES, FEATURES),
            weight("W", 1, 4 * HIDDEN, FEATURES),
            weight("R", 1, 4 * HIDDEN, HIDDEN),
            weight("B", 1, 8 * HIDDEN),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _inputs(step: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "x": rng.standard_normal(SHAPES["x"]).astype(np.float32),
        "step": np.array(step),
        "h0": rng.standard_normal(SHAPES["h0"]).astype(np.float32),
    }


def test_if_with_an_lstm_that_onnx_runtime_runs_is_placed_and_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = stateful(tmp_path / "stateful.onnx")
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(str(path))
    with caplog.at_level(logging.WARNING):
        planned = plan_model(path, split_cpu(local_devices(), 2), input_shapes=SHAPES, time_limit=2)
    said = [r.getMessage() for r in caplog.records if "checker refuses" in r.getMessage()]
    assert len(said) == 1 and "\n" not in said[0]
    # ONNX cannot shape the If's output; ONNX Runtime can.
    assert build_graph(planned.model).tensors["h"].shape == (1, BATCH, HIDDEN)
    names = [n.name for n in planned.model.graph.node]
    devices = [DeviceSpec("cpu-0", threads=1), DeviceSpec("cpu-1", threads=1)]
    rng = random.Random(0)
    plans = [planned.plan] + [
        build_plan(planned.model, {n: rng.choice(["cpu-0", "cpu-1"]) for n in names}, devices)
        for _ in range(4)
    ]
    for plan in plans:
        for step in (True, False):
            inputs = _inputs(step)
            (want,) = reference.run(None, inputs)
            got = run_sequential(planned.model, plan, inputs)["h"]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_fusions_come_from_onnx_runtimes_own_shapes_where_it_refuses_onnxs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A type ONNX Runtime contradicts (ONNX's inference and ONNX Runtime's, of another ONNX
    version, may disagree) does not stop the fusion analysis: ONNX Runtime is asked again with
    its own types and shapes."""
    model = load_model(stateful(tmp_path / "stateful.onnx"), SHAPES)
    graph = build_graph(model)
    want = fusion_groups(model, graph, [CPU])
    wrong = next(v for v in model.graph.value_info if v.name == "xp")
    wrong.type.tensor_type.elem_type = TensorProto.DOUBLE
    with caplog.at_level(logging.WARNING):
        assert fusion_groups(model, graph, [CPU]) == want
    assert any("with its own shapes it can" in r.getMessage() for r in caplog.records)


def test_a_model_onnx_runtime_cannot_optimise_is_placed_node_by_node(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="first"),
        helper.make_node("Mystery", ["a"], ["b"], name="mystery", domain="example.unknown"),
        helper.make_node("Relu", ["b"], ["y"], name="last"),
    ]
    graph = helper.make_graph(
        nodes,
        "unknown",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("example.unknown", 1)],
    )
    with caplog.at_level(logging.WARNING):
        groups = fusion_groups(model, build_graph(model), [CPU])
    assert [g.ops for g in groups] == [("first",), ("mystery",), ("last",)]
    said = [r.getMessage() for r in caplog.records if "a task of its own" in r.getMessage()]
    assert len(said) == 1 and "\n" not in said[0]
