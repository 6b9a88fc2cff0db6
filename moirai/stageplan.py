"""The stage plan format, `moirai.stageplan/v1`: dataclasses, validation, load and save.

What `moirai serve` writes and every stage server and the front end read; `moirai.partition`
builds plans.

The JSON format, `moirai.stageplan/v1` (what `moirai serve` writes and every server reads)::

    {
      "format": "moirai.stageplan/v1",
      "model": {"name": "mlp", "path": "mlp.onnx", "sha256": "…",
                "input_shapes": {"x": [1, 64]}},
      "devices": [{"name": "cpu-0", "kind": "cpu", "threads": 1},
                  {"name": "gpu-0", "kind": "gpu", "device_id": 0}],
      "inputs":  [{"name": "x", "datatype": "FP32", "shape": [1, 64]}],
      "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 10]}],
      "tensors": {"h": {"datatype": "FP32", "shape": [1, 256]}},
      "stages": [
        {"id": "s0", "device": "cpu-0", "lane": 0, "nodes": ["MatMul_0", "Relu_1"],
         "inputs": ["x"], "outputs": ["h"]},
        {"id": "s1", "device": "cpu-1", "lane": 0, "nodes": ["MatMul_2"],
         "inputs": ["h"], "outputs": ["y"]}
      ],
      "lanes": [{"weight": 1.0}],
      "routing": {"x": ["s0"], "h": ["s1"], "y": ["gateway"]},
      "endpoints": {"cpu-0": "127.0.0.1:50051", "cpu-1": "127.0.0.1:50052",
                    "gateway": "127.0.0.1:50050"},
      "predicted": {"solver": "cpsat", "objective": "latency", "makespan_ms": 1.9}
    }

- `model.path` is the file stage servers cut their sub-models from (`moirai.graph.load_model`
  gives the same canonical node names whatever the shapes); `sha256` (of the file followed by its
  external data files: `moirai.weights.model_digest`) lets a server refuse a different model;
  `input_shapes` are the shapes every input was priced at (a symbolic batch dimension at 1
  unless the user gave another): informative, serving does not fix them.
- `inputs`/`outputs` are the model's; `tensors` types every tensor that crosses a stage border.
  Datatypes are Open Inference Protocol names; a dimension of -1 is not fixed (it varies with a
  symbolic dimension of the model's inputs): servers accept any size there, and report -1 in the
  model's metadata.
- `stages` are in a topological order of the stage DAG; `nodes` are canonical ONNX node names in
  model order; `inputs`/`outputs` are the tensors crossing the stage's border.
- `routing` maps every tensor that travels to its consumers: stage ids, and `"gateway"` for the
  model's outputs. Model inputs are routed from the gateway.
- `lanes` (optional; default one lane of weight 1): a plan may hold several complete copies of
  the chain, each on its own devices, and each stage names its `lane` (default 0). Stages of
  different lanes never share a device, and each lane produces every model output. `routing`
  lists the consumers of every lane; a sender pushes only to those of its own lane
  (`StagePlan.routes`), and the front end sends each request to one lane, chosen by `weight`
  (relative, > 0) and the requests each lane has in flight.
- `endpoints` (optional, filled by whoever deploys) maps device names and `"gateway"` to the
  gRPC address of their chain service; command-line flags override it.
- `predicted` is informative: the placement's solver, objective and predicted times.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnx import TensorProto, TypeProto

from moirai.errors import MoiraiError
from moirai.textfile import read_json, write_json

FORMAT = "moirai.stageplan/v1"
GATEWAY = "gateway"

# ONNX element types that can cross a stage border or the gateway, by OIP datatype name.
ONNX_DATATYPES: Mapping[int, str] = {
    TensorProto.BOOL: "BOOL",
    TensorProto.UINT8: "UINT8",
    TensorProto.UINT16: "UINT16",
    TensorProto.UINT32: "UINT32",
    TensorProto.UINT64: "UINT64",
    TensorProto.INT8: "INT8",
    TensorProto.INT16: "INT16",
    TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64",
    TensorProto.FLOAT16: "FP16",
    TensorProto.FLOAT: "FP32",
    TensorProto.DOUBLE: "FP64",
    TensorProto.STRING: "BYTES",  # Triton's and KServe's name; see stage_server.codec
}


def border_problem(value: TypeProto) -> str | None:
    """Why a value of this type cannot cross a stage border or the gateway, as the rest of a
    sentence that names the value (the wire carries tensors of `ONNX_DATATYPES` whose rank is
    known), or None when it can."""
    kind = value.WhichOneof("value")
    if kind != "tensor_type" or value.tensor_type.elem_type not in ONNX_DATATYPES:
        name = (
            TensorProto.DataType.Name(value.tensor_type.elem_type)
            if kind == "tensor_type"
            else {"sequence_type": "a sequence", "optional_type": "an optional"}.get(kind, kind)
        )
        hint = (
            " (a scikit-learn classifier's probabilities: convert it without ZipMap, skl2onnx's "
            "options={'zipmap': False})"
            if kind == "sequence_type"
            else ""
        )
        return f"is {name}: serving supports {', '.join(ONNX_DATATYPES.values())}{hint}"
    if not value.tensor_type.HasField("shape"):  # not a scalar: a tensor of unknown rank
        return (
            "has no inferable rank, so it cannot cross a stage border; give static input shapes "
            "(--input-shape) so that shape inference can shape it"
        )
    return None


class PlanError(MoiraiError):
    """A stage plan is malformed or does not fit the model."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]
    """-1 marks a dimension that is not fixed."""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be true or false, not {value!r}")
    return value


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    kind: str = "cpu"
    threads: int | None = None
    """ONNX Runtime intra-op threads (CPU devices); None lets ONNX Runtime choose."""
    device_id: int | None = None
    """CUDA device ordinal (GPU devices)."""
    prepack: bool = True
    """Whether ONNX Runtime packs the weights of its matrix kernels when a session loads (a copy
    beside the mapped weights, and faster MatMul and Gemm); planning turns it off where the
    device's memory has no room for that copy (`moirai.planning.pipeline`)."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind}
        if self.threads is not None:
            out["threads"] = self.threads
        if self.device_id is not None:
            out["device_id"] = self.device_id
        if not self.prepack:
            out["prepack"] = False
        return out


@dataclass(frozen=True)
class Stage:
    id: str
    device: str
    nodes: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    lane: int = 0
    """The copy of the chain this stage belongs to (`StagePlan.lanes`)."""


@dataclass(frozen=True)
class Lane:
    """One complete copy of the chain; requests are shared among lanes by weight."""

    weight: float = 1.0


@dataclass(frozen=True)
class StagePlan:
    model_name: str
    devices: tuple[DeviceSpec, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    tensors: Mapping[str, TensorSpec]
    stages: tuple[Stage, ...]
    routing: Mapping[str, tuple[str, ...]]
    model_path: str = ""
    model_sha256: str = ""
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    endpoints: Mapping[str, str] = field(default_factory=dict)
    predicted: Mapping[str, Any] = field(default_factory=dict)
    lanes: tuple[Lane, ...] = (Lane(),)

    def stage(self, stage_id: str) -> Stage:
        for s in self.stages:
            if s.id == stage_id:
                return s
        raise PlanError(f"the plan has no stage {stage_id!r}")

    def device(self, name: str) -> DeviceSpec:
        for d in self.devices:
            if d.name == name:
                return d
        raise PlanError(
            f"the plan has no device {name!r}; its devices are "
            f"{', '.join(d.name for d in self.devices)}"
        )

    def stages_on(self, device: str) -> tuple[Stage, ...]:
        return tuple(s for s in self.stages if s.device == device)

    def stages_of_lane(self, lane: int) -> tuple[Stage, ...]:
        """The stages of one lane, in plan order."""
        return tuple(s for s in self.stages if s.lane == lane)

    def devices_of_lane(self, lane: int) -> tuple[str, ...]:
        """Devices that hold a stage of `lane`, in plan order."""
        used = {s.device for s in self.stages if s.lane == lane}
        return tuple(d.name for d in self.devices if d.name in used)

    def routes(self, tensor: str, lane: int) -> tuple[str, ...]:
        """The consumers of `tensor` in `lane`: its stages there, and "gateway"."""
        lanes = {s.id: s.lane for s in self.stages}
        return tuple(c for c in self.routing.get(tensor, ()) if lanes.get(c, lane) == lane)

    @property
    def used_devices(self) -> tuple[str, ...]:
        """Devices that hold at least one stage, in plan order."""
        used = {s.device for s in self.stages}
        return tuple(d.name for d in self.devices if d.name in used)

    def priced_shape(self, name: str) -> tuple[int, ...]:
        """The shape model input `name` was priced at: concrete where its spec has -1."""
        return tuple(self.input_shapes.get(name, self.spec(name).shape))

    def spec(self, tensor: str) -> TensorSpec:
        for t in (*self.inputs, *self.outputs):
            if t.name == tensor:
                return t
        return self.tensors[tensor]

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "model": {
                "name": self.model_name,
                "path": self.model_path,
                "sha256": self.model_sha256,
                "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            },
            "devices": [d.to_dict() for d in self.devices],
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "tensors": {
                name: {"datatype": t.datatype, "shape": list(t.shape)}
                for name, t in self.tensors.items()
            },
            "stages": [
                {
                    "id": s.id,
                    "device": s.device,
                    "nodes": list(s.nodes),
                    "inputs": list(s.inputs),
                    "outputs": list(s.outputs),
                    "lane": s.lane,
                }
                for s in self.stages
            ],
            "lanes": [{"weight": lane.weight} for lane in self.lanes],
            "routing": {k: list(v) for k, v in self.routing.items()},
            "endpoints": dict(self.endpoints),
            "predicted": dict(self.predicted),
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "plan") -> StagePlan:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise PlanError(f"{where}: not a {FORMAT} document (check its 'format' field)")
        try:
            model = data["model"]
            plan = cls(
                model_name=str(model["name"]),
                model_path=str(model.get("path", "")),
                model_sha256=str(model.get("sha256", "")),
                input_shapes={
                    str(k): tuple(int(d) for d in v)
                    for k, v in model.get("input_shapes", {}).items()
                },
                devices=tuple(
                    DeviceSpec(
                        name=str(d["name"]),
                        kind=str(d.get("kind", "cpu")),
                        threads=None if d.get("threads") is None else int(d["threads"]),
                        device_id=None if d.get("device_id") is None else int(d["device_id"]),
                        prepack=_flag(d.get("prepack", True), f"device {d['name']}: prepack"),
                    )
                    for d in data["devices"]
                ),
                inputs=tuple(_tensor_spec(t["name"], t) for t in data["inputs"]),
                outputs=tuple(_tensor_spec(t["name"], t) for t in data["outputs"]),
                tensors={str(k): _tensor_spec(k, v) for k, v in data.get("tensors", {}).items()},
                stages=tuple(
                    Stage(
                        id=str(s["id"]),
                        device=str(s["device"]),
                        nodes=tuple(map(str, s["nodes"])),
                        inputs=tuple(map(str, s["inputs"])),
                        outputs=tuple(map(str, s["outputs"])),
                        lane=_integer(s.get("lane", 0), f"stage {s['id']} lane"),
                    )
                    for s in data["stages"]
                ),
                lanes=tuple(
                    Lane(weight=float(lane.get("weight", 1.0))) for lane in data.get("lanes", [{}])
                ),
                routing={str(k): tuple(map(str, v)) for k, v in data["routing"].items()},
                endpoints={str(k): str(v) for k, v in data.get("endpoints", {}).items()},
                predicted=dict(data.get("predicted", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PlanError(f"{where}: malformed stage plan ({type(e).__name__}: {e})") from None
        _validate(plan, where)
        return plan

    @classmethod
    def load(cls, path: str | Path) -> StagePlan:
        return cls.from_dict(read_json(path, "stage plan", PlanError), str(path))

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict(), "stage plan")


def _tensor_spec(name: str, data: Mapping[str, Any]) -> TensorSpec:
    return TensorSpec(
        name=str(name),
        datatype=str(data["datatype"]),
        shape=tuple(int(d) for d in data["shape"]),
    )


def _integer(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an integer, not {value!r}")
    return value


def _validate(plan: StagePlan, where: str) -> None:
    devices = {d.name for d in plan.devices}
    ids = [s.id for s in plan.stages]
    if len(set(ids)) != len(ids) or GATEWAY in ids:
        raise PlanError(f"{where}: stage ids must be unique and not {GATEWAY!r}")
    known_ids = set(ids)
    datatypes = ONNX_DATATYPES.values()
    for t in (*plan.inputs, *plan.outputs, *plan.tensors.values()):
        if t.datatype not in datatypes:
            raise PlanError(
                f"{where}: tensor {t.name!r} has datatype {t.datatype!r}: "
                f"use one of {', '.join(datatypes)}"
            )
    for s in plan.stages:
        if s.device not in devices:
            raise PlanError(f"{where}: stage {s.id} names unknown device {s.device!r}")
        for t in (*s.inputs, *s.outputs):
            try:
                plan.spec(t)
            except KeyError:
                raise PlanError(f"{where}: stage {s.id} tensor {t!r} has no type") from None
    for tensor, consumers in plan.routing.items():
        for c in consumers:
            if c != GATEWAY and c not in known_ids:
                raise PlanError(f"{where}: routing of {tensor!r} names unknown stage {c!r}")
    _validate_lanes(plan, where)


def _validate_lanes(plan: StagePlan, where: str) -> None:
    """Lanes are complete copies of the chain on disjoint devices."""
    if not plan.lanes:
        raise PlanError(f"{where}: 'lanes' is empty: give at least one lane (or leave it out)")
    for k, lane in enumerate(plan.lanes):
        if not (0 < lane.weight < float("inf")):
            raise PlanError(f"{where}: lane {k} has weight {lane.weight}: give a number above 0")
    owner: dict[str, int] = {}
    for s in plan.stages:
        if not 0 <= s.lane < len(plan.lanes):
            raise PlanError(
                f"{where}: stage {s.id} is in lane {s.lane}, but the plan has "
                f"{len(plan.lanes)} lane(s): number lanes from 0 (and list each in 'lanes')"
            )
        if owner.setdefault(s.device, s.lane) != s.lane:
            raise PlanError(
                f"{where}: device {s.device} holds stages of lanes {owner[s.device]} and "
                f"{s.lane}: lanes must run on disjoint devices"
            )
    if len(plan.lanes) == 1:
        return
    model_inputs = {t.name for t in plan.inputs}
    for k in range(len(plan.lanes)):
        stages = plan.stages_of_lane(k)
        if not stages:
            raise PlanError(f"{where}: lane {k} has no stage")
        produced = {t for s in stages for t in s.outputs} | model_inputs
        for s in stages:
            for t in s.inputs:
                if t not in produced:
                    raise PlanError(
                        f"{where}: stage {s.id} of lane {k} takes {t!r}, which no stage of "
                        "its lane produces: each lane must be a complete copy of the chain"
                    )
        missing = [t.name for t in plan.outputs if t.name not in produced]
        if missing:
            raise PlanError(
                f"{where}: lane {k} produces no model output {missing[0]!r}: each lane must "
                "be a complete copy of the chain"
            )
