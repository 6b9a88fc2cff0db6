"""Several models on the same devices, their memory shared: what `moirai serve` plans when it
serves more than one model behind one endpoint.

Each model is planned as it would be alone (`plan_model`, through the caller's `plan_one`), one
after the other, and sees the devices with what the models planned before it hold taken off
their memory, so the solvers keep every model's stages within what is left. Models are planned
largest first (by the bytes of their weights): as in first-fit decreasing packing, the models
that need most room choose first, while it is there. The first model also chooses the devices
(how this machine's CPU is grouped into stage servers, `moirai.planning.space`), and every other
model is planned on those same devices, so that memory is counted per device. The solvers do
not see the other models' compute, only their memory: so that models do not pile onto one
device while an equal one idles, each model is offered the devices least busy first (by the
compute time per request that the models before it place there), and the solvers take the first
of equal devices.

What a plan holds on a device is the memory of the tasks that each of its lanes places there
(weights and activations: the cost graph's `memory_bytes`, the figures the solvers' memory
constraints use) and, on a CPU device, its stage server's fixed overhead
(`moirai.sessions.STAGE_SERVER_OVERHEAD_BYTES`): the cost graph reserves one stage server's per
device, and every model's stage server on a device is a process of its own. A model that does
not fit in what the others leave is refused in one line that says what they hold
(`InfeasibleError`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from moirai.devices import DeviceSet
from moirai.errors import InfeasibleError
from moirai.placement.problem import gib
from moirai.planning.inputs import PlanningInputs
from moirai.planning.pipeline import Planned
from moirai.sessions import STAGE_SERVER_OVERHEAD_BYTES

PlanOne = Callable[[PlanningInputs, Sequence[DeviceSet]], Planned]
"""Plans one model (its inputs) on the device sets given, as `plan_model` does."""


@dataclass(frozen=True)
class Together:
    """The plans of several models on shared devices."""

    planned: dict[str, Planned]
    """By model name, in the order the models were given."""
    devices: DeviceSet
    """The devices every model is planned on, with their whole memory."""
    held: dict[str, dict[str, int]]
    """Device -> model -> the bytes that model's plan holds there."""

    def describe_memory(self) -> str:
        """How the devices' memory is split between the models, in one line."""
        overhead = any(d.kind == "cpu" for d in self.devices.devices)
        parts = []
        for d in self.devices.devices:
            held = self.held.get(d.name, {})
            free = d.memory_bytes - sum(held.values())
            models = ", ".join(f"{m} {gib(b)}" for m, b in held.items())
            parts.append(f"{d.name} ({gib(d.memory_bytes)}): {models + ', ' if models else ''}"
                         f"{gib(free)} free")  # fmt: skip
        each = f" (each CPU stage server {gib(STAGE_SERVER_OVERHEAD_BYTES)} beside its tasks)"
        return f"memory{each if overhead else ''}: " + "; ".join(parts)


def held_memory(planned: Planned) -> dict[str, int]:
    """Bytes each device holds of a plan: the memory of the tasks every lane places on it, and
    the fixed overhead of its stage server on a CPU device (module docstring)."""
    memory = {t.id: t.memory_bytes for t in planned.costgraph.tasks}
    cpus = {d.name for d in planned.costgraph.devices if d.kind == "cpu"}
    out: dict[str, int] = {}
    for placement in planned.placements:
        for task, device in placement.assignment.items():
            if device not in out:
                out[device] = STAGE_SERVER_OVERHEAD_BYTES if device in cpus else 0
            out[device] += memory[task]
    return out


def busy_ms(planned: Planned) -> dict[str, float]:
    """Compute time per request that each device spends on a plan (every lane's tasks)."""
    compute = {t.id: t.compute_ms for t in planned.costgraph.tasks}
    out: dict[str, float] = {}
    for placement in planned.placements:
        for task, device in placement.assignment.items():
            out[device] = out.get(device, 0.0) + compute[task].get(device, 0.0)
    return out


def _left(
    devices: DeviceSet, held: Mapping[str, Mapping[str, int]], busy: Mapping[str, float]
) -> DeviceSet:
    """`devices` with what the models hold taken off their memory, least busy first."""
    return dataclasses.replace(
        devices,
        devices=tuple(
            dataclasses.replace(
                d, memory_bytes=max(0, d.memory_bytes - sum(held.get(d.name, {}).values()))
            )
            for d in sorted(devices.devices, key=lambda d: busy.get(d.name, 0.0))
        ),
    )


def _weight_bytes(inputs: PlanningInputs) -> int:
    graph = inputs.model.graph
    return graph.weight_bytes(n.name for n in graph.nodes)


def plan_together(models: Mapping[str, PlanningInputs], plan_one: PlanOne) -> Together:
    """Plan every model of `models` (by name) on shared devices (module docstring)."""
    order = sorted(models, key=lambda name: -_weight_bytes(models[name]))
    planned: dict[str, Planned] = {}
    held: dict[str, dict[str, int]] = {}
    busy: dict[str, float] = {}
    devices: DeviceSet | None = None
    for name in order:
        inputs = models[name]
        if devices is None:
            result = plan_one(inputs, inputs.device_sets)
            devices = result.layout.devices
        else:
            try:
                result = plan_one(inputs, [_left(devices, held, busy)])
            except InfeasibleError as e:
                split = Together(planned, devices, held).describe_memory()
                raise InfeasibleError(
                    f"model {name!r} does not fit beside {', '.join(repr(m) for m in planned)} "
                    f"in the devices' memory ({split}): {e}; serve fewer models together, or on "
                    "devices with more memory"
                ) from None
        planned[name] = result
        for device, nbytes in held_memory(result).items():
            if nbytes:
                held.setdefault(device, {})[name] = nbytes
        for device, ms in busy_ms(result).items():
            busy[device] = busy.get(device, 0.0) + ms
    assert devices is not None
    return Together({name: planned[name] for name in models}, devices, held)
