"""Step 3 of the pipeline: what each task costs on each device.

A profile source answers one question for the cost graph builder: how many milliseconds does
each group take on each device. `build_costgraph` depends only on the `Profile` protocol, so the
analytic model here (`moirai.profile.analytic`, no hardware needed) and measured profiling
(ONNX Runtime's timings on the real devices) are interchangeable. A source sees the whole model
and all groups at once, because measuring is cheapest per model (one profiled run per device),
not per group.

A source that knows more than task times (a measured link, where each number came from) also
implements `Annotates`: `build_costgraph` hands it the finished cost graph to amend. A source
that knows what one session call costs (a measured one) implements `PricesCalls`: the served
prediction charges it once per stage.
`moirai.planning.inputs.resolve_profile` turns the command line's
`--profile measured|analytic|FILE` into a source.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

from moirai.costgraph import CostGraph
from moirai.devices import DeviceSpec
from moirai.fusion import Group
from moirai.graph import OpGraph


class Profile(Protocol):
    name: str
    """Recorded in the cost graph's `source.profile`, e.g. "analytic"."""

    def compute_ms(
        self, graph: OpGraph, groups: Sequence[Group], devices: Sequence[DeviceSpec]
    ) -> list[Mapping[str, float]]:
        """For each group, device name → milliseconds; a device left out cannot run it."""
        ...


@runtime_checkable
class PricesCalls(Protocol):
    def call_overhead_ms(self, device: DeviceSpec) -> float | None:
        """What one session call costs on `device` beyond its kernels (None: not known)."""
        ...


@runtime_checkable
class Annotates(Protocol):
    def annotate(self, costgraph: CostGraph) -> CostGraph:
        """The cost graph amended with what this source knows beyond task times."""
        ...
