"""Lanes: `spec.serving.replicas` copies of the whole chain behind one gateway.

The planner solves one chain; a PlacedModel with `replicas: n` serves n copies of it (lanes,
`moirai.stageplan`'s `StagePlan.lanes`), each on devices of its own, and the gateway spreads
requests over the lanes that are up. Lane 0 keeps the solved plan's names, so that one replica
is exactly the plan as solved; lane k > 0 names its copy of device `d` `d-l<k>` and its copy of
stage `s` `s-l<k>` (device names end in a number, so a copy never takes the name of another
device). Every lane's stage servers are Deployments and Services of their own (named after their
device), so adding or removing a lane creates or prunes only that lane's objects, and the pods of
the other lanes keep running: their lane of the plan is the same.
"""

from __future__ import annotations

from dataclasses import replace

from moirai.stageplan import GATEWAY, Lane, StagePlan


def lane_name(name: str, lane: int) -> str:
    """The name of lane `lane`'s copy of the device or stage `name`."""
    return name if lane == 0 else f"{name}-l{lane}"


def with_lanes(plan: StagePlan, lanes: int) -> StagePlan:
    """`plan` (one lane) served as `lanes` identical lanes of weight 1."""
    if len(plan.lanes) != 1:
        raise ValueError("with_lanes copies a plan of one lane")
    used = set(plan.used_devices)
    return replace(
        plan,
        devices=tuple(
            replace(d, name=lane_name(d.name, k))
            for k in range(lanes)
            for d in plan.devices
            if k == 0 or d.name in used
        ),
        stages=tuple(
            replace(s, id=lane_name(s.id, k), device=lane_name(s.device, k), lane=k)
            for k in range(lanes)
            for s in plan.stages
        ),
        routing={
            tensor: tuple(
                c if c == GATEWAY else lane_name(c, k)
                for k in range(lanes)
                for c in consumers
                if k == 0 or c != GATEWAY
            )
            for tensor, consumers in plan.routing.items()
        },
        lanes=(Lane(),) * lanes,
    )
