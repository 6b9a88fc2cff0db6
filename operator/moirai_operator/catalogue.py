"""The device catalogue: what one device of a matched pool can do, for analytic profiling.

Kubernetes tells the operator which GPU product a node has (`nvidia.com/gpu.product`) and how
many cores and bytes it offers, but not how fast they are. The catalogue (`catalogue.yaml`,
shipped with the package; extended or overridden by the Helm value `deviceCatalogue`) maps a GPU
product to its peak FLOP/s, memory bandwidth and memory, and gives per-core figures for CPUs.
`devices_document` turns matched pools into one device entry per slot, the input of the cost
model; an unknown GPU product falls back to the `default` entry and is reported, so a person can
add it rather than wonder why the plan is slow.

The figures are published peaks, passed on as they are: how much of them kernels reach is the
cost model's one decision (`moirai.profile.analytic`, its default per device kind and thread
count). An entry that knows better — from a measurement of that hardware — says so with its own
`efficiency`, which becomes the device's `efficiency` key; the built-in entries set none.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from moirai.errors import MoiraiError
from moirai_operator.pools import PoolMatch


class CatalogueError(MoiraiError):
    """The device catalogue (the package's or the Helm value's) is malformed."""


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@dataclass(frozen=True)
class Catalogue:
    raw: Mapping[str, Any]

    @classmethod
    def load(cls, override: str | Path | None = None) -> Catalogue:
        """The built-in catalogue, with the entries of the YAML file `override` merged in."""
        base = yaml.safe_load(
            resources.files("moirai_operator").joinpath("catalogue.yaml").read_text()
        )
        if override:
            try:
                extra = yaml.safe_load(Path(override).read_text()) or {}
            except (OSError, yaml.YAMLError) as e:
                raise CatalogueError(f"device catalogue {override}: {e}") from None
            if not isinstance(extra, dict):
                raise CatalogueError(f"device catalogue {override}: must be a YAML mapping")
            base = _merge(base, extra)
        cat = cls(base)
        cat.check()
        return cat

    def check(self) -> None:
        if "efficiency" in self.raw:
            raise CatalogueError(
                "device catalogue: a top-level `efficiency` is no longer read (the peaks are "
                "passed on unscaled); set `cpu.efficiency` or `gpus.<product>.efficiency` in "
                "(0, 1] for the devices it was measured on, or drop it"
            )
        try:
            for key in (
                "peakFlopsPerCore",
                "memoryBandwidthBytesPerSPerCore",
                "maxMemoryBandwidthBytesPerS",
            ):
                float(self.raw["cpu"][key])
            _efficiency(self.raw["cpu"], "cpu")
            for name, gpu in self.raw["gpus"].items():
                for key in ("peakFlops", "memoryBandwidthBytesPerS", "memoryBytes"):
                    if float(gpu[key]) <= 0:
                        raise CatalogueError(f"device catalogue gpus.{name}.{key} must be > 0")
                _efficiency(gpu, f"gpus.{name}")
            float(self.raw["links"]["bandwidthBytesPerS"])
            float(self.raw["links"]["latencyMs"])
        except (KeyError, TypeError, ValueError) as e:
            raise CatalogueError(f"device catalogue is missing or has a bad entry: {e}") from None

    def gpu(self, product: str | None) -> tuple[Mapping[str, Any], bool]:
        """The entry for a GPU product, and whether it was known (else `default`)."""
        gpus = self.raw["gpus"]
        if product and product in gpus:
            return gpus[product], True
        return gpus["default"], False


def _efficiency(entry: Mapping[str, Any], where: str) -> float | None:
    """An entry's own `efficiency`, if it has one; a fraction of the peaks, in (0, 1]."""
    if "efficiency" not in entry:
        return None
    value = float(entry["efficiency"])
    if not 0 < value <= 1:
        raise CatalogueError(
            f"device catalogue {where}.efficiency is {entry['efficiency']!r}: it is the share "
            "of the peaks that kernels reach, in (0, 1]"
        )
    return value


@dataclass(frozen=True)
class DeviceEntry:
    """One device (one stage-server slot) of a pool, in the shape of `moirai.devices`."""

    name: str
    kind: str
    pool: str
    provider: str
    threads: int
    peak_flops: float
    memory_bandwidth_bytes_per_s: float
    memory_bytes: int
    efficiency: float | None = None
    """The catalogue entry's own share of the peaks kernels reach; None: the cost model's
    default for the kind and thread count."""


@dataclass(frozen=True)
class DevicesDocument:
    devices: tuple[DeviceEntry, ...]
    link_bandwidth_bytes_per_s: float
    link_latency_ms: float
    notes: tuple[str, ...] = field(default_factory=tuple)
    """Things a person may want to fix (e.g. a GPU product missing from the catalogue)."""


def device_name(pool: str, index: int) -> str:
    return f"{pool}-{index}"


def devices_document(pools: Sequence[PoolMatch], catalogue: Catalogue) -> DevicesDocument:
    cpu = catalogue.raw["cpu"]
    devices: list[DeviceEntry] = []
    notes: list[str] = []
    for match in pools:
        req = match.spec
        node = match.weakest
        if req.kind == "gpu":
            entry, known = catalogue.gpu(node.gpu_product)
            if not known:
                notes.append(
                    f"pool {req.name}: GPU product {node.gpu_product or '(no label)'} is not "
                    "in the device catalogue; planned with the 'default' entry"
                )
            memory = node.gpu_memory_bytes or int(entry["memoryBytes"])
            figures = (
                "CUDAExecutionProvider",
                req.threads_per_device,
                float(entry["peakFlops"]),
                float(entry["memoryBandwidthBytesPerS"]),
                memory,
                _efficiency(entry, f"gpus.{node.gpu_product if known else 'default'}"),
            )
        else:
            threads = req.threads_per_device
            bandwidth = min(
                float(cpu["memoryBandwidthBytesPerSPerCore"]) * threads,
                float(cpu["maxMemoryBandwidthBytesPerS"]),
            )
            figures = (
                "CPUExecutionProvider",
                threads,
                float(cpu["peakFlopsPerCore"]) * threads,
                bandwidth,
                match.slot_memory(node),
                _efficiency(cpu, "cpu"),
            )
        provider, threads, flops, bandwidth, memory, efficiency = figures
        for i in range(match.devices):
            devices.append(
                DeviceEntry(
                    name=device_name(req.name, i),
                    kind=req.kind,
                    pool=req.name,
                    provider=provider,
                    threads=threads,
                    peak_flops=flops,
                    memory_bandwidth_bytes_per_s=bandwidth,
                    memory_bytes=memory,
                    efficiency=efficiency,
                )
            )
    links = catalogue.raw["links"]
    return DevicesDocument(
        devices=tuple(devices),
        link_bandwidth_bytes_per_s=float(links["bandwidthBytesPerS"]),
        link_latency_ms=float(links["latencyMs"]),
        notes=tuple(notes),
    )
