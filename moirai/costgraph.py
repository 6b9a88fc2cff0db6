"""The cost graph: the placement problem with the model already coarsened and profiled.

This is the only input of every solver, heuristic and the simulator (`moirai.costgraph/v1`,
specified in `../shared/formats/costgraph.md`). It is built in memory from an ONNX model and a
profile, or read from a file so that users can plan with their own profiles. Parsing validates
everything once, so the solvers can trust it: a cycle, an unknown device, a task that can run
nowhere, a negative time or a missing field each raise one `CostGraphError` naming the field.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from moirai.dag import topological_order
from moirai.errors import CostGraphError
from moirai.textfile import read_json, write_json

FORMAT = "moirai.costgraph/v1"


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: int
    kind: str = "cpu"
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Informative keys (execution provider, threads, peak figures); ignored by solvers."""
    transfers_occupy_device: bool | None = None
    """Whether moving a tensor into or out of this device takes the device's own time (hop work;
    the throughput objective counts it in the device's busy time per request): Moirai's extension
    of the format, `docs/throughput-model.md`. None: by `kind`, as Moirai's own stage servers
    behave, true for a CPU, which copies and serialises every tensor on its own cores, false for
    a GPU, whose copies run on DMA engines beside its compute. A cost graph *file* states it: a
    device read without the key does not pay, since the format's execution model has no hop work
    and its `kind` is informative only (`CostGraph.to_dict` writes the resolved value, true or
    false, so that a reader that took the key's absence otherwise reads the same)."""

    @property
    def pays_for_transfers(self) -> bool:
        """`transfers_occupy_device`, its default resolved."""
        if self.transfers_occupy_device is None:
            return self.kind == "cpu"
        return self.transfers_occupy_device


@dataclass(frozen=True)
class Link:
    bandwidth_bytes_per_s: float
    latency_ms: float = 0.0

    def transfer_ms(self, nbytes: int) -> float:
        return self.latency_ms + nbytes / self.bandwidth_bytes_per_s * 1000.0


@dataclass(frozen=True)
class Task:
    id: str
    compute_ms: Mapping[str, float]
    """Time on each device that can run the task; a device missing here cannot run it."""
    memory_bytes: int = 0
    ops: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    bytes: int
    transfer_ms: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    """Explicit transfer times `[from_device][to_device]`, overriding the links."""


@dataclass(frozen=True)
class CostGraph:
    name: str
    devices: tuple[Device, ...]
    tasks: tuple[Task, ...]
    edges: tuple[Edge, ...]
    default_link: Link = Link(1.25e9, 0.05)
    pair_links: Mapping[tuple[str, str], Link] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Informative top-level keys (e.g. `source`: where the numbers came from)."""

    def __post_init__(self) -> None:
        _validate(self)
        object.__setattr__(self, "edges", self._one_edge_per_pair())

    def _one_edge_per_pair(self) -> tuple[Edge, ...]:
        """The format lets a file give an edge per tensor; every solver wants one per pair of
        tasks. Tensors between the same two tasks travel between the same two devices, so they
        become one transfer taking their summed time between every pair of devices: the same
        schedules, but for one that slips another transfer between them on their ports."""
        groups: dict[tuple[str, str], list[Edge]] = {}
        for e in self.edges:
            groups.setdefault((e.src, e.dst), []).append(e)
        if len(groups) == len(self.edges):
            return self.edges
        names = self.device_names
        return tuple(
            group[0]
            if len(group) == 1
            else Edge(
                src,
                dst,
                sum(e.bytes for e in group),
                {
                    a: {b: sum(self.transfer_ms(e, a, b) for e in group) for b in names if b != a}
                    for a in names
                },
            )
            for (src, dst), group in groups.items()
        )

    # ----------------------------------------------------------------- lookups
    @cached_property
    def device_names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.devices)

    @cached_property
    def device(self) -> dict[str, Device]:
        return {d.name: d for d in self.devices}

    @cached_property
    def task(self) -> dict[str, Task]:
        return {t.id: t for t in self.tasks}

    @cached_property
    def predecessors(self) -> dict[str, list[Edge]]:
        preds: dict[str, list[Edge]] = {t.id: [] for t in self.tasks}
        for e in self.edges:
            preds[e.dst].append(e)
        return preds

    @cached_property
    def successors(self) -> dict[str, list[Edge]]:
        succs: dict[str, list[Edge]] = {t.id: [] for t in self.tasks}
        for e in self.edges:
            succs[e.src].append(e)
        return succs

    @cached_property
    def topological_order(self) -> tuple[str, ...]:
        """Task ids in a topological order, stable with respect to the order of `tasks`."""
        order = _topological_order(self.tasks, self.edges)
        assert order is not None  # validated in __post_init__
        return order

    def link(self, src: str, dst: str) -> Link:
        return self.pair_links.get((src, dst), self.default_link)

    def transfer_ms(self, edge: Edge, src_device: str, dst_device: str) -> float:
        """Time to move `edge`'s tensor from one device to another (zero on the same device)."""
        if src_device == dst_device:
            return 0.0
        explicit = edge.transfer_ms.get(src_device, {}).get(dst_device)
        if explicit is not None:
            return explicit
        return self.link(src_device, dst_device).transfer_ms(edge.bytes)

    def runnable_devices(self, task_id: str) -> tuple[str, ...]:
        return tuple(d for d in self.device_names if d in self.task[task_id].compute_ms)

    # ------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        links: dict[str, Any] = {"default": _link_dict(self.default_link)}
        if self.pair_links:
            links["pairs"] = [
                {"src": s, "dst": d, **_link_dict(link)} for (s, d), link in self.pair_links.items()
            ]
        return {
            "format": FORMAT,
            "name": self.name,
            **dict(self.extra),
            "devices": [
                {
                    "name": d.name,
                    "memory_bytes": d.memory_bytes,
                    "kind": d.kind,
                    _OCCUPY: d.pays_for_transfers,
                    **dict(d.extra),
                }
                for d in self.devices
            ],
            "links": links,
            "tasks": [
                {
                    "id": t.id,
                    "compute_ms": dict(t.compute_ms),
                    "memory_bytes": t.memory_bytes,
                    **({"ops": list(t.ops)} if t.ops else {}),
                    **dict(t.extra),
                }
                for t in self.tasks
            ],
            "edges": [
                {
                    "src": e.src,
                    "dst": e.dst,
                    "bytes": e.bytes,
                    **(
                        {"transfer_ms": {k: dict(v) for k, v in e.transfer_ms.items()}}
                        if e.transfer_ms
                        else {}
                    ),
                }
                for e in self.edges
            ],
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "costgraph") -> CostGraph:
        """Parse and validate a `moirai.costgraph/v1` document."""
        return _parse(data, where)

    @classmethod
    def load(cls, path: str | Path) -> CostGraph:
        return _parse(read_json(path, "cost graph", CostGraphError), str(path))

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict(), "cost graph")


def _link_dict(link: Link) -> dict[str, float]:
    return {"bandwidth_bytes_per_s": link.bandwidth_bytes_per_s, "latency_ms": link.latency_ms}


# ------------------------------------------------------------------ validation
def _topological_order(tasks: Iterable[Task], edges: Iterable[Edge]) -> tuple[str, ...] | None:
    """Task ids in model order as far as the edges allow; None when the edges hold a cycle."""
    ids = [t.id for t in tasks]
    succs: dict[str, list[str]] = {i: [] for i in ids}
    for e in edges:
        succs[e.src].append(e.dst)
    position = {i: n for n, i in enumerate(ids)}
    order = topological_order(ids, succs, position.__getitem__)
    return tuple(order) if order is not None else None


def _check_time(value: float, where: str) -> None:
    if not math.isfinite(value) or value < 0:
        raise CostGraphError(f"{where} is {value}: times must be finite and >= 0 ms")


def _validate(cg: CostGraph) -> None:
    if not cg.devices:
        raise CostGraphError("costgraph.devices is empty: list at least one device")
    names = [d.name for d in cg.devices]
    known = set(names)
    if len(known) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise CostGraphError(f"costgraph.devices: device name {dup!r} appears twice")
    for i, d in enumerate(cg.devices):
        if d.memory_bytes < 0:
            raise CostGraphError(f"costgraph.devices[{i}].memory_bytes is negative")
    links = [("links.default", cg.default_link)] + [
        (f"links.pairs[{s}->{d}]", link) for (s, d), link in cg.pair_links.items()
    ]
    for where, link in links:
        if not (link.bandwidth_bytes_per_s > 0 and math.isfinite(link.bandwidth_bytes_per_s)):
            raise CostGraphError(f"costgraph.{where}.bandwidth_bytes_per_s must be > 0")
        _check_time(link.latency_ms, f"costgraph.{where}.latency_ms")
    for s, d in cg.pair_links:
        for end in (s, d):
            if end not in known:
                raise CostGraphError(
                    f"costgraph.links.pairs names unknown device {end!r}; devices are "
                    f"{', '.join(names)}"
                )
    if not cg.tasks:
        raise CostGraphError("costgraph.tasks is empty: a model has at least one task")
    ids: set[str] = set()
    for i, t in enumerate(cg.tasks):
        if t.id in ids:
            raise CostGraphError(f"costgraph.tasks[{i}].id {t.id!r} is not unique")
        ids.add(t.id)
        if not t.compute_ms:
            raise CostGraphError(
                f"costgraph.tasks[{i}] ({t.id}) can run on no device: give compute_ms for at "
                "least one device"
            )
        for dev, ms in t.compute_ms.items():
            if dev not in known:
                raise CostGraphError(
                    f"costgraph.tasks[{i}].compute_ms names unknown device {dev!r}; devices are "
                    f"{', '.join(names)}"
                )
            _check_time(ms, f"costgraph.tasks[{i}].compute_ms[{dev!r}]")
        if t.memory_bytes < 0:
            raise CostGraphError(f"costgraph.tasks[{i}].memory_bytes is negative")
    for i, e in enumerate(cg.edges):
        for end in (e.src, e.dst):
            if end not in ids:
                raise CostGraphError(f"costgraph.edges[{i}] names unknown task {end!r}")
        if e.src == e.dst:
            raise CostGraphError(f"costgraph.edges[{i}] is a self-loop on task {e.src!r}")
        if e.bytes < 0:
            raise CostGraphError(f"costgraph.edges[{i}].bytes is negative")
        for a, row in e.transfer_ms.items():
            for b, ms in row.items():
                if a not in known or b not in known:
                    raise CostGraphError(
                        f"costgraph.edges[{i}].transfer_ms names unknown device "
                        f"{a if a not in known else b!r}"
                    )
                _check_time(ms, f"costgraph.edges[{i}].transfer_ms[{a!r}][{b!r}]")
    if _topological_order(cg.tasks, cg.edges) is None:
        raise CostGraphError(
            "costgraph.edges contain a cycle: a cost graph must be a DAG over task ids"
        )


# --------------------------------------------------------------------- parsing
def _require(obj: Any, key: str, where: str, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(obj, dict):
        raise CostGraphError(f"{where} must be a JSON object")
    if key not in obj:
        raise CostGraphError(f"{where}.{key} is missing")
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise CostGraphError(f"{where}.{key} must be {names}, got {type(value).__name__}")
    return value


def _number(obj: Any, key: str, where: str, default: float | None = None) -> float:
    if default is not None and isinstance(obj, dict) and key not in obj:
        return default
    return float(_require(obj, key, where, (int, float)))


def _bytes(obj: Any, key: str, where: str, default: float | None = None) -> int:
    """A byte count: finite (JSON reads 1e400 as infinity, which no int holds)."""
    value = _number(obj, key, where, default)
    if not math.isfinite(value):
        raise CostGraphError(f"{where}.{key} is {value}: a number of bytes must be finite")
    return int(value)


def _link(obj: Any, where: str) -> Link:
    return Link(
        bandwidth_bytes_per_s=_number(obj, "bandwidth_bytes_per_s", where),
        latency_ms=_number(obj, "latency_ms", where, default=0.0),
    )


def _times(obj: Any, where: str) -> dict[str, float]:
    if not isinstance(obj, dict):
        raise CostGraphError(f"{where} must be an object mapping device name to milliseconds")
    out = {}
    for dev, ms in obj.items():
        if isinstance(ms, bool) or not isinstance(ms, (int, float)):
            raise CostGraphError(f"{where}[{dev!r}] must be a number of milliseconds")
        out[str(dev)] = float(ms)
    return out


_OCCUPY = "transfers_occupy_device"
_DEVICE_KEYS = ("name", "memory_bytes", "kind", _OCCUPY)
_TASK_KEYS = ("id", "compute_ms", "memory_bytes", "ops")
_TOP_KEYS = ("format", "name", "devices", "links", "tasks", "edges")


def _parse(data: Any, where: str) -> CostGraph:
    if not isinstance(data, dict):
        raise CostGraphError(f"{where}: a cost graph is a JSON object")
    fmt = data.get("format")
    if fmt != FORMAT:
        raise CostGraphError(f"{where}.format is {fmt!r}: expected {FORMAT!r}")
    name = str(data.get("name", "costgraph"))
    devices = []
    for i, d in enumerate(_require(data, "devices", where, list)):
        w = f"{where}.devices[{i}]"
        occupy = d.get(_OCCUPY, False) if isinstance(d, dict) else False
        if not isinstance(occupy, bool):
            raise CostGraphError(f"{w}.{_OCCUPY} must be true or false, got {occupy!r}")
        devices.append(
            Device(
                name=_require(d, "name", w, str),
                memory_bytes=_bytes(d, "memory_bytes", w),
                kind=str(d.get("kind", "cpu")),
                extra={k: v for k, v in d.items() if k not in _DEVICE_KEYS},
                transfers_occupy_device=occupy,
            )
        )
    links = data.get("links", {})
    if not isinstance(links, dict):
        raise CostGraphError(f"{where}.links must be an object")
    default_link = (
        _link(links["default"], f"{where}.links.default")
        if "default" in links
        else (CostGraph.default_link)
    )
    pair_links = {}
    for i, p in enumerate(links.get("pairs", [])):
        w = f"{where}.links.pairs[{i}]"
        pair_links[(_require(p, "src", w, str), _require(p, "dst", w, str))] = _link(p, w)
    tasks = []
    for i, t in enumerate(_require(data, "tasks", where, list)):
        w = f"{where}.tasks[{i}]"
        ops = t.get("ops", []) if isinstance(t, dict) else []
        if not isinstance(ops, list) or not all(isinstance(o, str) for o in ops):
            raise CostGraphError(f"{w}.ops must be a list of ONNX node names")
        tasks.append(
            Task(
                id=str(_require(t, "id", w, (str, int))),
                compute_ms=_times(_require(t, "compute_ms", w, dict), f"{w}.compute_ms"),
                memory_bytes=_bytes(t, "memory_bytes", w, default=0),
                ops=tuple(ops),
                extra={
                    k: v
                    for k, v in t.items()
                    if k not in ("id", "compute_ms", "memory_bytes", "ops")
                },
            )
        )
    pairs = [(a.name, b.name) for a in devices for b in devices if a is not b]
    edges = []
    for i, e in enumerate(_require(data, "edges", where, list)):
        w = f"{where}.edges[{i}]"
        tm = e.get("transfer_ms", {}) if isinstance(e, dict) else {}
        if not isinstance(tm, dict):
            raise CostGraphError(f"{w}.transfer_ms must be an object {{from: {{to: ms}}}}")
        transfer = {str(a): _times(row, f"{w}.transfer_ms[{a!r}]") for a, row in tm.items()}
        if (
            isinstance(e, dict)
            and "bytes" not in e
            and not all(b in transfer.get(a, {}) for a, b in pairs)  # timed everywhere: unused
        ):
            raise CostGraphError(
                f"{w}.bytes is missing: give the tensor's size, or transfer_ms for every pair of "
                "devices"
            )
        edges.append(
            Edge(
                src=str(_require(e, "src", w, (str, int))),
                dst=str(_require(e, "dst", w, (str, int))),
                bytes=_bytes(e, "bytes", w, default=0),
                transfer_ms=transfer,
            )
        )
    extra = {
        k: v
        for k, v in data.items()
        if k not in ("format", "name", "devices", "links", "tasks", "edges")
    }
    try:
        return CostGraph(
            name=name,
            devices=tuple(devices),
            tasks=tuple(tasks),
            edges=tuple(edges),
            default_link=default_link,
            pair_links=pair_links,
            extra=extra,
        )
    except CostGraphError as e:
        # Point at the file rather than the generic "costgraph" prefix.
        msg = str(e)
        raise CostGraphError(
            msg.replace("costgraph.", f"{where}.", 1) if where != "costgraph" else msg
        ) from None
