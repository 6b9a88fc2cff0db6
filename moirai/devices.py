"""The devices a model is placed on: a YAML file, or this machine.

A devices file lists the devices (what the analytic cost model needs: peak FLOP/s, memory
bandwidth, memory; which ONNX Runtime execution provider runs there, which decides the fusions)
and the network links between them::

    devices:
      - name: a100                 # with count: 2 → a100-0, a100-1
        kind: gpu                  # cpu | gpu
        provider: CUDAExecutionProvider   # default by kind: CPU/CUDAExecutionProvider
        count: 2
        peak_flops: 19.5e+12       # FP32 FLOP/s
        memory_bandwidth_bytes_per_s: 1.555e+12
        memory_bytes: 40e9
        threads: 8                 # optional: intra-op threads (CPU)
        launch_overhead_ms: 0.01   # optional: per-kernel overhead, default by kind
        efficiency: 0.5            # optional: fraction of the peaks kernels reach, (0, 1];
                                   # default by kind and threads (moirai.profile.analytic)
        transfers_occupy_device: false  # optional: its transfers take its own time (hop
                                   # work); default true for cpu, false for gpu
    links:
      default: {bandwidth_bytes_per_s: 1.25e9, latency_ms: 0.05}
      pairs:
        - {src: a100, dst: xeon, bandwidth_bytes_per_s: 3.125e9, latency_ms: 0.02}

A link pair applies in both directions unless the reverse pair is listed too; a name with a
`count` stands for all its devices (`src: a100, dst: a100` sets the links among them). Numbers
may be written as strings, because YAML 1.1 reads `19.5e12` (no dot-sign) as text. Every
mistake raises one `DevicesError` line naming the file and the field.

`local_devices()` describes this machine for `--devices local`: one CPU device with the usable
cores and physical memory, and one GPU per NVIDIA device when ONNX Runtime has the CUDA provider
and `nvidia-smi` answers. Peak figures of the CPU are estimated from its clock and vector width,
those of the GPUs from a small table of published figures; measured profiling replaces them.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from moirai.costgraph import Device, Link
from moirai.errors import DevicesError
from moirai.textfile import read_text

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
DEVICE_KINDS = ("cpu", "gpu")
"""What Moirai can serve on: a cost graph file may name any kind, which is informative there."""
DEFAULT_PROVIDER = {"cpu": CPU, "gpu": CUDA}
DEFAULT_LINK = Link(bandwidth_bytes_per_s=1.25e9, latency_ms=0.05)  # 10 Gb/s Ethernet
# Local stage servers talk gRPC over loopback: roughly a memory copy through the kernel.
LOOPBACK_LINK = Link(bandwidth_bytes_per_s=2e9, latency_ms=0.1)
# The most devices one entry's `count` expands to: well past any node pool placed onto (each
# device is a stage server, and the solvers' models grow with tasks x devices), so a larger
# count is a typo, refused at once instead of expanding for minutes.
MAX_COUNT = 4096

_REQUIRED = ("name", "kind", "peak_flops", "memory_bandwidth_bytes_per_s", "memory_bytes")
_OPTIONAL = (
    "provider",
    "count",
    "threads",
    "launch_overhead_ms",
    "efficiency",
    "transfers_occupy_device",
)
_LINK_KEYS = ("bandwidth_bytes_per_s", "latency_ms")


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    kind: str
    provider: str
    peak_flops: float
    memory_bandwidth_bytes_per_s: float
    memory_bytes: int
    threads: int | None = None
    launch_overhead_ms: float | None = None
    """Per-kernel overhead; None lets the cost model use its default for the kind."""
    efficiency: float | None = None
    """Fraction of the peak figures that kernels reach; None lets the cost model use its
    default for the kind and thread count."""
    transfers_occupy_device: bool | None = None
    """None: by kind (`moirai.costgraph.Device.transfers_occupy_device`)."""
    device_id: int = 0
    """Index within its `count` group (the CUDA device id on a multi-GPU machine)."""

    def to_costgraph(self) -> Device:
        """The cost graph's view: what the solvers need, the rest as informative keys."""
        extra: dict[str, Any] = {
            "provider": self.provider,
            "peak_flops": self.peak_flops,
            "memory_bandwidth_bytes_per_s": self.memory_bandwidth_bytes_per_s,
        }
        if self.threads is not None:
            extra["threads"] = self.threads
        if self.efficiency is not None:
            extra["efficiency"] = self.efficiency
        return Device(
            name=self.name,
            memory_bytes=self.memory_bytes,
            kind=self.kind,
            extra=extra,
            transfers_occupy_device=self.transfers_occupy_device,
        )


@dataclass(frozen=True)
class DeviceSet:
    devices: tuple[DeviceSpec, ...]
    default_link: Link = DEFAULT_LINK
    pair_links: Mapping[tuple[str, str], Link] = field(default_factory=dict)

    @property
    def providers(self) -> tuple[str, ...]:
        """The execution providers present, in device order, each once."""
        return tuple(dict.fromkeys(d.provider for d in self.devices))


# ------------------------------------------------------------------------ file
def load_devices(path: str | Path) -> DeviceSet:
    text = read_text(path, "devices file", DevicesError)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise DevicesError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    return parse_devices(data, str(path))


def parse_devices(data: Any, where: str = "devices") -> DeviceSet:
    """Validate a devices document (already parsed from YAML or JSON)."""
    if not isinstance(data, dict):
        raise DevicesError(f"{where}: a devices file is a mapping with 'devices' and 'links'")
    _no_unknown_keys(data, ("devices", "links"), where)
    entries = data.get("devices")
    if not isinstance(entries, list) or not entries:
        raise DevicesError(f"{where}.devices must be a non-empty list of devices")
    devices: list[DeviceSpec] = []
    groups: dict[str, list[str]] = {}
    for i, entry in enumerate(entries):
        expanded = _parse_device(entry, f"{where}.devices[{i}]")
        groups[entry["name"]] = [d.name for d in expanded]
        devices.extend(expanded)
    seen: set[str] = set()
    for d in devices:
        if d.name in seen:
            raise DevicesError(f"{where}.devices: device name {d.name!r} appears twice")
        seen.add(d.name)
        groups.setdefault(d.name, [d.name])
    default_link, pair_links = _parse_links(data.get("links", {}), f"{where}.links", groups)
    return DeviceSet(tuple(devices), default_link, pair_links)


def _parse_device(entry: Any, where: str) -> list[DeviceSpec]:
    if not isinstance(entry, dict):
        raise DevicesError(f"{where} must be a mapping with {', '.join(_REQUIRED)}")
    _no_unknown_keys(entry, _REQUIRED + _OPTIONAL, where)
    for key in _REQUIRED:
        if key not in entry:
            raise DevicesError(f"{where}.{key} is missing")
    name = entry["name"]
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise DevicesError(
            f"{where}.name {name!r} must be letters, digits, '.', '_' or '-' (e.g. gpu-a100)"
        )
    kind = entry["kind"]
    if kind not in DEVICE_KINDS:
        raise DevicesError(f"{where}.kind is {kind!r}: use one of {', '.join(DEVICE_KINDS)}")
    provider = entry.get("provider", DEFAULT_PROVIDER[kind])
    if not isinstance(provider, str) or not provider.endswith("ExecutionProvider"):
        raise DevicesError(
            f"{where}.provider {provider!r} is not an ONNX Runtime execution provider name "
            "(e.g. CPUExecutionProvider, CUDAExecutionProvider)"
        )
    overhead = entry.get("launch_overhead_ms")
    efficiency = None if "efficiency" not in entry else _positive(entry, "efficiency", where)
    if efficiency is not None and efficiency > 1:
        raise DevicesError(
            f"{where}.efficiency is {entry['efficiency']!r}: it is a fraction of the peaks, at "
            "most 1 (a device faster than its peaks needs higher peak figures)"
        )
    occupy = entry.get("transfers_occupy_device")
    if occupy is not None and not isinstance(occupy, bool):
        raise DevicesError(f"{where}.transfers_occupy_device is {occupy!r}: use true or false")
    device = DeviceSpec(
        name=name,
        kind=kind,
        provider=provider,
        peak_flops=_positive(entry, "peak_flops", where),
        memory_bandwidth_bytes_per_s=_positive(entry, "memory_bandwidth_bytes_per_s", where),
        memory_bytes=int(_positive(entry, "memory_bytes", where)),
        threads=_integer(entry, "threads", where),
        launch_overhead_ms=None
        if overhead is None
        else _positive(entry, "launch_overhead_ms", where, allow_zero=True),
        efficiency=efficiency,
        transfers_occupy_device=occupy,
    )
    count = _integer(entry, "count", where)
    if count is None:
        return [device]
    if count > MAX_COUNT:
        raise DevicesError(
            f"{where}.count is {count}: at most {MAX_COUNT} devices of one entry "
            "(a count this large is a typo; the placement would never finish)"
        )
    return [replace(device, name=f"{name}-{i}", device_id=i) for i in range(count)]


def _parse_links(
    data: Any, where: str, groups: Mapping[str, list[str]]
) -> tuple[Link, dict[tuple[str, str], Link]]:
    if not isinstance(data, dict):
        raise DevicesError(f"{where} must be a mapping with 'default' and/or 'pairs'")
    _no_unknown_keys(data, ("default", "pairs"), where)
    default = _link(data["default"], f"{where}.default") if "default" in data else DEFAULT_LINK
    pairs = data.get("pairs", [])
    if not isinstance(pairs, list):
        raise DevicesError(f"{where}.pairs must be a list of {{src, dst, bandwidth_bytes_per_s}}")
    explicit: dict[tuple[str, str], Link] = {}
    for i, pair in enumerate(pairs):
        w = f"{where}.pairs[{i}]"
        if not isinstance(pair, dict):
            raise DevicesError(f"{w} must be a mapping with src, dst, bandwidth_bytes_per_s")
        _no_unknown_keys(pair, ("src", "dst", *_LINK_KEYS), w)
        ends = []
        for key in ("src", "dst"):
            if pair.get(key) not in groups:
                raise DevicesError(
                    f"{w}.{key} {pair.get(key)!r} is not a device; devices are {', '.join(groups)}"
                )
            ends.append(groups[pair[key]])
        link = _link(pair, w)
        for src in ends[0]:
            for dst in ends[1]:
                if src != dst:
                    explicit[(src, dst)] = link
    links = {(dst, src): link for (src, dst), link in explicit.items()}
    links.update(explicit)  # an explicitly listed direction wins over the mirrored one
    return default, links


def _link(data: Any, where: str) -> Link:
    if not isinstance(data, dict):
        raise DevicesError(f"{where} must be a mapping with bandwidth_bytes_per_s, latency_ms")
    if where.endswith(".default"):
        _no_unknown_keys(data, _LINK_KEYS, where)
    if "bandwidth_bytes_per_s" not in data:
        raise DevicesError(f"{where}.bandwidth_bytes_per_s is missing")
    return Link(
        bandwidth_bytes_per_s=_positive(data, "bandwidth_bytes_per_s", where),
        latency_ms=_positive(data, "latency_ms", where, allow_zero=True)
        if "latency_ms" in data
        else 0.0,
    )


def _no_unknown_keys(data: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in data:
        if key not in allowed:
            raise DevicesError(
                f"{where}: unknown key {key!r}; allowed keys are {', '.join(allowed)}"
            )


def _number(data: Mapping[str, Any], key: str, where: str) -> float:
    value = data[key]
    if isinstance(value, bool):
        raise DevicesError(f"{where}.{key} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DevicesError(f"{where}.{key} must be a number, got {value!r}") from None


def _positive(data: Mapping[str, Any], key: str, where: str, allow_zero: bool = False) -> float:
    value = _number(data, key, where)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise DevicesError(f"{where}.{key} is {data[key]!r}: it must be finite and {bound}")
    return value


def _integer(data: Mapping[str, Any], key: str, where: str) -> int | None:
    """A whole number >= 1, or None when the key is absent."""
    if key not in data:
        return None
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DevicesError(f"{where}.{key} is {value!r}: it must be a whole number >= 1")
    return value


# ---------------------------------------------------------------- this machine
# Published FP32 peak FLOP/s and memory bandwidth of common NVIDIA data-centre GPUs, matched on
# the name `nvidia-smi` reports; an unknown GPU gets the T4's figures (the most modest here).
_GPU_PEAKS: tuple[tuple[str, float, float], ...] = (
    ("H200", 67e12, 4.8e12),
    ("H100", 67e12, 3.35e12),
    ("A100", 19.5e12, 1.555e12),
    ("L40S", 91.6e12, 0.864e12),
    ("L4", 30.3e12, 0.3e12),
    ("A10", 31.2e12, 0.6e12),
    ("V100", 15.7e12, 0.9e12),
    ("T4", 8.1e12, 0.32e12),
)


def available_cores() -> list[int]:
    """The cores the calling thread may run on (a stage server's pinned ones, in its threads)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


@contextlib.contextmanager
def pinned(cores: Iterable[int]) -> Iterator[None]:
    """The calling thread pinned to `cores` for a while (Linux: affinity is per thread, and the
    threads it starts meanwhile, ONNX Runtime's among them, keep it); no cores, or a platform
    without thread affinity: left alone."""
    cores = set(cores)
    if not cores or not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def local_devices() -> DeviceSet:
    """This machine's devices (see the module docstring); links are gRPC over loopback."""
    cores = len(available_cores())
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cpu = DeviceSpec(
        name="cpu-0",
        kind="cpu",
        provider=CPU,
        peak_flops=cores * _cpu_hz() * _cpu_flops_per_cycle(),
        # Roughly what one socket's memory system streams; a guess until measured.
        memory_bandwidth_bytes_per_s=min(10e9 * cores, 100e9),
        memory_bytes=memory,
        threads=cores,
    )
    return DeviceSet((cpu, *_local_gpus()), default_link=LOOPBACK_LINK)


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _cpu_hz() -> float:
    mhz = re.findall(r"^cpu MHz\s*:\s*([\d.]+)", _cpuinfo(), flags=re.MULTILINE)
    return max(float(m) for m in mhz) * 1e6 if mhz else 2.5e9


def _cpu_flops_per_cycle() -> int:
    """FP32 FLOP per cycle and core: vector lanes × 2 (fused multiply-add) × 2 FMA units."""
    match = re.search(r"^flags\s*:\s*(.*)$", _cpuinfo(), flags=re.MULTILINE)
    flags = set(match.group(1).split()) if match else set()
    if "avx512f" in flags:
        return 16 * 2 * 2
    if "avx2" in flags and "fma" in flags:
        return 8 * 2 * 2
    return 4 * 2  # SSE / NEON class: 4 lanes, multiply-add


def _local_gpus() -> list[DeviceSpec]:
    import onnxruntime

    if CUDA not in onnxruntime.get_available_providers():
        return []
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for index, line in enumerate(row for row in out.splitlines() if row.strip()):
        name, _, memory_mib = line.rpartition(",")
        flops, bandwidth = next(
            ((f, b) for key, f, b in _GPU_PEAKS if key in name.upper()), _GPU_PEAKS[-1][1:]
        )
        gpus.append(
            DeviceSpec(
                name=f"gpu-{index}",
                kind="gpu",
                provider=CUDA,
                peak_flops=flops,
                memory_bandwidth_bytes_per_s=bandwidth,
                memory_bytes=int(float(memory_mib) * 2**20),
                device_id=index,
            )
        )
    return gpus
