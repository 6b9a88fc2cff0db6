"""Planning: matched pools and a model → a `Plan`, with Moirai's library doing the real work.

    pools ──catalogue──► devices ──moirai.planning.plan_model──► stage plan, placement,
                                                                 predicted latency

The operator plans exactly as `moirai serve` does (cost graph, solver, stage plan, the latency
predicted for the plan as served, gateway hops included); what it adds goes in through
`plan_model`'s hooks: the devices described from the pools (`catalogue.py`), a memory check
before the solver, and the solver's thread count; a spec that batches is refused (InvalidSpec)
when the plan shows no batch dimension to batch along. It keeps the result in a `Plan`. All of it is
CPU work (ONNX loading, profiling estimates, a solver that may run for the whole time limit), so
`Planner` runs it in a dedicated thread pool: the event loop keeps serving the other
PlacedModels, and at most `solver_workers` solves compete for the cores. A `stop` Event, set
from the event loop (`reconcile`, when the PlacedModel changed meanwhile), ends the solve
early (`SolveOptions.stop`), so a superseded solve frees its worker within about a second.
The memory check catches the one infeasibility a person most often meets — the model does not
fit in the devices — so the message can say how much is needed and how much the pools offer.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moirai.costgraph import CostGraph, Link
from moirai.devices import DeviceSet, DeviceSpec
from moirai.errors import MoiraiError
from moirai.placement.problem import gib
from moirai.sessions import STAGE_SERVER_OVERHEAD_BYTES
from moirai_operator.catalogue import Catalogue, DevicesDocument, devices_document
from moirai_operator.plan import Plan, PlannedDevice
from moirai_operator.pools import PoolMatch
from moirai_operator.spec import PlacedModelSpec, SpecError
from moirai_operator.status import InsufficientMemoryError, ProfilingError

_BESIDE = f"beside the {gib(STAGE_SERVER_OVERHEAD_BYTES)} a CPU stage server holds itself"


def device_set(doc: DevicesDocument) -> DeviceSet:
    return DeviceSet(
        devices=tuple(
            DeviceSpec(
                name=d.name,
                kind=d.kind,
                provider=d.provider,
                peak_flops=d.peak_flops,
                memory_bandwidth_bytes_per_s=d.memory_bandwidth_bytes_per_s,
                memory_bytes=d.memory_bytes,
                threads=d.threads if d.kind == "cpu" else None,
                efficiency=d.efficiency,
            )
            for d in doc.devices
        ),
        default_link=Link(doc.link_bandwidth_bytes_per_s, doc.link_latency_ms),
    )


def check_memory(cg: CostGraph) -> None:
    """Raise `InsufficientMemoryError` when the model cannot fit, saying by how much."""
    need = sum(t.memory_bytes for t in cg.tasks)
    have = sum(d.memory_bytes for d in cg.devices)
    largest = max(d.memory_bytes for d in cg.devices)
    biggest = max(cg.tasks, key=lambda t: t.memory_bytes)
    if need > have:
        raise InsufficientMemoryError(
            f"no pool has enough memory: the model needs {gib(need)}, the "
            f"{len(cg.devices)} device(s) offer {gib(have)} in total (largest {gib(largest)}) "
            f"{_BESIDE}; add devices (maxDevices), nodes, or memoryPerDevice"
        )
    if biggest.memory_bytes > largest:
        raise InsufficientMemoryError(
            f"no pool has enough memory: one part of the model ({biggest.id}) needs "
            f"{gib(biggest.memory_bytes)}, the largest device has {gib(largest)} {_BESIDE}"
        )


def in_spec_terms(error: MoiraiError, model_path: Path, uri: str) -> MoiraiError:
    """`error` as a PlacedModel's author reads it: the library names the file it read (here the
    operator's cached download, a path in the operator's pod) and the `moirai` CLI's flags; the
    status names the model's URI and the spec's fields instead."""
    text = str(error).replace(str(model_path), f"model {uri}")
    text = text.replace("--input-shape", "spec.model.inputShapes")
    if text == str(error):
        return error
    try:
        return type(error)(text)
    except TypeError:  # an error class built otherwise: keep it as it is
        return error


@dataclass(frozen=True)
class Planner:
    """Plans with the profiling Jobs' measurements when given (`spec.profiling.mode: measured`),
    else with analytic estimates from the device catalogue."""

    catalogue: Catalogue
    executor: Executor
    threads: int = 1

    async def __call__(
        self,
        spec: PlacedModelSpec,
        pools: Sequence[PoolMatch],
        model_path: Path,
        profile: Mapping[str, Any] | None = None,
        stop: threading.Event | None = None,
    ) -> Plan:
        doc = devices_document(pools, self.catalogue)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self.executor, self._plan, spec, pools, doc, model_path, profile, stop
            )
        except MoiraiError as e:
            raise in_spec_terms(e, model_path, spec.model.uri) from None

    def _plan(
        self,
        spec: PlacedModelSpec,
        pools: Sequence[PoolMatch],
        doc: DevicesDocument,
        model_path: Path,
        profile: Mapping[str, Any] | None,
        stop: threading.Event | None,
    ) -> Plan:
        from moirai.planning import plan_model, resolve
        from moirai.profile.document import ProfileError
        from moirai.sessions import STAGE_SERVER_OVERHEAD_BYTES
        from stage_server.batchconfig import check_batchable

        try:
            inputs = resolve(
                model_path,
                device_set(doc),
                input_shapes=spec.model.input_shapes,
                profile=profile,
                origin="profiling Jobs",
            )
        except ProfileError as e:
            raise ProfilingError(f"the profiling Jobs returned a bad profile: {e}") from None
        planned = plan_model(
            inputs.model,
            inputs.device_sets,
            solver=spec.placement.solver,
            objective="throughput" if spec.placement.objective == "throughput" else "latency",
            time_limit=spec.placement.time_limit_seconds,
            profile=inputs.profile,
            threads=self.threads,
            check=check_memory,
            fused_front_end=False,  # the gateway is a Deployment of its own
            stop=stop,
        )
        placement, stage_plan = planned.placement, planned.plan
        if spec.serving.batching.enabled:
            try:
                check_batchable(
                    stage_plan.model_name,
                    stage_plan.inputs,
                    stage_plan.outputs,
                    "spec.serving.batching.maxBatchSize",
                )
            except MoiraiError as e:
                raise SpecError(str(e)) from None
        used = set(stage_plan.used_devices)
        tasks = planned.tasks_per_device()
        memory: Counter[str] = Counter()
        for task in planned.costgraph.tasks:
            memory[placement.assignment[task.id]] += task.memory_bytes
        by_pool = {m.spec.name: m for m in pools}
        devices = tuple(
            PlannedDevice(
                entry=d,
                node_selector=by_pool[d.pool].node_selector,
                gpus=by_pool[d.pool].spec.gpus_per_device if d.kind == "gpu" else 0,
                memory_request=by_pool[d.pool].spec.memory_per_device,
                tasks=tasks[d.name],
                memory_bytes=memory[d.name] + STAGE_SERVER_OVERHEAD_BYTES if d.kind == "cpu" else 0,
            )
            for d in doc.devices
            if d.name in used
        )
        return Plan(
            devices=devices,
            stages=len(stage_plan.stages),
            stage_plan=stage_plan.to_dict(),
            placement=placement.to_dict(),
            solver=placement.solver,
            solver_status=placement.status,
            objective=placement.objective,
            latency_ms=stage_plan.predicted["latency_ms"],
            lower_bound_ms=placement.lower_bound_ms,
            gap=placement.gap,
            profiling=spec.profiling,
            notes=doc.notes,
        )
