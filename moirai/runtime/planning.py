"""From an ONNX file to a stage plan: the pipeline as `moirai serve` and `moirai demo` run it.

load → cost graph (analytic or measured profile) → solver → stage plan. The
plan's groups are the cost graph's tasks (`Task.ops` are canonical node names) in the order of
the solver's schedule, so stages follow the schedule the solver predicted.

The cost graph starts a request with the model inputs already on every device and ends it when
the last task finishes; a served request also travels from the client to the gateway, from the
gateway to the first stages, from the last stages back to the gateway and to the client.
`gateway_ms` prices those hops, and the plan's `predicted.latency_ms` (what `moirai demo` and the
benchmark compare with the measured latency) is the solver's makespan plus them.

`--devices local` describes this machine as one CPU device with every core; serving wants one
stage server per core group, so `split_cpu` cuts it into N devices of cores/N threads each
(by default one per core, capped at 4), each later pinned to its own cores by the local runtime.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import helper

from moirai.costgraph import CostGraph, Link
from moirai.devices import DeviceSet
from moirai.errors import MoiraiError
from moirai.graph import load_model
from moirai.partition import ONNX_DATATYPES, DeviceSpec, StagePlan, build_plan
from moirai.pipeline import build_costgraph
from moirai.placement import Objective, solve
from moirai.placement.result import Placement
from moirai.profile import Profile

MAX_LOCAL_CPU_DEVICES = 4
# What one hop between local stage servers costs, as the solver should see it. Measured on the
# 2-core development machine (bench/results/runtime.md): over the same-host fast path a push
# takes about 0.35 ms of wall time plus 1-1.4 GB/s, but with pipelined requests it costs about
# 0.35 ms of CPU on each end, and for a CPU device that is the device's own core. The throughput
# objective charges transfers to separate link ports, not to the devices, so the latency here
# is the CPU of both ends (0.7 ms): priced at the wall time alone, the solver cuts models into
# many more stages, whose hops then take the time of the compute they were meant to balance
# (squeezenet: 12 stages instead of 7). The cost model's bare loopback link is cheaper still. A
# measured profile (`--profile measured`) brings its own measured link instead.
SERVING_LOOPBACK = Link(bandwidth_bytes_per_s=1.0e9, latency_ms=0.7)
# The client's Open Inference Protocol call to the gateway: one gRPC round trip carrying the
# inputs one way and the outputs the other (measured like the chain's gRPC path).
CLIENT_LOOPBACK = Link(bandwidth_bytes_per_s=0.55e9, latency_ms=0.9)
_ITEMSIZE = {
    name: helper.tensor_dtype_to_np_dtype(onnx_type).itemsize
    for onnx_type, name in ONNX_DATATYPES.items()
}


def available_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]


def split_cpu(devices: DeviceSet, parts: int | None = None) -> DeviceSet:
    """Cut each CPU device into `parts` devices of equal thread count and peak, linked by
    `SERVING_LOOPBACK`."""
    cpus = [d for d in devices.devices if d.kind == "cpu"]
    out = []
    for d in devices.devices:
        if d.kind != "cpu":
            out.append(d)
            continue
        threads = d.threads or len(available_cores())
        n = parts or min(threads, MAX_LOCAL_CPU_DEVICES)
        if not 1 <= n <= threads:
            raise MoiraiError(
                f"--cpu-devices {n}: {d.name} has {threads} cores; use 1 to {threads}"
            )
        prefix = d.name.rsplit("-", 1)[0] if len(cpus) == 1 else d.name
        out += [
            dataclasses.replace(
                d,
                name=f"{prefix}-{i}",
                threads=threads // n,
                peak_flops=d.peak_flops / n,
                memory_bandwidth_bytes_per_s=d.memory_bandwidth_bytes_per_s / n,
                memory_bytes=d.memory_bytes // n,
                device_id=i,
            )
            for i in range(n)
        ]
    return dataclasses.replace(devices, devices=tuple(out), default_link=SERVING_LOOPBACK)


def core_sets(plan: StagePlan) -> dict[str, list[int]]:
    """Disjoint cores for the plan's CPU devices, in plan order (empty when they do not fit)."""
    cores = available_cores()
    out: dict[str, list[int]] = {}
    start = 0
    for d in plan.devices:
        if d.kind == "cpu" and d.threads:
            if start + d.threads > len(cores):
                return {}
            out[d.name] = cores[start : start + d.threads]
            start += d.threads
    return out


@dataclass
class Planned:
    model: onnx.ModelProto
    costgraph: CostGraph
    placement: Placement
    plan: StagePlan


def plan_model(
    model_path: str | Path,
    devices: DeviceSet,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    solver: str = "auto",
    objective: Objective = "latency",
    time_limit: float = 10.0,
    seed: int = 0,
    profile: Profile | None = None,
    max_tasks: int | None = None,
) -> Planned:
    """`profile` prices the tasks (default: the analytic model; see `moirai.profile.resolve`);
    `max_tasks` coarsens the fusion groups to at most that many tasks, which bounds how many
    stages the solver can cut the model into (every stage costs a hop on each side)."""
    model_path = Path(model_path)
    shapes = {k: list(v) for k, v in (input_shapes or {}).items()}
    costgraph = build_costgraph(
        model_path, devices, shapes or None, profile=profile, max_tasks=max_tasks
    )
    placement = solve(costgraph, solver, objective, time_limit=time_limit, seed=seed)
    model = load_model(model_path, shapes or None)
    source = costgraph.extra.get("source", {})
    plan = build_plan(
        model,
        placement.assignment,
        [
            DeviceSpec(
                d.name,
                d.kind,
                threads=d.threads if d.kind == "cpu" else None,
                device_id=d.device_id if d.kind == "gpu" else None,
            )
            for d in devices.devices
        ],
        groups={t.id: t.ops for t in costgraph.tasks},
        start_ms={s.task: s.start_ms for s in placement.schedule},
        model_name=model_path.stem,
        model_path=str(model_path),
        model_sha256=str(source.get("sha256", "")),
        input_shapes=shapes,
        predicted={
            "solver": placement.solver,
            "status": placement.status,
            "objective": placement.objective,
            "makespan_ms": placement.makespan_ms,
            "period_ms": placement.period_ms,
            "lower_bound_ms": placement.lower_bound_ms,
        },
    )
    hops = gateway_ms(plan, costgraph.default_link)
    plan = dataclasses.replace(
        plan,
        predicted={
            **plan.predicted,
            "gateway_ms": hops,
            "latency_ms": (placement.makespan_ms or 0.0) + hops,
        },
    )
    return Planned(model, costgraph, placement, plan)


def _nbytes(plan: StagePlan, tensors: Sequence[str]) -> int:
    """Bytes of these tensors; a dimension that is not fixed counts as 1."""
    total = 0
    for name in tensors:
        spec = plan.spec(name)
        total += math.prod(max(1, d) for d in spec.shape) * _ITEMSIZE[spec.datatype]
    return total


def gateway_ms(plan: StagePlan, chain: Link, client: Link = CLIENT_LOOPBACK) -> float:
    """The hops of a served request that the cost graph leaves out: the client's call to the
    gateway (inputs there, outputs back, one round trip over `client`), the gateway's pushes of
    the inputs to the first stages and the last stages' pushes of the outputs to the gateway
    (over `chain`; the pushes to or from several stages run at once, so the largest counts)."""
    inputs = [t.name for t in plan.inputs]
    outputs = [t.name for t in plan.outputs]
    push_in = max(
        (
            chain.transfer_ms(_nbytes(plan, [t for t in s.inputs if t in inputs]))
            for s in plan.stages
            if any(t in inputs for t in s.inputs)
        ),
        default=0.0,
    )
    push_out = max(
        (
            chain.transfer_ms(_nbytes(plan, [t for t in s.outputs if t in outputs]))
            for s in plan.stages
            if any(t in outputs for t in s.outputs)
        ),
        default=0.0,
    )
    return client.transfer_ms(_nbytes(plan, inputs) + _nbytes(plan, outputs)) + push_in + push_out


def describe(plan: StagePlan) -> str:
    """A person's view of a plan: devices, stages with their border tensors, predictions."""
    p = plan.predicted
    lines = [
        f"model {plan.model_name}: {len(plan.stages)} stages on "
        + ", ".join(
            f"{d.name} ({d.kind}, {d.threads or 'all'} threads)"
            if d.kind == "cpu"
            else f"{d.name} (gpu {d.device_id or 0})"
            for d in plan.devices
            if d.name in plan.used_devices
        )
    ]
    if p:
        lines.append(
            f"solver {p.get('solver')} ({p.get('status')}), objective {p.get('objective')}: "
            f"predicted latency {p.get('latency_ms', p.get('makespan_ms', 0)):.2f} ms "
            f"(makespan {p.get('makespan_ms', 0):.2f} ms + gateway hops "
            f"{p.get('gateway_ms', 0):.2f} ms), period {p.get('period_ms') or 0:.2f} ms"
        )
    for s in plan.stages:
        ins = ", ".join(s.inputs) or "-"
        outs = ", ".join(s.outputs)
        lines.append(f"  {s.id:>4} on {s.device:<8} {len(s.nodes):>4} nodes  {ins} -> {outs}")
    return "\n".join(lines)


def parse_input_shapes(values: Sequence[str]) -> dict[str, list[int]]:
    """`NAME=1x3x224x224` (or commas) flags as a mapping."""
    shapes: dict[str, list[int]] = {}
    for value in values:
        name, sep, dims = value.partition("=")
        try:
            shapes[name] = [int(d) for d in dims.replace(",", "x").split("x")]
        except ValueError:
            sep = ""
        if not sep or not name:
            raise MoiraiError(f"--input-shape {value!r}: write NAME=DIMS, e.g. input=1x3x224x224")
    return shapes
