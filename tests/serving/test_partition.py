"""The stage plan: random placements reproduce the whole model; the plan's structure holds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conformance.check import check_structure
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moirai import zoo
from moirai.errors import ModelError, MoiraiError
from moirai.graph import dynamic_shapes, load_model
from moirai.partition import build_plan
from moirai.runtime.daemon import peer_addresses
from moirai.runtime.sequential import run_sequential
from moirai.stagecut import extract_stage
from moirai.stageplan import DeviceSpec, PlanError, StagePlan

from . import models

DEVICES = [
    DeviceSpec("cpu-0", threads=1),
    DeviceSpec("cpu-1", threads=1),
    DeviceSpec("gpu-0", "gpu"),
]
MODELS = {"mlp": models.mlp(), "branchy": models.branchy(), "gather": models.gather()}


def reference(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in model.graph.output], session.run(None, inputs), strict=True))


@pytest.mark.parametrize("name", sorted(MODELS))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_placements_reproduce_the_model(name: str, data: st.DataObject) -> None:
    model = MODELS[name]
    devices = DEVICES[: data.draw(st.integers(1, len(DEVICES)), label="devices")]
    assignment = {
        n.name: data.draw(st.sampled_from([d.name for d in devices]), label=n.name)
        for n in model.graph.node
    }
    cpu_only = [DeviceSpec(d.name, "cpu", threads=1) for d in devices]  # run everything here
    # Any schedule: start times only order the nodes (within the data flow), and decide cuts.
    start_ms = {n: data.draw(st.floats(0, 10), label=f"start {n}") for n in assignment}
    plan = build_plan(model, assignment, cpu_only, start_ms=start_ms)
    check_structure(plan, name, model)
    assert StagePlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    inputs = models.random_inputs(model, seed=data.draw(st.integers(0, 100), label="seed"))
    want = reference(model, inputs)
    got = run_sequential(model, plan, inputs)
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-6, err_msg=k)


def test_groups_and_schedule_make_maximal_stages() -> None:
    """Independent groups on one device share a stage; a return to a device opens a new one."""
    model = models.branchy()
    names = [n.name for n in model.graph.node]
    # Everything on cpu-0 except the If, which depends on cpu-0's work and feeds it again.
    assignment = {n: "cpu-0" for n in names}
    assignment["If_9"] = "cpu-1"
    plan = build_plan(model, assignment, DEVICES[:2])
    assert [s.device for s in plan.stages] == ["cpu-0", "cpu-1", "cpu-0"]
    groups = {"g0": names[:5], "g1": names[5:]}
    plan = build_plan(model, {"g0": "cpu-0", "g1": "cpu-1"}, DEVICES[:2], groups=groups)
    assert [s.device for s in plan.stages] == ["cpu-0", "cpu-1"]
    # Constant_1 feeds both stages: it is copied, not shipped.
    assert all("Constant_1" in s.nodes for s in plan.stages)
    assert "c" not in plan.routing


def _fork_join() -> onnx.ModelProto:
    """x → a → a2 → y = a2 + b, and x → b: two branches and a join."""
    spec = (onnx.TensorProto.FLOAT, [2, 4])
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Relu", ["x"], ["a"], name="a"),
            onnx.helper.make_node("Tanh", ["a"], ["a2"], name="a2"),
            onnx.helper.make_node("Sigmoid", ["x"], ["b"], name="b"),
            onnx.helper.make_node("Add", ["a2", "b"], ["y"], name="join"),
        ],
        "fork_join",
        [onnx.helper.make_tensor_value_info("x", *spec)],
        [onnx.helper.make_tensor_value_info("y", *spec)],
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


def test_a_group_waiting_for_another_device_starts_a_stage() -> None:
    """The join waits for b, which cpu-1 computes; the branch on cpu-0 does not: they are two
    stages, so cpu-0's branch runs while cpu-1 computes b, as scheduled."""
    model = _fork_join()
    assignment = {"a": "cpu-0", "a2": "cpu-0", "b": "cpu-1", "join": "cpu-0"}
    plan = build_plan(model, assignment, DEVICES[:2], start_ms={"a": 0, "b": 0, "a2": 1, "join": 3})
    assert [(s.device, s.nodes) for s in plan.stages] == [
        ("cpu-0", ("a", "a2")),
        ("cpu-1", ("b",)),
        ("cpu-0", ("join",)),
    ]
    assert plan.stages[0].inputs == ("x",) and set(plan.stages[2].inputs) == {"a2", "b"}


def test_a_stage_ends_where_another_device_reads_from_it() -> None:
    """cpu-1 reads a as soon as cpu-0 has it; b, which cpu-0 computes next, is a stage of its
    own, so a goes out without waiting for b. The join waits for b, which cpu-1's first stage
    did not: a stage of its own too."""
    model = _fork_join()
    assignment = {"a": "cpu-0", "a2": "cpu-1", "b": "cpu-0", "join": "cpu-1"}
    plan = build_plan(model, assignment, DEVICES[:2], start_ms={"a": 0, "a2": 1, "b": 1, "join": 3})
    assert [(s.device, s.nodes) for s in plan.stages] == [
        ("cpu-0", ("a",)),
        ("cpu-1", ("a2",)),
        ("cpu-0", ("b",)),
        ("cpu-1", ("join",)),
    ]
    # Without a schedule that asks for it, a device's groups stay together.
    together = build_plan(
        model, {**assignment, "a2": "cpu-0"}, DEVICES[:2], start_ms={"a": 0, "a2": 1, "b": 2}
    )
    assert [(s.device, s.nodes) for s in together.stages] == [
        ("cpu-0", ("a", "a2", "b")),
        ("cpu-1", ("join",)),
    ]


def test_dead_nodes_and_uncovered_nodes() -> None:
    model = models.branchy()
    names = [n.name for n in model.graph.node]
    # Only the first MatMul is placed; the rest follows its consumers.
    plan = build_plan(model, {"MatMul_0": "cpu-1"}, DEVICES[:2])
    nodes = [n for s in plan.stages for n in s.nodes]
    assert "Sigmoid_6" not in nodes  # dead code
    assert plan.stages[0].device in ("cpu-0", "cpu-1")
    assert set(nodes) == set(names) - {"Sigmoid_6"}


def test_extract_stage_refuses_a_foreign_model() -> None:
    plan = build_plan(MODELS["mlp"], {n.name: "cpu-0" for n in MODELS["mlp"].graph.node}, DEVICES)
    with pytest.raises(PlanError, match="made for another model"):
        extract_stage(MODELS["gather"], plan, "s0")


def test_sub_models_carry_only_their_initializers() -> None:
    model = MODELS["mlp"]
    nodes = [n.name for n in model.graph.node]
    half = len(nodes) // 2
    assignment = {n: ("cpu-0" if i < half else "cpu-1") for i, n in enumerate(nodes)}
    plan = build_plan(model, assignment, DEVICES[:2])
    first, second = (extract_stage(model, plan, s.id) for s in plan.stages)
    assert {i.name for i in first.graph.initializer} == {"w0", "b0", "w1", "b1", "w2", "b2"}
    assert {i.name for i in second.graph.initializer} == {"w3", "b3", "w4", "b4", "w5", "b5"}
    onnx.checker.check_model(first)


def test_bad_assignments_are_reported() -> None:
    model = MODELS["mlp"]
    with pytest.raises(ModelError, match="lacks"):
        build_plan(model, {"g": "cpu-0"}, DEVICES, groups={"g": ["Nope"]})
    with pytest.raises(Exception, match="unknown device"):
        build_plan(model, {n.name: "tpu-9" for n in model.graph.node}, DEVICES)
    with pytest.raises(PlanError, match="format"):
        StagePlan.from_dict({"format": "nope"})


def _mlp_plan() -> StagePlan:
    model = MODELS["mlp"]
    nodes = [n.name for n in model.graph.node]
    assignment = {n: ("cpu-0" if i < len(nodes) // 2 else "cpu-1") for i, n in enumerate(nodes)}
    return build_plan(model, assignment, DEVICES[:2])


@pytest.mark.parametrize("where", ["inputs", "outputs", "tensors"])
def test_a_datatype_oip_does_not_know_is_refused_on_load(where: str) -> None:
    """A plan saying FP8 used to start a gateway that could decode no request."""
    data = _mlp_plan().to_dict()
    tensor = data[where][0] if where != "tensors" else next(iter(data[where].values()))
    name = tensor.get("name") or next(iter(data[where]))
    tensor["datatype"] = "FP8"
    with pytest.raises(PlanError, match=rf"tensor '{name}' has datatype 'FP8': use one of BOOL"):
        StagePlan.from_dict(json.loads(json.dumps(data)), "plan.json")


def test_a_device_without_prepacking_keeps_it_through_the_file() -> None:
    data = _mlp_plan().to_dict()
    assert "prepack" not in data["devices"][0]  # the default, as older plans read
    data["devices"][0]["prepack"] = False
    plan = StagePlan.from_dict(json.loads(json.dumps(data)), "plan.json")
    assert [d.prepack for d in plan.devices[:2]] == [False, True]
    assert StagePlan.from_dict(plan.to_dict()).devices == plan.devices
    data["devices"][0]["prepack"] = "no"
    with pytest.raises(PlanError, match="prepack must be true or false, not 'no'"):
        StagePlan.from_dict(data, "plan.json")


def test_peer_addresses_name_plan_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    """An address for a device the plan lacks went nowhere, and a number passed as str(v)."""
    plan = _mlp_plan()
    monkeypatch.setenv("MOIRAI_PEERS", '{"cpu-0": "h:1"}')
    assert peer_addresses(plan, ["cpu-1=h:2"]) == {"cpu-0": "h:1", "cpu-1": "h:2"}
    with pytest.raises(MoiraiError, match=r"--peer 'cpu-9=h:3': the plan has no device 'cpu-9'"):
        peer_addresses(plan, ["cpu-9=h:3"])
    monkeypatch.setenv("MOIRAI_PEERS", '{"cpu-0": 5}')
    with pytest.raises(MoiraiError, match=r"MOIRAI_PEERS\['cpu-0'\] is 5: give a 'host:port'"):
        peer_addresses(plan, [])
    monkeypatch.setenv("MOIRAI_PEERS", '{"cpu-9": "h:1"}')
    with pytest.raises(MoiraiError, match=r"MOIRAI_PEERS\['cpu-9'\]: the plan has no device"):
        peer_addresses(plan, [])


# ------------------------------------------------------------- dynamic shapes
def test_a_symbolic_model_s_plan_leaves_its_dimensions_open() -> None:
    """Types from a symbolically shaped model: -1 wherever a dimension is not fixed, and the
    cut sub-models run at any batch and image size, as the whole model does."""
    model = models.cnn()
    nodes = [n.name for n in model.graph.node]
    plan = build_plan(model, {n: f"cpu-{i // 4}" for i, n in enumerate(nodes)}, DEVICES[:2])
    assert plan.inputs[0].shape == (-1, 3, -1, -1)
    assert plan.spec("probs").shape == (-1, 10)
    assert [t.shape for t in plan.tensors.values()] == [(-1, 16, -1, -1)]  # c1, the border
    rng = np.random.default_rng(0)
    for shape in [(1, 3, 8, 8), (4, 3, 8, 8), (3, 3, 5, 7)]:
        inputs = {"images": rng.standard_normal(shape).astype(np.float32)}
        want = reference(model, inputs)
        got = run_sequential(model, plan, inputs)
        for k, v in want.items():
            np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-6, err_msg=k)


def test_dynamic_shapes_open_a_statically_loaded_plan(tmp_path: Path) -> None:
    """The planning view is static (priced at batch 1, 8×8 here); `dynamic` opens what varies,
    and a stage cut from the symbolic load accepts batch 4."""
    path = tmp_path / "cnn.onnx"
    onnx.save(models.cnn(), path)
    static = load_model(path, {"images": [1, 3, 8, 8]})
    nodes = [n.name for n in static.graph.node]
    assignment = {n: f"cpu-{i // 4}" for i, n in enumerate(nodes)}
    plan = build_plan(static, assignment, DEVICES[:2], dynamic=dynamic_shapes(path))
    assert plan.inputs[0].shape == (-1, 3, -1, -1)
    assert plan.outputs[0].shape == (-1, 10)
    assert build_plan(static, assignment, DEVICES[:2]).inputs[0].shape == (1, 3, 8, 8)
    images = np.random.default_rng(1).standard_normal((4, 3, 8, 8)).astype(np.float32)
    got = run_sequential(load_model(path, symbolic=True), plan, {"images": images})
    np.testing.assert_allclose(
        got["probs"], reference(models.cnn(), {"images": images})["probs"], rtol=1e-5, atol=1e-6
    )


def test_stages_compute_the_bits_of_the_whole_model(tmp_path: Path) -> None:
    """A stage's border keeps the model's dimension names (`batch`), so ONNX Runtime runs a
    stage as it runs the whole model: a dynamically quantised BERT, whose quantisation turns
    rounding differences into visible ones (0.09 on the full-size model), gives the same bits
    at batch 2, whole and split in two."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    float_path, path = tmp_path / "bert.onnx", tmp_path / "bert-q8.onnx"
    onnx.save(zoo.bert_encoder(layers=1, hidden=64, heads=2, seq=16, vocab=100), float_path)
    quantize_dynamic(float_path, path, weight_type=QuantType.QInt8)
    static = load_model(path)
    nodes = [n.name for n in static.graph.node]
    rng = np.random.default_rng(0)
    inputs = {
        "input_ids": rng.integers(0, 100, (2, 16)).astype(np.int64),
        "attention_mask": np.ones((2, 16), np.int64),
    }
    want = reference(onnx.load(path), inputs)
    for cut in (len(nodes), len(nodes) // 2):
        assignment = {n: "cpu-0" if i < cut else "cpu-1" for i, n in enumerate(nodes)}
        plan = build_plan(static, assignment, DEVICES[:2], dynamic=dynamic_shapes(path))
        assert plan.inputs[0].shape == (-1, 16)
        got = run_sequential(load_model(path, symbolic=True), plan, inputs)
        np.testing.assert_array_equal(got["last_hidden_state"], want["last_hidden_state"])


def test_a_training_mode_dropout_at_a_border_computes_what_the_whole_model_does() -> None:
    """A PyTorch module exported without `.eval()` keeps its Dropouts in training mode, which
    ONNX Runtime's optimised session of the whole model removes, but not where the Dropout's
    output leaves the graph: a stage ending at one zeroed half its values at random (a BERT
    served 3.5 away from in-process ONNX Runtime). Cut there, it is an identity as in the whole
    model, every call alike; the model's own output Dropout stays as ONNX Runtime runs it."""
    from onnx import helper, numpy_helper

    def constant(name: str, value: np.ndarray) -> onnx.NodeProto:
        return helper.make_node(
            "Constant", [], [name], name=name, value=numpy_helper.from_array(value)
        )

    nodes = [
        constant("ratio", np.array(0.5, np.float32)),
        constant("training", np.array(True)),
        helper.make_node("MatMul", ["x", "w"], ["h0"], name="project"),
        helper.make_node("Dropout", ["h0", "ratio", "training"], ["h"], name="drop"),
        helper.make_node("Relu", ["h"], ["y"], name="act"),
    ]
    value = (onnx.TensorProto.FLOAT, [1, 256])
    graph = helper.make_graph(
        nodes,
        "dropout",
        [helper.make_tensor_value_info("x", *value)],
        [helper.make_tensor_value_info("y", *value)],
        [numpy_helper.from_array(np.eye(256, dtype=np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    inputs = {"x": np.ones((1, 256), np.float32)}
    want = reference(model, inputs)["y"]
    np.testing.assert_array_equal(want, inputs["x"])  # the whole model's session drops it
    assignment = {"project": "cpu-0", "drop": "cpu-0", "act": "cpu-1"}
    plan = build_plan(model, assignment, DEVICES[:2])
    assert [s.outputs for s in plan.stages] == [("h",), ("y",)]
    for _ in range(2):
        np.testing.assert_array_equal(run_sequential(model, plan, inputs)["y"], want)
    model.graph.output.append(helper.make_tensor_value_info("h", *value))
    whole = build_plan(model, dict.fromkeys(assignment, "cpu-0"), DEVICES)
    dropout = [n for n in extract_stage(model, whole, "s0").graph.node if n.op_type == "Dropout"]
    assert list(dropout[0].input) == ["h0", "ratio", "training"]


def _resize_to_a_computed_size() -> onnx.ModelProto:
    """The shape of RAFT's upsampling as `torch.onnx.export` writes it (torchvision raft_small):
    Resize's `sizes` is a Concat of the input's first two dimensions, sliced from the Shape of a
    tensor that an Expand to a ConstantOfShape made. ONNX's shape inference sees that tensor's
    rank, and so the slice's length (2), only when it propagates the values of shape tensors."""
    from onnx import TensorProto, helper, numpy_helper

    const = [
        numpy_helper.from_array(np.array(v, np.int64), name)
        for name, v in [("zero", [0]), ("two", [2]), ("hw", [4, 4])]
    ]
    nodes = [
        helper.make_node("Shape", ["x"], ["x_shape"], "shape"),
        helper.make_node("Shape", ["x_shape"], ["rank"], "rank"),
        helper.make_node(
            "ConstantOfShape", ["rank"], ["ones"], "ones",
            value=numpy_helper.from_array(np.array([1], np.int64)),
        ),
        helper.make_node("Expand", ["x", "ones"], ["e"], "expand"),
        helper.make_node("Shape", ["e"], ["e_shape"], "e_shape"),
        helper.make_node("Slice", ["e_shape", "zero", "two"], ["nc"], "slice"),
        helper.make_node("Concat", ["nc", "hw"], ["sizes"], "concat", axis=0),
        helper.make_node("Resize", ["e", "", "", "sizes"], ["y"], "resize", mode="linear"),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "resize_to_computed_size",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, 4, 4])],
        initializer=const,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_cut_before_a_resize_keeps_the_length_of_its_computed_sizes(tmp_path: Path) -> None:
    """Cut between the Slice and the Concat of Resize's `sizes`, the slice crosses the border.
    Typed with a length of -1 there, ONNX Runtime refused the second stage ("Number of elements
    of input 'sizes' (0) must be same as rank of input 'X' (4)"): the plan of torchvision's
    raft_small cut so could not be served. Its length is 2 whatever the batch."""
    model = _resize_to_a_computed_size()
    path = tmp_path / "resize.onnx"
    onnx.save(model, path)
    static = load_model(path)
    names = [n.name for n in static.graph.node]
    cut = names.index("concat")
    assignment = {n: "cpu-0" if i < cut else "cpu-1" for i, n in enumerate(names)}
    plan = build_plan(static, assignment, DEVICES[:2], dynamic=dynamic_shapes(path))
    assert sorted(plan.stage("s1").inputs) == ["e", "nc"]
    assert plan.spec("nc").shape == (2,)
    assert plan.spec("e").shape == (-1, 3, 8, 8)
    for batch in (1, 3):
        inputs = {"x": np.random.default_rng(batch).random((batch, 3, 8, 8), np.float32)}
        got = run_sequential(load_model(path, symbolic=True), plan, inputs)
        np.testing.assert_array_equal(got["y"], reference(model, inputs)["y"])


def test_an_initializer_that_is_a_model_output_is_served(tmp_path: Path) -> None:
    """PyTorch's dynamo exporter writes a returned buffer or parameter as an initializer that
    is a model output (here also read by the Gemm): the plan refused it ('serving cannot route
    it'). An Identity now produces it, in every load of the model alike, so the stage plan routes
    it and the stages compute what the whole model does, at another batch too."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "weight", "bias"], ["y"], name="linear", transB=1)],
        "constant_outputs",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])],
        [
            helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("scale", onnx.TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("weight", onnx.TensorProto.FLOAT, [4, 4]),
        ],
        [
            numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "weight"),
            numpy_helper.from_array(np.zeros(4, np.float32), "bias"),
            numpy_helper.from_array(np.array([2.0, 3.0], np.float32), "scale"),
        ],
    )
    path = tmp_path / "constant_outputs.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    static = load_model(path)
    names = [n.name for n in static.graph.node]
    for devices in (["cpu-0"] * len(names), ["cpu-0", "cpu-1", "cpu-1"]):
        assignment = dict(zip(names, devices, strict=True))
        plan = build_plan(static, assignment, DEVICES[:2], dynamic=dynamic_shapes(path))
        assert [o.name for o in plan.outputs] == ["y", "scale", "weight"]
        inputs = {"x": rng.standard_normal((3, 4)).astype(np.float32)}
        want = reference(onnx.load(path), inputs)
        got = run_sequential(load_model(path, symbolic=True), plan, inputs)
        for name, value in want.items():
            np.testing.assert_array_equal(got[name], value)


def test_a_stage_runs_the_fusions_the_whole_model_runs(tmp_path: Path) -> None:
    """PyTorch's dynamo exporter writes the shapes of the tensors inside the model, with their
    symbolic dimensions; ONNX Runtime fuses a residual Add into the LayerNormalization after it
    only where it knows both inputs' shapes, which its own inference of a Reshape to a computed
    shape does not give. A stage cut without those shapes ran Add and LayerNormalization apart
    (a BERT's stages 1.2e-6 away from the whole model); with them it fuses as the whole model
    does. A shape with no symbolic dimension (stale, exported at batch 1) stays behind."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    hidden = ["batch", "seq", 8]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["m"], name="project"),
            helper.make_node("Shape", ["x"], ["shape"], name="shape"),
            helper.make_node("Reshape", ["m", "shape"], ["r"], name="reshape"),
            helper.make_node("Add", ["r", "x"], ["s"], name="residual"),
            helper.make_node("LayerNormalization", ["s", "g", "b"], ["y"], name="norm"),
        ],
        "skip",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, hidden)],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, hidden)],
        [
            numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w"),
            numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "g"),
            numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b"),
        ],
        value_info=[
            helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, hidden),
            helper.make_tensor_value_info("s", onnx.TensorProto.FLOAT, [1, 1, 8]),
        ],
    )
    path = tmp_path / "skip.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    static, served = load_model(path, {"seq": [4]}), load_model(path, symbolic=True)
    plan = build_plan(static, {"project": "cpu-0"}, DEVICES[:1], dynamic=dynamic_shapes(path))
    stage = extract_stage(served, plan, "s0")
    assert [v.name for v in stage.graph.value_info] == ["r"]
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(stage.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    assert "SkipLayerNormalization" in ops and "Add" not in ops
    inputs = {"x": rng.standard_normal((3, 5, 8)).astype(np.float32)}
    got = run_sequential(served, plan, inputs)
    np.testing.assert_array_equal(got["y"], reference(onnx.load(path), inputs)["y"])


def test_a_zipmap_output_is_refused_with_the_way_to_export_without_it() -> None:
    """A scikit-learn classifier converted by skl2onnx returns its probabilities as a sequence
    of maps (ZipMap), which no Open Inference Protocol tensor carries: the refusal says how to
    convert it so that it returns a tensor."""
    from onnx import TensorProto, helper

    labels = helper.make_sequence_type_proto(
        helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(1, []))
    )
    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["p"], "softmax", axis=1),
         helper.make_node("ZipMap", ["p"], ["z"], "zipmap", domain="ai.onnx.ml",
                          classlabels_int64s=[0, 1])],
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_value_info("z", labels)],
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)]
    )
    assignment = {n.name: "cpu-0" for n in model.graph.node}
    with pytest.raises(ModelError, match=r"is a sequence: .*options=\{'zipmap': False\}"):
        build_plan(model, assignment, DEVICES[:1])


@pytest.mark.parametrize("batch", [1, "n"], ids=["static", "symbolic"])
def test_an_untyped_border_tensor_names_its_node_and_asks_for_shapes_only_where_open(
    batch: int | str,
) -> None:
    """A tensor that neither ONNX nor ONNX Runtime could type cannot cross a stage border.
    The refusal asked for --input-shape even where every input was static (the Normalizer of
    onnxruntime's own logreg_iris.onnx, at [3, 2]), which no shape would fix: now it names the
    node that makes it, and asks for a shape only where an input has an open dimension."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Mystery", ["x"], ["t"], "mystery", domain="test.untyped"),
         helper.make_node("Relu", ["t"], ["y"], "relu")],
        "untyped",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])],
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("test.untyped", 1)]
    )
    assignment = {"mystery": "cpu-0", "relu": "cpu-1"}
    with pytest.raises(ModelError) as refused:
        build_plan(model, assignment, DEVICES[:2])
    message = str(refused.value)
    assert "'t' (Mystery node 'mystery')" in message
    assert ("--input-shape x=" in message) == (batch == "n"), message
