"""moirai.planning.build_costgraph: tasks, edges, memory, provenance, the profile seam."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from moirai import zoo
from moirai.costgraph import CostGraph
from moirai.devices import DeviceSet, DeviceSpec, parse_devices
from moirai.errors import DevicesError, ModelError
from moirai.fusion import Group
from moirai.graph import OpGraph, build_graph, load_model
from moirai.planning import build_costgraph

from .onnx_patterns import conv_bn_relu, diamond, save, string_column

DEVICES = parse_devices(
    {
        "devices": [
            {
                "name": "gpu",
                "kind": "gpu",
                "peak_flops": 8e12,
                "memory_bandwidth_bytes_per_s": 3e11,
                "memory_bytes": 16e9,
            },
            {
                "name": "cpu",
                "kind": "cpu",
                "peak_flops": 1e12,
                "memory_bandwidth_bytes_per_s": 1e11,
                "memory_bytes": 64e9,
            },
        ],
        "links": {
            "default": {"bandwidth_bytes_per_s": 1e9, "latency_ms": 0.05},
            "pairs": [{"src": "gpu", "dst": "cpu", "bandwidth_bytes_per_s": 1e10}],
        },
    }
)


def test_tasks_edges_memory_and_provenance(tmp_path: Path) -> None:
    path = save(diamond(), tmp_path / "diamond.onnx")
    cg = build_costgraph(path, DEVICES)
    assert cg.name == "diamond"
    assert [t.ops for t in cg.tasks] == [("relu",), ("left",), ("right",), ("join",)]
    assert all(set(t.compute_ms) == {"gpu", "cpu"} for t in cg.tasks)
    # A (1, 64) float tensor is 256 bytes, on each of the four edges.
    edges = {(e.src, e.dst): e.bytes for e in cg.edges}
    assert edges == {("t0", "t1"): 256, ("t0", "t2"): 256, ("t1", "t3"): 256, ("t2", "t3"): 256}
    assert all(t.memory_bytes == 256 for t in cg.tasks)  # no weights, one activation each
    assert cg.link("gpu", "cpu").bandwidth_bytes_per_s == 1e10
    assert cg.link("cpu", "gpu").bandwidth_bytes_per_s == 1e10
    source = cg.extra["source"]
    assert source["profile"] == "analytic" and source["model"] == "diamond.onnx"
    assert source["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert source["input_shapes"] == {"x": [1, 64]}
    assert (source["nodes"], source["fusion_groups"], source["tasks"]) == (4, 4, 4)
    assert cg.device["gpu"].extra["provider"] == "CUDAExecutionProvider"


def test_a_string_tensor_is_priced_per_element(tmp_path: Path) -> None:
    """String tensors (4 rows of a city column here) were 0 bytes: an edge carrying one was
    free to cross any link. Each element is priced at `STRING_ELEMENT_BYTES`."""
    from moirai.graph import STRING_ELEMENT_BYTES

    cg = build_costgraph(save(string_column(4), tmp_path / "strings.onnx"), DEVICES)
    edges = {(e.src, e.dst): e.bytes for e in cg.edges}
    assert edges[("t0", "t1")] == 4 * STRING_ELEMENT_BYTES  # `upper`, strings
    assert edges[("t1", "t2")] == 4 * 8  # `code`, int64
    assert STRING_ELEMENT_BYTES == 16


def test_memory_is_weights_plus_activations(tmp_path: Path) -> None:
    path = save(conv_bn_relu(), tmp_path / "m.onnx")
    cg = build_costgraph(path, DEVICES)
    graph = build_graph(load_model(path))
    # GPU (CUDA): Conv+BN fused, Relu apart; CPU fuses all three: one task.
    (task,) = cg.tasks
    activations = sum(graph.tensors[t].nbytes for t in ("c", "bn", "y"))
    assert task.memory_bytes == graph.weight_bytes(task.ops) + activations
    assert task.extra["kind"] == "Conv+BatchNormalization+Relu"


def test_json_round_trip(tmp_path: Path) -> None:
    cg = build_costgraph(zoo.get("squeezenet"), DEVICES)
    cg.save(tmp_path / "cg.json")
    again = CostGraph.load(tmp_path / "cg.json")
    assert again.to_dict() == cg.to_dict()
    assert again.extra["source"]["fusion_groups"] == len(again.tasks)


def test_every_node_in_one_task_and_edges_form_a_dag() -> None:
    cg = build_costgraph(zoo.get("inception_v1"), DEVICES, max_tasks=25)
    graph = build_graph(load_model(zoo.get("inception_v1")))
    ops = [op for t in cg.tasks for op in t.ops]
    assert sorted(ops) == sorted(n.name for n in graph.nodes)
    assert len(cg.tasks) == 25 and cg.extra["source"]["fusion_groups"] > 25
    assert len(cg.topological_order) == 25  # validated: acyclic


def test_devices_file_path_is_accepted(tmp_path: Path) -> None:
    examples = Path(__file__).resolve().parents[2] / "examples" / "devices"
    cg = build_costgraph(save(diamond(), tmp_path / "m.onnx"), examples / "bench-3.yaml")
    assert cg.device_names == ("a100", "t4", "xeon")


def test_errors_pass_through_as_one_line(tmp_path: Path) -> None:
    path = tmp_path / "cut.onnx"
    path.write_bytes(diamond().SerializeToString()[:40])
    with pytest.raises(ModelError):
        build_costgraph(path, DEVICES)
    with pytest.raises(DevicesError):
        build_costgraph(save(diamond(), tmp_path / "m.onnx"), tmp_path / "absent.yaml")


@dataclass(frozen=True)
class _GpuOnlyForRelu:
    """A stand-in measured profile: fixed times, and Sigmoid cannot run on the GPU."""

    name: str = "fake"

    def compute_ms(
        self, graph: OpGraph, groups: Sequence[Group], devices: Sequence[DeviceSpec]
    ) -> list[Mapping[str, float]]:
        return [
            {
                d.name: 1.0
                for d in devices
                if not (d.kind == "gpu" and any(graph.node[n].op_type == "Sigmoid" for n in g.ops))
            }
            for g in groups
        ]


def test_profile_source_is_pluggable(tmp_path: Path) -> None:
    cg = build_costgraph(save(diamond(), tmp_path / "m.onnx"), DEVICES, profile=_GpuOnlyForRelu())
    assert cg.extra["source"]["profile"] == "fake"
    assert cg.runnable_devices("t1") == ("cpu",)
    assert cg.runnable_devices("t0") == ("gpu", "cpu")
    assert isinstance(DEVICES, DeviceSet)


def test_the_coarsening_is_found_and_logged_once_per_model(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`plan_model` builds a cost graph for every grouping of the CPU; the line that reports the
    model's coarsening used to come once per grouping (three here), and the fusion analysis
    behind it ran as often."""
    import moirai.planning.costgraph as costgraph_module
    from moirai.planning import plan_model
    from moirai.planning.space import cpu_groupings

    cpu = parse_devices(
        {
            "devices": [
                {
                    "name": "cpu",
                    "kind": "cpu",
                    "threads": 4,
                    "peak_flops": 1e12,
                    "memory_bandwidth_bytes_per_s": 1e11,
                    "memory_bytes": 64e9,
                }
            ],
            "links": {"default": {"bandwidth_bytes_per_s": 1e9, "latency_ms": 0.05}},
        }
    )
    groupings = cpu_groupings(cpu)
    assert len(groupings) == 3  # 1, 2 and 4 devices
    analyses = []
    real = costgraph_module.fusion_groups

    def counted(*args: object) -> list[Group]:
        analyses.append(args)
        return real(*args)

    monkeypatch.setattr(costgraph_module, "fusion_groups", counted)
    with caplog.at_level(logging.INFO, logger="moirai"):
        plan_model(save(diamond(), tmp_path / "m.onnx"), groupings, time_limit=1.0)
    said = [r for r in caplog.records if "fusion groups" in r.getMessage()]
    assert [r.levelno for r in said].count(logging.INFO) == 1, [r.getMessage() for r in said]
    assert said[0].getMessage().startswith("m.onnx: ")
    # ONNX Runtime's fusion analysis runs once for the three groupings, not once each.
    assert len(analyses) == 1


def test_the_coarsening_line_counts_in_words() -> None:
    """A one-node model read "1 nodes → 1 fusion groups → 1 tasks"."""
    from types import SimpleNamespace

    from moirai.planning.costgraph import coarsening

    def line(nodes: int, groups: int, tasks: int) -> str:
        source = {"model": "m.onnx", "nodes": nodes, "fusion_groups": groups, "tasks": tasks}
        return coarsening(SimpleNamespace(extra={"source": source}))  # type: ignore[arg-type]

    assert line(1, 1, 1) == "m.onnx: 1 node → 1 fusion group → 1 task"
    assert line(105, 39, 2) == "m.onnx: 105 nodes → 39 fusion groups → 2 tasks"
