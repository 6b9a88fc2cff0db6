"""Steps 1–4 of the pipeline in one call: ONNX model + devices → cost graph.

`load` reads the model once (`moirai.graph.load_model`, its graph and the file's digest) into a
`LoadedModel`, which the cost graph, the stage plan and the served prediction all share.
`build_costgraph` is the seam between the model side (graph, fusion, profile) and the placement
side, which reads nothing but the `CostGraph` it returns:

- tasks are the fusion groups of every execution provider among the devices (`moirai.fusion`),
  optionally coarsened to `max_tasks` (lightest pairs by FLOPs first); `ops` lists the canonical
  node names of `moirai.graph.load_model`, the names the serving side cuts stages by;
- `compute_ms` comes from the profile source (analytic by default);
- `memory_bytes` of a task is the weights its kernels read plus the activations its nodes write;
  a CPU device's memory is what is left for tasks once its stage server's fixed overhead is
  reserved (`moirai.sessions.STAGE_SERVER_OVERHEAD_BYTES`), so a stage server peaks at its
  tasks' memory plus that overhead (`bench/largemodels.py` measures it);
- an edge carries every tensor written by one task and read by another, summed per task pair;
- the cost graph's `source` records where the numbers came from (profile, model file and digest,
  input shapes, providers) and the coarsening (nodes → fusion groups → tasks); a profile that
  `Annotates` then adds what it knows (measured links, per-device and per-task provenance).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import onnx

from moirai.costgraph import CostGraph, Device, Edge, Task
from moirai.devices import DeviceSet, DeviceSpec, load_devices
from moirai.fusion import Group, coarsen, fusion_groups
from moirai.graph import InputShapes, OpGraph, build_graph, dynamic_shapes, load_model
from moirai.profile import Annotates, Profile
from moirai.profile.analytic import AnalyticProfile, node_flops
from moirai.sessions import STAGE_SERVER_OVERHEAD_BYTES
from moirai.weights import model_digest
from moirai.wording import counted

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """A model as every planning step reads it: loaded once with its input shapes."""

    path: Path
    input_shapes: Mapping[str, Sequence[int]]
    """The user's input shapes (empty: the file's own)."""
    proto: onnx.ModelProto
    """`moirai.graph.load_model`'s model: canonical node names, shapes inferred."""
    graph: OpGraph
    digest: Future[str]
    """`moirai.weights.model_digest`, computed beside the fusion analysis (for a large model
    both read every weight): `sha256` waits for it."""
    dynamic: Mapping[str, Sequence[int]]
    """`moirai.graph.dynamic_shapes`: what varies with the file's symbolic inputs or with the
    inputs' values; the stage plan leaves those dimensions open."""
    _fusions: dict[tuple[str, ...], tuple[Group, ...]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def fusion_groups(self, providers: Iterable[str]) -> list[Group]:
        """`moirai.fusion.fusion_groups` for `providers`, found once per set of providers:
        every grouping of this machine's CPU is planned with the same ones, and each time ONNX
        Runtime optimised the model twice (0.35 s for ResNet-50 on this CPU, every weight of a
        large model read again) and warned again of any fallback."""
        key = tuple(dict.fromkeys(providers))
        if key not in self._fusions:
            self._fusions[key] = tuple(fusion_groups(self.proto, self.graph, key))
        return list(self._fusions[key])

    @property
    def name(self) -> str:
        return self.path.stem

    @cached_property
    def tensor_bytes(self) -> dict[str, int]:
        """The bytes of every tensor of known shape, at the shapes the model is priced at:
        what the tensors a stage plan types with -1 (they vary with a symbolic dimension) carry
        as priced (`moirai.planning.prediction`)."""
        return {n: t.nbytes for n, t in self.graph.tensors.items() if t.shape is not None}

    @property
    def sha256(self) -> str:
        """The file's digest, followed by its external data files' (`model_digest`)."""
        return self.digest.result()

    @property
    def priced_shapes(self) -> dict[str, list[int]]:
        """Every input's shape as the model is priced: the user's, or the file's with a
        symbolic batch at 1."""
        return {
            i.name: [d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in self.proto.graph.input
        }


def load(model_path: str | Path, input_shapes: InputShapes | None = None) -> LoadedModel:
    path = Path(model_path)
    shapes = {k: list(v) for k, v in (input_shapes or {}).items()}
    proto = load_model(path, shapes or None)
    digest = _DIGESTS.submit(model_digest, path)
    return LoadedModel(path, shapes, proto, build_graph(proto), digest, dynamic_shapes(path))


_DIGESTS = ThreadPoolExecutor(1, thread_name_prefix="moirai-digest")


def build_costgraph(
    model: str | Path | LoadedModel,
    devices: DeviceSet | str | Path,
    input_shapes: InputShapes | None = None,
    profile: Profile | None = None,
    max_tasks: int | None = None,
) -> CostGraph:
    """The placement problem of `model` (a file, loaded with `input_shapes`, or a model already
    loaded) on `devices` (a `DeviceSet` or a devices file)."""
    loaded = model if isinstance(model, LoadedModel) else load(model, input_shapes)
    model_path, model, graph = loaded.path, loaded.proto, loaded.graph
    if not isinstance(devices, DeviceSet):
        devices = load_devices(devices)
    profile = profile or AnalyticProfile()
    groups = loaded.fusion_groups(devices.providers)
    fused = len(groups)
    if max_tasks is not None:
        groups = coarsen(
            graph, groups, max_tasks, lambda ops: sum(node_flops(graph, graph.node[n]) for n in ops)
        )
    times = profile.compute_ms(graph, groups, devices.devices)
    task_ids = [f"t{i}" for i in range(len(groups))]
    tasks = tuple(
        Task(
            id=task_id,
            compute_ms=dict(ms),
            memory_bytes=_memory_bytes(graph, group),
            ops=group.ops,
            extra={"kind": _kind(graph, group)},
        )
        for task_id, group, ms in zip(task_ids, groups, times, strict=True)
    )
    source: dict[str, Any] = {
        "profile": profile.name,
        "model": model_path.name,
        "sha256": loaded.sha256,
        "input_shapes": loaded.priced_shapes,
        "providers": list(devices.providers),
        "nodes": len(graph.nodes),
        "fusion_groups": fused,
        "tasks": len(groups),
    }
    costgraph = CostGraph(
        name=model_path.stem,
        devices=tuple(_as_served(d) for d in devices.devices),
        tasks=tasks,
        edges=_edges(graph, groups, task_ids),
        default_link=devices.default_link,
        pair_links=dict(devices.pair_links),
        extra={"source": source},
    )
    log.debug("%s on %s", coarsening(costgraph), ", ".join(d.name for d in devices.devices))
    return profile.annotate(costgraph) if isinstance(profile, Annotates) else costgraph


def coarsening(costgraph: CostGraph) -> str:
    """`model.onnx: N nodes → G fusion groups → T tasks`, from a cost graph that
    `build_costgraph` made. Planners log it once per model, not once per device set (the
    groupings of one machine's CPU give the same line)."""
    source = costgraph.extra["source"]
    return (
        f"{source['model']}: {counted(source['nodes'], 'node')} → "
        f"{counted(source['fusion_groups'], 'fusion group')} → {counted(source['tasks'], 'task')}"
    )


def _as_served(device: DeviceSpec) -> Device:
    """The cost graph's device. A CPU device's memory is less what its stage server holds
    besides its tasks (`moirai.sessions.STAGE_SERVER_OVERHEAD_BYTES`): tasks then fit in what is
    left, and a stage server peaks at its tasks' memory plus that overhead."""
    device = device.to_costgraph()
    if device.kind != "cpu":
        return device
    usable = max(0, device.memory_bytes - STAGE_SERVER_OVERHEAD_BYTES)
    return dataclasses.replace(device, memory_bytes=usable)


def _memory_bytes(graph: OpGraph, group: Group) -> int:
    return graph.weight_bytes(group.ops) + graph.activation_bytes(group.ops)


def _edges(graph: OpGraph, groups: list[Group], task_ids: list[str]) -> tuple[Edge, ...]:
    task_of = {n: task for task, g in zip(task_ids, groups, strict=True) for n in g.ops}
    pair_bytes: dict[tuple[str, str], int] = {}
    for tensor, producer in graph.producer.items():
        src = task_of[producer]
        for dst in dict.fromkeys(task_of[c] for c in graph.consumers.get(tensor, ())):
            if dst != src:
                pair_bytes[(src, dst)] = (
                    pair_bytes.get((src, dst), 0) + graph.tensors[tensor].nbytes
                )
    return tuple(Edge(src, dst, nbytes) for (src, dst), nbytes in pair_bytes.items())


def _kind(graph: OpGraph, group: Group) -> str:
    """A readable label: the distinct operator types that do work, e.g. Conv+Relu."""
    ops = list(
        dict.fromkeys(graph.node[n].op_type for n in group.ops if not graph.node[n].constant)
    )
    return "+".join(ops[:4]) + ("+..." if len(ops) > 4 else "") if ops else "Constant"
