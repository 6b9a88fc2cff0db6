"""Lanes: several complete copies of the model's chain in one stage plan.

A throughput plan may serve the model on several *lanes*, each a whole copy of the chain on its
own devices (a pipeline over some devices, or a replica on one), and the front end shares the
requests among them by weight (`moirai.stageplan`). The planner solves each lane on its own
devices (`restrict`: the cost graph seen by a lane), builds each lane's stage plan as usual, and
`merge_lanes` puts them into one plan: stage ids renumbered across lanes, routing that lists the
consumers of every lane, each stage tagged with its lane. `lane_view` is the way back: one lane
as a plan of its own, which the served prediction prices lane by lane.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from moirai.costgraph import CostGraph
from moirai.stageplan import GATEWAY, Lane, StagePlan


def restrict(
    costgraph: CostGraph, devices: Sequence[str], rename: Mapping[str, str] | None = None
) -> CostGraph:
    """The cost graph on `devices` only, its devices renamed by `rename` where given (so that
    two lanes on alike devices compare equal)."""
    keep = set(devices)
    rename = dict(rename or {})

    def name(d: str) -> str:
        return rename.get(d, d)

    return dataclasses.replace(
        costgraph,
        devices=tuple(
            dataclasses.replace(d, name=name(d.name)) for d in costgraph.devices if d.name in keep
        ),
        tasks=tuple(
            dataclasses.replace(
                t, compute_ms={name(d): ms for d, ms in t.compute_ms.items() if d in keep}
            )
            for t in costgraph.tasks
        ),
        edges=tuple(
            dataclasses.replace(
                e,
                transfer_ms={
                    name(a): {name(b): ms for b, ms in row.items() if b in keep}
                    for a, row in e.transfer_ms.items()
                    if a in keep
                },
            )
            for e in costgraph.edges
        ),
        pair_links={
            (name(a), name(b)): link
            for (a, b), link in costgraph.pair_links.items()
            if a in keep and b in keep
        },
    )


def lane_view(plan: StagePlan, lane: int) -> StagePlan:
    """Lane `lane` of `plan` as a one-lane plan."""
    stages = plan.stages_of_lane(lane)
    ids = {s.id for s in stages}
    return dataclasses.replace(
        plan,
        stages=tuple(dataclasses.replace(s, lane=0) for s in stages),
        routing={
            t: tuple(c for c in consumers if c == GATEWAY or c in ids)
            for t, consumers in plan.routing.items()
            if any(c == GATEWAY or c in ids for c in consumers)
        },
        lanes=(Lane(),),
    )


def merge_lanes(plans: Sequence[StagePlan], weights: Sequence[float]) -> StagePlan:
    """One plan with each of `plans` (one-lane plans of the same model, on disjoint devices) as
    a lane of the given weight; its devices are theirs, each once."""
    if len(plans) == 1:
        return dataclasses.replace(plans[0], lanes=(Lane(weights[0]),))
    devices = {d.name: d for plan in plans for d in plan.devices}
    stages = []
    routing: dict[str, list[str]] = {}
    tensors = {}
    for k, plan in enumerate(plans):
        ids = {s.id: f"s{len(stages) + i}" for i, s in enumerate(plan.stages)}
        stages += [dataclasses.replace(s, id=ids[s.id], lane=k) for s in plan.stages]
        for t, consumers in plan.routing.items():
            merged = routing.setdefault(t, [])
            merged += [ids.get(c, c) for c in consumers if ids.get(c, c) not in merged]
        tensors.update(plan.tensors)
    return dataclasses.replace(
        plans[0],
        devices=tuple(devices.values()),
        stages=tuple(stages),
        routing={t: tuple(c) for t, c in routing.items()},
        tensors=tensors,
        lanes=tuple(Lane(w) for w in weights),
    )
