"""The operator's plan: what the placement decided, in the terms the child builders need.

`planning.py` computes a `Plan` (model → devices → cost graph → placement → stage plan) and the
child builders (`children.py`) read it; keeping the dataclasses here, free of the solver and
ONNX imports, lets the builders and their tests stay pure and fast.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from moirai_operator.catalogue import DeviceEntry


@dataclass(frozen=True)
class PlannedDevice:
    """A device the placement uses: one stage-server Deployment."""

    entry: DeviceEntry
    node_selector: Mapping[str, str]
    gpus: int
    """nvidia.com/gpu requested (0 on cpu pools)."""
    memory_request: str | None
    """Memory request and limit (the pool's memoryPerDevice), if any."""
    tasks: int
    """Tasks of the cost graph placed on it."""
    memory_bytes: int = 0
    """What its stage server peaks at as planned: the weights and activations of its tasks
    plus a stage server's fixed overhead (`moirai.sessions.STAGE_SERVER_OVERHEAD_BYTES`); the
    pod requests this much. 0 where it is not planned (GPU devices: their memory is the GPU's)."""


@dataclass(frozen=True)
class Plan:
    devices: tuple[PlannedDevice, ...]
    stages: int
    stage_plan: Mapping[str, Any]
    """The `moirai.stageplan/v1` document, without endpoints (the builders add them)."""
    placement: Mapping[str, Any]
    """The `moirai.placement/v1` document."""
    solver: str
    solver_status: str
    objective: str
    latency_ms: float
    """The latency predicted for the plan as served, gateway hops and the client's call
    included (`moirai.planning.prediction`): what `moirai serve` prints for the same plan."""
    lower_bound_ms: float
    """The solver's bound on its objective (the cost graph's makespan or period)."""
    gap: float
    profiling: str
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def digest(self) -> str:
        """Changes exactly when a stage server needs a restart to pick up the plan: the stage
        plan without its informative `predicted` times (which vary from solve to solve)."""
        served = {k: v for k, v in self.stage_plan.items() if k != "predicted"}
        text = json.dumps(served, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]
