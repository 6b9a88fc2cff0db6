"""Measured costs where the model can be timed, analytic ones where it cannot.

Measured profiles are the default where the devices are at hand (`moirai serve`, `moirai place
--devices local`, `moirai demo`) to plan better, not because the user asked for them. A model
that runs only on meaningful values (silero-vad's sample rate, which picks the branch of an
`If`) cannot be timed on the random floats and zero integers profiling runs it on
(`measured.UntimeableError`); where measuring was the default, it is planned with analytic costs
instead, and a warning says so. `--profile measured`, asked for, keeps the error.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from moirai.costgraph import CostGraph
from moirai.devices import DeviceSpec
from moirai.fusion import Group
from moirai.graph import OpGraph
from moirai.profile.analytic import AnalyticProfile
from moirai.profile.measured import MeasuredProfile, UntimeableError

log = logging.getLogger(__name__)


class MeasuredElseAnalytic:
    """`measured` until it cannot time the model, `AnalyticProfile` from then on; a `Profile`
    that `Annotates` and `PricesCalls` as the one it is."""

    def __init__(self, measured: MeasuredProfile) -> None:
        self.measured = measured
        self.analytic = AnalyticProfile()
        self.untimeable: str | None = None
        """Why the model could not be timed, once it could not."""

    @property
    def name(self) -> str:
        return self.analytic.name if self.untimeable else self.measured.name

    def compute_ms(
        self, graph: OpGraph, groups: Sequence[Group], devices: Sequence[DeviceSpec]
    ) -> list[Mapping[str, float]]:
        if self.untimeable is None:
            try:
                return self.measured.compute_ms(graph, groups, devices)
            except UntimeableError as e:
                self.untimeable = e.reason
                log.warning("%s: planned with analytic costs instead", e.reason)
        return self.analytic.compute_ms(graph, groups, devices)

    def annotate(self, costgraph: CostGraph) -> CostGraph:
        return costgraph if self.untimeable else self.measured.annotate(costgraph)

    def call_overhead_ms(self, device: DeviceSpec) -> float | None:
        return None if self.untimeable else self.measured.call_overhead_ms(device)
