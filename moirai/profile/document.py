"""The profile file, `moirai.profile/v1`: measurements that outlive the measuring.

`moirai profile` writes one, the cache holds its device entries, and `--profile FILE` plans
with one later (on another machine, in the operator after its profiling Jobs). JSON, UTF-8;
times in milliseconds, sizes in bytes::

    {
      "format": "moirai.profile/v1",
      "model": {"name": "squeezenet", "sha256": "…", "input_shapes": {"data_0": [1, 3, 224, 224]}},
      "devices": {
        "cpu:threads=1": {
          "target": "cpu:threads=1",
          "signature": {"method": 1, "onnxruntime": "1.32.0", "provider": "CPUExecutionProvider",
                        "cpu": "AMD EPYC", "threads": 1},
          "warmup": 3, "repeats": 10, "measured_at": "2026-11-23T01:20:00+00:00",
          "run_ms": 17.1, "run_spread_ms": 0.4, "call_overhead_ms": 0.02, "kernel_ms": 16.5,
          "cut_ms_per_mib": 0.12,
          "load": {"loadavg": 1.2, "others_cpu": 0.03, "waited": 0.0, "turns": 20,
                   "quiet_turns": 19, "seconds": 2.1, "contended": false,
                   "alongside": ["cpu:threads=2"], "nice": -20},
          "groups": [
            {"ops": ["n0", "n1"], "ms": 1.92, "spread_ms": 0.05, "method": "trace",
             "weight_bytes": 7168, "activation_bytes": 3154176}
          ]
        }
      },
      "link": {"path": "stage-server-loopback", "latency_ms": 0.7,
               "bandwidth_bytes_per_s": 1.4e9, "r2": 0.99, "max_relative_residual": 0.2,
               "samples": [{"bytes": 1024, "median_ms": 0.7, "spread_ms": 0.05, "ms": […]}]}
    }

- `devices` is keyed by the device's name in the profile (its target unless `moirai profile
  --device NAME=TARGET` named it). Each entry is self-contained, so profiles of different devices
  (one per node pool, say) merge by taking the union of their entries.
- `groups` are the fusion groups of *that device's* execution provider (what ONNX Runtime fuses
  there), each with the canonical names of its ONNX nodes (`moirai.graph.load_model`), its time
  per run (its share of the fastest run) and interquartile range over the repeats, how it was
  timed (`trace`: ONNX Runtime's per-node profiler over the whole model; `submodel`: the group
  cut out and run alone; `none`: ONNX Runtime ran no kernel for it, e.g. only folded
  constants), and its memory: the weights its kernels read and the activations they write (from
  the static shapes: ONNX Runtime's trace reports prepacked weights as absent, which would
  understate what a device must hold).
- `run_ms` is the whole model's compute time per run (the fastest of the repeats) in a session
  built exactly as the stage servers build theirs, without the profiler (null when the model
  could not run whole on the device), `call_overhead_ms` what one session call costs beyond its
  kernels (feeding and fetching), `kernel_ms` the sum of ONNX Runtime's per-kernel times,
  `cut_ms_per_mib` what a border between two stages costs per MiB of tensors crossing it (0
  when not measured; `moirai.profile.measured`, Cutting into stages), `load` (optional) the
  load the run time met (`moirai.profile.turns`: other processes' share of the device's cores,
  how long its runs waited for a core, how many of its turns were quiet, the other targets timed
  in the same turns, the priority they ran at; `contended` when too few turns were quiet). The
  group times add up to `run_ms`: see `moirai.profile.measured` for how the time between
  kernels is shared out.
- `link` (optional) is the fitted link between two stage servers (`moirai.profile.links`).

How a profile prices a cost graph (`DocumentProfile`): a cost graph device takes the profile
device of the same name, else the first one with its target (provider and threads; any CUDA
entry for a GPU). Each cost graph task then gets the time of every profile group it contains.
When a task holds only part of a profile group — the cost graph was built for a provider whose
fusions are finer — the group's time is shared among the tasks in proportion to the FLOPs of its
nodes there (one FLOP more per node, so nodes that compute nothing still count a little), which
is exact whenever tasks are unions of groups, as they are for the providers the profile measured
and after coarsening. The cost graph then records where its numbers came from: `source.profile`
and, per device, the profile entry, signature and repeats (`source.measured`); the measured link
(`source.link`) replaces the devices file's default link; a device whose entry prices a stage
border (`cut_ms_per_mib`) makes every link into and out of it slower by half its price per MiB
(`with_borders`; `source.border_ms_per_mib`); each task's `source` says per device how its time
was measured.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moirai.costgraph import CostGraph, Link
from moirai.devices import DeviceSpec
from moirai.errors import MoiraiError
from moirai.fusion import Group
from moirai.graph import OpGraph
from moirai.profile.analytic import node_flops
from moirai.profile.links import LinkFit
from moirai.profile.targets import Target, parse_device
from moirai.textfile import read_json, write_json

FORMAT = "moirai.profile/v1"
METHODS = ("trace", "submodel", "none")


class ProfileError(MoiraiError):
    """A profile file is unreadable, malformed, or does not fit the model or the devices."""


@dataclass(frozen=True)
class GroupTiming:
    ops: tuple[str, ...]
    ms: float
    spread_ms: float
    method: str
    weight_bytes: int = 0
    activation_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "ops": list(self.ops),
            "ms": self.ms,
            "spread_ms": self.spread_ms,
            "method": self.method,
            "weight_bytes": self.weight_bytes,
            "activation_bytes": self.activation_bytes,
        }


@dataclass(frozen=True)
class Load:
    """What other work a device's run time met while it was measured (`moirai.profile.turns`)."""

    loadavg: float | None
    """The machine's 1-minute load average at the end."""
    others_cpu: float | None
    """Share of the device's cores that other processes used during its turns."""
    waited: float | None
    """Time its runs waited for a core, all its threads together, per unit of run time."""
    turns: int
    quiet_turns: int
    seconds: float
    """How long the turns of every device measured together lasted."""
    contended: bool
    """It never had enough quiet turns: its time may be slower than the device alone."""
    alongside: tuple[str, ...] = ()
    """The targets timed in the same turns."""
    nice: int | None = None
    """The priority (nice value) the turns ran at (`moirai.profile.turns.raised_priority`)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "loadavg": self.loadavg,
            "others_cpu": self.others_cpu,
            "waited": self.waited,
            "turns": self.turns,
            "quiet_turns": self.quiet_turns,
            "seconds": self.seconds,
            "contended": self.contended,
            "alongside": list(self.alongside),
            "nice": self.nice,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Load:
        def number(key: str) -> float | None:
            value = data.get(key)
            return None if value is None else float(value)

        return cls(
            loadavg=number("loadavg"),
            others_cpu=number("others_cpu"),
            waited=number("waited"),
            turns=int(data.get("turns", 0)),
            quiet_turns=int(data.get("quiet_turns", 0)),
            seconds=float(data.get("seconds", 0.0)),
            contended=bool(data.get("contended", False)),
            alongside=tuple(str(a) for a in data.get("alongside", ())),
            nice=None if data.get("nice") is None else int(data["nice"]),
        )

    def describe(self) -> str:
        parts = []
        if self.others_cpu is not None:
            parts.append(f"others used {self.others_cpu:.0%} of its cores")
        if self.waited is not None:
            parts.append(f"its runs waited {self.waited:.0%} of their time for a core")
        parts.append(f"{self.quiet_turns} of {self.turns} turns quiet")
        if self.loadavg is not None:
            parts.append(f"load average {self.loadavg:.1f}")
        if self.nice is not None:
            parts.append(f"nice {self.nice}")
        return ", ".join(parts)


@dataclass(frozen=True)
class DeviceProfile:
    target: str
    signature: Mapping[str, Any]
    groups: tuple[GroupTiming, ...]
    run_ms: float | None
    run_spread_ms: float
    call_overhead_ms: float
    kernel_ms: float | None
    warmup: int
    repeats: int
    measured_at: str
    cut_ms_per_mib: float = 0.0
    load: Load | None = None
    """The load its run time was measured under (None: not recorded)."""

    @property
    def contended(self) -> bool:
        return self.load is not None and self.load.contended

    @property
    def total_ms(self) -> float:
        return sum(g.ms for g in self.groups)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "signature": dict(self.signature),
            "warmup": self.warmup,
            "repeats": self.repeats,
            "measured_at": self.measured_at,
            "run_ms": self.run_ms,
            "run_spread_ms": self.run_spread_ms,
            "call_overhead_ms": self.call_overhead_ms,
            "kernel_ms": self.kernel_ms,
            "cut_ms_per_mib": self.cut_ms_per_mib,
            "groups": [g.to_dict() for g in self.groups],
            **({} if self.load is None else {"load": self.load.to_dict()}),
        }

    @classmethod
    def from_dict(cls, data: Any, where: str) -> DeviceProfile:
        try:
            parse_device(str(data["target"]))
            groups = tuple(
                GroupTiming(
                    ops=tuple(str(o) for o in g["ops"]),
                    ms=_time(g["ms"], f"{where}.groups[{i}].ms"),
                    spread_ms=_time(g.get("spread_ms", 0.0), f"{where}.groups[{i}].spread_ms"),
                    method=_method(g.get("method", "trace"), f"{where}.groups[{i}].method"),
                    weight_bytes=int(g.get("weight_bytes", 0)),
                    activation_bytes=int(g.get("activation_bytes", 0)),
                )
                for i, g in enumerate(data["groups"])
            )
            run_ms = data.get("run_ms")
            kernel_ms = data.get("kernel_ms")
            return cls(
                target=str(data["target"]),
                signature=dict(data.get("signature", {})),
                groups=groups,
                run_ms=None if run_ms is None else _time(run_ms, f"{where}.run_ms"),
                run_spread_ms=float(data.get("run_spread_ms", 0.0)),
                call_overhead_ms=float(data.get("call_overhead_ms", 0.0)),
                kernel_ms=None if kernel_ms is None else float(kernel_ms),
                warmup=int(data.get("warmup", 0)),
                repeats=int(data.get("repeats", 0)),
                measured_at=str(data.get("measured_at", "")),
                cut_ms_per_mib=_time(data.get("cut_ms_per_mib", 0.0), f"{where}.cut_ms_per_mib"),
                load=None if data.get("load") is None else Load.from_dict(data["load"]),
            )
        except ProfileError:
            raise
        except MoiraiError as e:
            raise ProfileError(f"{where}.target: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ProfileError(
                f"{where}: malformed device profile ({type(e).__name__}: {e})"
            ) from None


@dataclass(frozen=True)
class ProfileDocument:
    model: Mapping[str, Any]
    """`name`, `sha256` of the model file, `input_shapes` it was loaded with."""
    devices: Mapping[str, DeviceProfile] = field(default_factory=dict)
    link: LinkFit | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": FORMAT,
            "model": dict(self.model),
            "devices": {name: d.to_dict() for name, d in self.devices.items()},
        }
        if self.link is not None:
            out["link"] = self.link.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = "profile") -> ProfileDocument:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ProfileError(f"{where}: not a {FORMAT} document (check its 'format' field)")
        model = data.get("model")
        if not isinstance(model, dict) or "sha256" not in model:
            raise ProfileError(f"{where}.model must name the model with at least its sha256")
        devices = data.get("devices", {})
        if not isinstance(devices, dict):
            raise ProfileError(f"{where}.devices must be an object keyed by device name")
        link = None
        if data.get("link") is not None:
            try:
                link = LinkFit.from_dict(data["link"])
            except (KeyError, TypeError, ValueError) as e:
                raise ProfileError(f"{where}.link: malformed ({type(e).__name__}: {e})") from None
        return cls(
            model=model,
            devices={
                str(k): DeviceProfile.from_dict(v, f"{where}.devices[{k!r}]")
                for k, v in devices.items()
            },
            link=link,
        )

    @classmethod
    def load(cls, path: str | Path) -> ProfileDocument:
        return cls.from_dict(read_json(path, "profile", ProfileError), str(path))

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict(), "profile")

    def merge(self, other: ProfileDocument) -> ProfileDocument:
        """Both documents' devices (the other's win on a name clash) and link (the other's
        when it has one); both must profile the same model."""
        self.check_model(other.model.get("sha256", ""), other.model.get("input_shapes", {}))
        link = other.link if other.link is not None else self.link
        return ProfileDocument(self.model, {**self.devices, **other.devices}, link)

    def check_model(self, sha256: str, input_shapes: Mapping[str, Sequence[int]]) -> None:
        """Raise unless this profile was measured on the model with this digest and shapes."""
        name = self.model.get("name", "?")
        if self.model.get("sha256") != sha256:
            raise ProfileError(
                f"the profile was measured on another model ({name}, sha256 "
                f"{str(self.model.get('sha256'))[:12]}…): profile this model again"
            )
        mine = {k: list(v) for k, v in (self.model.get("input_shapes") or {}).items()}
        theirs = {k: list(v) for k, v in (input_shapes or {}).items()}
        if mine and theirs and mine != theirs:
            raise ProfileError(
                f"the profile of {name} was measured with input shapes {mine}, not {theirs}: "
                "profile again with these --input-shape values"
            )


def _time(value: Any, where: str) -> float:
    number = float(value)
    if not number >= 0 or number == float("inf"):
        raise ProfileError(f"{where} is {value!r}: times must be finite and >= 0 ms")
    return number


def _method(value: Any, where: str) -> str:
    if value not in METHODS:
        raise ProfileError(f"{where} is {value!r}: use one of {', '.join(METHODS)}")
    return str(value)


# ----------------------------------------------------------------- allocation
def allocate(
    graph: OpGraph, timings: Sequence[GroupTiming], groups: Sequence[Group]
) -> tuple[list[float], list[str]]:
    """Each of `groups`' time from the profile's `timings` and how it was measured (module
    docstring: shared by FLOPs where a timing spans several groups)."""
    where = {n: i for i, g in enumerate(groups) for n in g.ops}
    ms = [0.0] * len(groups)
    methods: list[set[str]] = [set() for _ in groups]
    for timing in timings:
        share: dict[int, float] = {}
        for op in timing.ops:
            if op in where:
                weight = node_flops(graph, graph.node[op]) + 1.0
                share[where[op]] = share.get(where[op], 0.0) + weight
        total = sum(share.values())
        for i, weight in share.items():
            ms[i] += timing.ms * weight / total
            methods[i].add(timing.method)
    return ms, ["+".join(sorted(m)) or "none" for m in methods]


# ------------------------------------------------------------ the Profile source
class DocumentProfile:
    """Prices cost graphs from a profile document (module docstring); a `Profile`."""

    name = "measured"

    def __init__(self, document: ProfileDocument, origin: str = "") -> None:
        self.document = document
        self.origin = origin
        """Where the document came from (a file path), recorded in the cost graph."""
        self._used: dict[str, str] = {}  # cost graph device -> profile device name
        self._methods: dict[tuple[str, ...], dict[str, str]] = {}

    def entry_for(self, device: DeviceSpec) -> str | None:
        """The name of the profile device that stands for a cost graph device, if any."""
        if device.name in self.document.devices:
            return device.name
        target = Target.of(device)
        for name, entry in self.document.devices.items():
            theirs = parse_device(entry.target)[1]
            if theirs == target or (theirs.kind == target.kind == "gpu"):
                return name
        return None

    def call_overhead_ms(self, device: DeviceSpec) -> float | None:
        """The session call overhead measured for `device`'s entry, if the profile has one."""
        entry = self.entry_for(device)
        return None if entry is None else self.document.devices[entry].call_overhead_ms

    def compute_ms(
        self, graph: OpGraph, groups: Sequence[Group], devices: Sequence[DeviceSpec]
    ) -> list[Mapping[str, float]]:
        out: list[dict[str, float]] = [{} for _ in groups]
        methods: list[dict[str, str]] = [{} for _ in groups]
        for device in devices:
            name = self.entry_for(device)
            if name is None:
                have = ", ".join(f"{k} ({v.target})" for k, v in self.document.devices.items())
                raise ProfileError(
                    f"the profile has no measurement for device {device.name} "
                    f"({Target.of(device)}); it has {have or 'none'}: profile it with "
                    f"moirai profile --device {device.name}={Target.of(device)}"
                )
            self._used[device.name] = name
            ms, how = allocate(graph, self.document.devices[name].groups, groups)
            for i in range(len(groups)):
                out[i][device.name] = ms[i]
                methods[i][device.name] = how[i]
        self._methods = {g.ops: m for g, m in zip(groups, methods, strict=True)}
        return list(out)

    def annotate(self, costgraph: CostGraph) -> CostGraph:
        """The cost graph with the measured link, the price of a stage border on every link
        into or out of a device that has one (`with_borders`), and the provenance of its
        numbers."""
        source = dict(costgraph.extra.get("source", {}))
        source["profile"] = self.name
        if self.origin:
            source["profile_file"] = self.origin
        source["measured"] = {
            device: {
                "profile_device": name,
                "target": (entry := self.document.devices[name]).target,
                **dict(entry.signature),
                "warmup": entry.warmup,
                "repeats": entry.repeats,
                "measured_at": entry.measured_at,
                "run_ms": entry.run_ms,
            }
            for device, name in self._used.items()
        }
        changes: dict[str, Any] = {}
        link = self.document.link
        if link is not None:
            changes["default_link"] = link.link
            source["link"] = {
                "path": link.path,
                "latency_ms": link.latency_ms,
                "bandwidth_bytes_per_s": link.bandwidth_bytes_per_s,
                "r2": link.r2,
            }
        borders = {
            device: cut
            for device, name in self._used.items()
            if (cut := self.document.devices[name].cut_ms_per_mib) > 0
        }
        if borders:
            changes["pair_links"] = with_borders(
                costgraph, changes.get("default_link", costgraph.default_link), borders
            )
            source["border_ms_per_mib"] = borders
        tasks = tuple(
            dataclasses.replace(t, extra={**t.extra, "source": self._methods[t.ops]})
            if t.ops in self._methods
            else t
            for t in costgraph.tasks
        )
        return dataclasses.replace(
            costgraph, tasks=tasks, extra={**costgraph.extra, "source": source}, **changes
        )


def with_borders(
    costgraph: CostGraph, default: Link, border_ms_per_mib: Mapping[str, float]
) -> dict[tuple[str, str], Link]:
    """The cost graph's links between every two devices, each tensor crossing from `a` to `b`
    also paying half of `a`'s border price and half of `b`'s per MiB (a tensor leaving a stage
    is converted out of its session's layout, and into the next's: `cut_ms_per_mib`). So the
    solvers price what a border costs, and the served prediction, which gives each CPU end half
    of a hop as work on its device, charges each its own conversion."""
    pairs = dict(costgraph.pair_links)
    names = [d.name for d in costgraph.devices]
    for a in names:
        for b in names:
            per_mib = (border_ms_per_mib.get(a, 0.0) + border_ms_per_mib.get(b, 0.0)) / 2
            if a == b or per_mib <= 0:
                continue
            base = pairs.get((a, b), default)
            seconds_per_byte = 1.0 / base.bandwidth_bytes_per_s + per_mib / 1000.0 / 2**20
            pairs[(a, b)] = Link(1.0 / seconds_per_byte, base.latency_ms)
    return pairs
