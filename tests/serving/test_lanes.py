"""Lanes: several complete copies of the chain in one stage plan (`moirai.stageplan`)."""

from __future__ import annotations

import json

import pytest

from moirai.stageplan import GATEWAY, Lane, PlanError, StagePlan

from . import models
from .conftest import laned, split_plan


def _two_lanes() -> StagePlan:
    return laned(split_plan(models.mlp(), 2), (1.0, 3.0))


def test_lanes_round_trip_and_route_within_their_lane() -> None:
    plan = _two_lanes()
    again = StagePlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan
    assert again.lanes == (Lane(1.0), Lane(3.0))
    assert [s.id for s in plan.stages_of_lane(1)] == ["s0-l1", "s1-l1"]
    assert plan.devices_of_lane(1) == ("cpu-0-l1", "cpu-1-l1")
    assert plan.routes("x", 0) == ("s0",) and plan.routes("x", 1) == ("s0-l1",)
    (between,) = plan.stages[0].outputs
    assert plan.routes(between, 1) == ("s1-l1",)
    assert plan.routes("y", 1) == (GATEWAY,)


def test_a_plan_without_lanes_has_one_lane_of_weight_one() -> None:
    data = split_plan(models.mlp(), 2).to_dict()
    del data["lanes"]
    for stage in data["stages"]:
        del stage["lane"]
    plan = StagePlan.from_dict(data)
    assert plan.lanes == (Lane(1.0),)
    assert {s.lane for s in plan.stages} == {0}
    assert plan.routes("x", 0) == plan.routing["x"]


def _without(data: dict, stage: str) -> None:
    data["stages"] = [s for s in data["stages"] if s["id"] != stage]
    data["routing"] = {t: [c for c in cs if c != stage] for t, cs in data["routing"].items()}


def _edited(edit) -> dict:
    data = _two_lanes().to_dict()
    edit(data)
    return json.loads(json.dumps(data))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["stages"][3].update(lane=2), "stage s1-l1 is in lane 2, but the plan has 2"),
        (lambda d: d["stages"][3].update(lane="1"), "lane must be an integer"),
        (lambda d: d["stages"][3].update(device="cpu-1"), "device cpu-1 holds stages of lanes"),
        (lambda d: d["lanes"][1].update(weight=0), "lane 1 has weight 0.0: give a number above 0"),
        (lambda d: d.update(lanes=[]), "'lanes' is empty"),
        (lambda d: _without(d, "s1-l1"), "lane 1 produces no model output 'y'"),
        (lambda d: _without(d, "s0-l1"), "stage s1-l1 of lane 1 takes"),
        (lambda d: d["lanes"].append({"weight": 1}), "lane 2 has no stage"),
    ],
)
def test_malformed_lanes_are_refused_in_one_line(edit, message: str) -> None:
    with pytest.raises(PlanError, match=message) as e:
        StagePlan.from_dict(_edited(edit), "plan.json")
    assert "\n" not in str(e.value)
