"""The plan space beyond an assignment (`moirai.planning.space`, `moirai.planning.lanes`): how
the CPU's cores are grouped into devices, and lanes (whole copies of the model) for throughput;
every choice made by the plan's predicted served time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from moirai.devices import DeviceSet, DeviceSpec, local_devices
from moirai.planning import plan_model
from moirai.planning.cpu import SERVING_LOOPBACK, split_cpu
from moirai.planning.lanes import lane_view
from moirai.planning.prediction import front_end, predict, predict_lane
from moirai.planning.space import cpu_groupings, layouts
from moirai.runtime.sequential import run_sequential
from moirai.stageplan import StagePlan

from . import models
from .test_prediction import two_branches


def _cpu(name: str, flops: float, threads: int = 1, memory: float = 8e9) -> DeviceSpec:
    return DeviceSpec(name, "cpu", "CPUExecutionProvider", flops, 10e9, int(memory), threads)


ALIKE = DeviceSet((_cpu("a", 20e9), _cpu("b", 20e9)), default_link=SERVING_LOOPBACK)


@pytest.fixture
def mlp_path(tmp_path: Path) -> Path:
    path = tmp_path / "mlp.onnx"
    onnx.save(models.mlp(width=512, depth=6, batch=32), path)
    return path


def test_layouts_of_a_device_set() -> None:
    four = DeviceSet(tuple(_cpu(f"c{i}", 1e9) for i in range(4)))
    assert [layout.lanes for layout in layouts([four], "latency")] == [(("c0", "c1", "c2", "c3"),)]
    lanes = [layout.lanes for layout in layouts([four], "throughput")]
    assert lanes == [
        (("c0", "c1", "c2", "c3"),),
        (("c0", "c2"), ("c1", "c3")),
        (("c0",), ("c1",), ("c2",), ("c3",)),
    ]
    # Replicas only where the model fits alone.
    some = [layout.lanes for layout in layouts([four], "throughput", fits={"c0", "c3"})]
    assert (("c0",), ("c3",)) in some


def test_groupings_describe_this_machine() -> None:
    groupings = cpu_groupings(local_devices())
    assert groupings[0] == split_cpu(local_devices(), 1)
    assert len({tuple(d.name for d in g.devices) for g in groupings}) == len(groupings)


def test_replicas_win_throughput_on_alike_devices(mlp_path: Path) -> None:
    """A chain gains nothing from a pipeline that two copies do not gain more simply: two lanes,
    one per device, equal weights; the plan round-trips through JSON and each lane alone
    reproduces the model."""
    planned = plan_model(mlp_path, ALIKE, objective="throughput", time_limit=5)
    plan = planned.plan
    assert len(plan.lanes) == 2 and [lane.weight for lane in plan.lanes] == [0.5, 0.5]
    assert [plan.devices_of_lane(k) for k in range(2)] == [("a",), ("b",)]
    assert len({s.id for s in plan.stages}) == len(plan.stages)
    assert StagePlan.from_dict(plan.to_dict()) == plan
    assert plan.predicted["layout"] == "2 lanes of cpu x1"
    costs = {c["layout"]: c["served_ms"] for c in plan.predicted["candidates"]}
    assert plan.predicted["served_period_ms"] == min(costs.values())
    one = costs["one pipeline on cpu x1 + cpu x1"]
    assert plan.predicted["served_period_ms"] < one
    assert planned.tasks_per_device() == {
        "a": len(planned.costgraph.tasks),
        "b": len(planned.costgraph.tasks),
    }
    model = planned.model
    inputs = models.random_inputs(model)
    want = run_sequential(model, lane_view(plan, 0), inputs)
    for k in range(2):
        got = run_sequential(model, lane_view(plan, k), inputs)
        for name, value in want.items():
            np.testing.assert_allclose(got[name], value, rtol=1e-5)


def test_lanes_share_requests_by_speed(mlp_path: Path) -> None:
    """Each lane takes requests in proportion to its rate (a device three times as fast, about
    three times as many, less for the front end's work that each carries for its requests); the
    period is that of the lanes together."""
    devices = DeviceSet((_cpu("fast", 60e9), _cpu("slow", 20e9)), default_link=SERVING_LOOPBACK)
    planned = plan_model(mlp_path, devices, objective="throughput", time_limit=5)
    plan = planned.plan
    assert len(plan.lanes) == 2
    views = [lane_view(plan, k) for k in range(2)]
    fast, slow = (
        predict_lane(planned.costgraph, view, entry=front_end(view)).lane_period_ms
        for view in views
    )
    weights = [lane.weight for lane in plan.lanes]
    assert weights[0] / weights[1] == pytest.approx(slow / fast, rel=0.05)
    together = predict(planned.costgraph, plan).period_ms
    assert together < min(fast, slow)
    assert plan.predicted["served_period_ms"] == pytest.approx(together)


def test_latency_plans_have_one_lane(mlp_path: Path) -> None:
    planned = plan_model(mlp_path, ALIKE, objective="latency", time_limit=5)
    assert len(planned.plan.lanes) == 1 and "candidates" not in planned.plan.predicted


def test_weights_are_packed_where_the_device_has_room_for_the_copy(mlp_path: Path) -> None:
    """6 MiB of weights: packed beside the mapping on 8 GB; on a device that holds them once
    beside the stage server's overhead (128 MiB) but not twice, left mapped only."""
    for memory, packed in [(8e9, True), ((128 + 9) * 2**20, False)]:
        devices = DeviceSet((_cpu("a", 20e9, memory=memory),), default_link=SERVING_LOOPBACK)
        plan = plan_model(mlp_path, devices, time_limit=5).plan
        assert plan.device("a").prepack is packed, memory


@pytest.mark.parametrize("objective", ["latency", "throughput"])
def test_the_grouping_of_the_cores_is_chosen_by_served_time(tmp_path: Path, objective: str) -> None:
    """Every grouping is planned; the plan is the one that serves best for the objective, and
    it names its layout."""
    path = tmp_path / "two.onnx"
    onnx.save(two_branches(), path)
    groupings = [
        DeviceSet((_cpu("cpu-0", 30e9, threads=2),), default_link=SERVING_LOOPBACK),
        ALIKE,
    ]
    planned = plan_model(path, groupings, objective=objective, time_limit=5)
    p = planned.plan.predicted
    key = "served_period_ms" if objective == "throughput" else "latency_ms"
    assert p[key] == min(c["served_ms"] for c in p["candidates"])
    assert len(p["candidates"]) == (2 if objective == "latency" else 3)
    assert planned.layout.devices in groupings


def test_a_mix_of_replicas_and_a_pipeline_is_a_candidate() -> None:
    """A fast device alone beside a pipeline over two slow ones; every kind once."""
    devices = DeviceSet((_cpu("fast", 60e9, threads=4), _cpu("s0", 10e9), _cpu("s1", 10e9)))
    lanes = [layout.lanes for layout in layouts([devices], "throughput")]
    assert (("fast",), ("s0", "s1")) in lanes
    assert (("fast",), ("s0",), ("s1",)) in lanes  # plain replication, once
    assert len(lanes) == 3  # one pipeline, plain replication, the mix
