"""Lanes: several complete copies of the chain in one stage plan (`moirai.stageplan`), and the
front end sharing requests among them over real stage servers."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from moirai.stageplan import GATEWAY, Lane, PlanError, StagePlan
from stage_server.client import AsyncInferenceClient
from stage_server.gateway import Gateway
from stage_server.serve import start_stage

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


def _runs(gateway: Gateway, stage: str, device: str) -> int:
    """Requests whose timings reached the gateway with a compute time of `stage`."""
    labels = {"stage": stage, "device": device, "kind": "compute"}
    value = gateway.metrics.registry.get_sample_value("moirai_stage_seconds_count", labels)
    return int(value or 0)


async def _until(condition, what: str, timeout_s: float = 15.0) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, f"not {what} within {timeout_s} s"
        await asyncio.sleep(0.05)


@pytest.mark.timeout(120)
async def test_requests_go_to_one_lane_by_weight_and_a_lane_down_is_skipped(
    cluster, request: pytest.FixtureRequest
) -> None:
    """A hand-built plan of two lanes (weights 1 and 3) over real stage servers: sequential
    requests are shared 1:3, each runs on one lane only; with a stage server of lane 1 gone the
    model stays ready and lane 0 serves everything; with a stage server of each lane gone it is
    not ready and requests are UNAVAILABLE; restarted, lane 1 takes its share again."""
    mode = request.node.callspec.params["cluster"]
    model = models.mlp()
    plan = laned(split_plan(model, 2), (1.0, 3.0))
    c = await cluster(model, plan)
    gateway = c.gateway.gateway
    x = models.random_inputs(model)
    want = ort.InferenceSession(model.SerializeToString()).run(None, x)[0]
    client = AsyncInferenceClient(c.grpc_url)

    def runs() -> list[int]:
        return [_runs(gateway, s.id, s.device) for s in plan.stages]  # s0, s1, s0-l1, s1-l1

    async def infer(n: int) -> None:
        for _ in range(n):
            np.testing.assert_allclose((await client.infer("mlp", x))["y"], want, rtol=1e-5)

    async def restart(device: str) -> None:
        c.stages[device] = await start_stage(
            model,
            plan,
            device,
            c.addresses,
            port=c.stages[device].port,
            same_host=mode != "grpc",
        )

    try:
        await infer(40)
        assert runs() == [10, 10, 30, 30]
        await c.stages["cpu-1-l1"].stop(0)
        await _until(lambda: not gateway.up["cpu-1-l1"], "marked down")
        assert gateway.ready()
        await infer(8)
        assert runs() == [18, 18, 30, 30]
        await c.stages["cpu-1"].stop(0)
        await _until(lambda: not gateway.ready(), "not ready")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.infer("mlp", x)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        await restart("cpu-1")
        await restart("cpu-1-l1")
        await _until(lambda: all(gateway.up.values()), "up again")
        await infer(4)  # lane 1 had 30 of 48 (10 per unit of weight), lane 0 18: lane 1's turn
        assert runs() == [18, 18, 34, 34]
    finally:
        await client.close()
    assert not gateway.pending
