"""The plan space beyond an assignment: which devices, and how many copies of the model.

A solver places one copy of the model on a given set of devices. Two choices come before it,
and `plan_model` makes both by the plan's predicted served time:

- **Devices.** This machine's CPU can be one device with every core or several smaller ones
  (`cpu_groupings`, e.g. 1 x 2 threads or 2 x 1 thread on two cores): one large device runs a
  whole model fastest when ONNX Runtime's threads scale, several serve branches or pipeline
  stages side by side. Each grouping is a `DeviceSet`; a devices file or `--cpu-devices` fixes
  one.
- **Lanes** (throughput only). A set of devices may hold one pipeline, or several complete
  copies of the model side by side, each on its own devices (`moirai.planning.lanes`). For n
  devices the candidates are: one lane on all of them; L lanes for every L that divides n, the
  devices dealt out in turn (so alike devices make alike lanes); one replica on each device
  that can hold the model alone; and mixes: where the devices are of several kinds (alike
  devices: same kind, provider, threads, peaks and memory), every choice of kinds whose devices
  each hold a replica while the others form one pipeline (a GPU alone beside a pipeline over
  the CPUs, say). Plain replication is always among them, so a throughput plan is never
  predicted worse than it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from moirai.devices import DeviceSet, available_cores
from moirai.placement import Objective
from moirai.planning.cpu import MAX_LOCAL_CPU_DEVICES, split_cpu


@dataclass(frozen=True)
class Layout:
    """A device set and the devices of each lane on it."""

    devices: DeviceSet
    lanes: tuple[tuple[str, ...], ...]

    def describe(self) -> str:
        by_name = {d.name: d for d in self.devices.devices}

        def device(name: str) -> str:
            d = by_name[name]
            return f"{d.kind} x{d.threads}" if d.kind == "cpu" and d.threads else d.kind

        lanes = [" + ".join(device(n) for n in lane) for lane in self.lanes]
        if len(lanes) == 1:
            return f"one pipeline on {lanes[0]}"
        if len(set(lanes)) == 1:
            return f"{len(lanes)} lanes of {lanes[0]}"
        return f"{len(lanes)} lanes: " + ", ".join(lanes)


def cpu_groupings(devices: DeviceSet) -> list[DeviceSet]:
    """The ways to cut this machine's CPU into stage servers: one device with every core, and
    every number of equal devices up to `MAX_LOCAL_CPU_DEVICES` that divides the cores."""
    cpu = next((d for d in devices.devices if d.kind == "cpu"), None)
    if cpu is None:
        return [devices]
    cores = cpu.threads or len(available_cores())
    parts = [k for k in range(1, min(cores, MAX_LOCAL_CPU_DEVICES) + 1) if cores % k == 0]
    return [split_cpu(devices, k) for k in parts]


def layouts(
    device_sets: Sequence[DeviceSet],
    objective: Objective,
    fits: set[str] | None = None,
) -> list[Layout]:
    """The candidates of the module docstring; `fits` names the devices that can hold the
    whole model alone (default: all)."""
    out: list[Layout] = []
    for devices in device_sets:
        names = tuple(d.name for d in devices.devices)
        candidates = [(names,)]
        if objective == "throughput":
            n = len(names)
            for lanes in range(2, n + 1):
                if n % lanes == 0:
                    candidates.append(tuple(names[k::lanes] for k in range(lanes)))
            alone = tuple((d,) for d in names if fits is None or d in fits)
            if len(alone) > 1:
                candidates.append(alone)
            candidates += _mixes(devices, fits)
        order = {d: i for i, d in enumerate(names)}
        for lanes in dict.fromkeys(
            tuple(sorted(c, key=lambda lane: order[lane[0]])) for c in candidates
        ):
            out.append(Layout(devices, lanes))
    return out


def _mixes(devices: DeviceSet, fits: set[str] | None) -> list[tuple[tuple[str, ...], ...]]:
    """Replicas on the devices of some kinds, one pipeline over the rest (module docstring)."""
    kinds: dict[tuple[object, ...], list[str]] = {}
    for d in devices.devices:
        key = (d.kind, d.provider, d.threads, d.peak_flops, d.memory_bandwidth_bytes_per_s)
        kinds.setdefault((*key, d.memory_bytes), []).append(d.name)
    groups = list(kinds.values())
    out = []
    for chosen in itertools.product((False, True), repeat=len(groups)):
        if all(chosen) or not any(chosen):
            continue
        replicas = [(d,) for g, c in zip(groups, chosen, strict=True) if c for d in g]
        rest = tuple(d for g, c in zip(groups, chosen, strict=True) if not c for d in g)
        if all(fits is None or r[0] in fits for r in replicas):
            out.append((*replicas, rest))
    return out
