"""moirai.fusion: groups from ONNX Runtime's optimised graph, per provider and merged.

Each pattern test builds a tiny graph with `onnx.helper` and counts the groups; CPU and CUDA
differ where ONNX Runtime registers a fusion for one provider only (ConvActivationFusion).
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import helper

from moirai import zoo
from moirai.fusion import CPU, CUDA, Group, _contract_cycles, coarsen, fusion_groups
from moirai.graph import OpGraph, build_graph, load_model

from .onnx_patterns import (
    conv_bn_relu,
    diamond,
    gelu,
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


@pytest.mark.parametrize("name", ["squeezenet", "inception_v1", "shufflenet"])
def test_zoo_groups_are_a_partition_and_a_dag(name: str) -> None:
    loaded = load_model(zoo.get(name))
    graph = build_graph(loaded)
    groups = fusion_groups(loaded, graph, [CPU, CUDA])
    _assert_partition_dag(graph, groups)
    # Every Conv of these CNNs is followed by its Relu; on CPU they fuse.
    relus = [g for g in groups if "Relu" in [graph.node[n].op_type for n in g.ops]]
    assert any("Conv" in [graph.node[n].op_type for n in g.ops] for g in relus)


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


def test_coarsen_rejects_zero() -> None:
    with pytest.raises(ValueError):
        coarsen(OpGraph("g", (), {}, (), ()), [], 0)
