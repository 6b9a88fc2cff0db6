"""Step 3 of the pipeline: what each task costs on each device.

A profile source answers one question for the cost graph builder: how many milliseconds does
each group take on each device. `build_costgraph` depends only on the `Profile` protocol, so the
analytic model here (`moirai.profile.analytic`, no hardware needed) and measured profiling
(ONNX Runtime's timings on the real devices) are interchangeable. A source sees the whole model
and all groups at once, because measuring is cheapest per model (one profiled run per device),
not per group.

A source that knows more than task times (a measured link, where each number came from) also
implements `Annotates`: `build_costgraph` hands it the finished cost graph to amend. `resolve`
turns the command line's `--profile measured|analytic|FILE` into a source.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from moirai.costgraph import CostGraph
from moirai.devices import DeviceSpec
from moirai.fusion import Group
from moirai.graph import InputShapes, OpGraph


class Profile(Protocol):
    name: str
    """Recorded in the cost graph's `source.profile`, e.g. "analytic"."""

    def compute_ms(
        self, graph: OpGraph, groups: Sequence[Group], devices: Sequence[DeviceSpec]
    ) -> list[Mapping[str, float]]:
        """For each group, device name → milliseconds; a device left out cannot run it."""
        ...


@runtime_checkable
class Annotates(Protocol):
    def annotate(self, costgraph: CostGraph) -> CostGraph:
        """The cost graph amended with what this source knows beyond task times."""
        ...


def resolve(
    spec: str,
    model_path: str | Path,
    input_shapes: InputShapes | None = None,
    *,
    cache_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    **settings: Any,
) -> Profile:
    """The source `--profile SPEC` names: `analytic` (roofline, no hardware), `measured` (this
    machine's devices, measured now or taken from the profile cache; `settings` are
    `moirai.profile.measured.Settings` fields) or the path of a profile file from
    `moirai profile`, which must have been measured on this model with these input shapes."""
    if spec == "analytic":
        from moirai.profile.analytic import AnalyticProfile

        return AnalyticProfile()
    from moirai.profile.cache import ProfileCache
    from moirai.profile.document import DocumentProfile, ProfileDocument
    from moirai.profile.measured import MeasuredProfile, Settings, model_digest

    if spec == "measured":
        return MeasuredProfile(
            model_path,
            input_shapes,
            settings=Settings(**settings),
            cache=ProfileCache.at(cache_dir),
            progress=progress,
        )
    document = ProfileDocument.load(spec)
    document.check_model(model_digest(model_path), input_shapes or {})
    return DocumentProfile(document, origin=str(spec))
