"""The prediction of a plan as served: stages as tasks, their hops, the gateway's pushes and the
client's call; and the plan's `predicted` times, which `moirai serve`, `moirai demo` and the
operator report."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from moirai.costgraph import CostGraph, Device, Edge, Link, Task
from moirai.devices import available_cores, local_devices
from moirai.errors import MoiraiError
from moirai.partition import build_plan
from moirai.placement import PlacementProblem, evaluate
from moirai.planning import describe, load, pipeline, plan_model
from moirai.planning.cpu import SERVING_LOOPBACK, split_cpu
from moirai.planning.prediction import (
    CLIENT_LOOPBACK,
    Prediction,
    call_overheads,
    predict,
    served_costgraph,
)
from moirai.profile.analytic import AnalyticProfile
from moirai.profile.document import DocumentProfile, ProfileDocument
from moirai.stageplan import DeviceSpec

from . import models

MODEL = models.mlp(width=64, depth=6)  # x [1, 64] → 6 layers of 3 nodes → y [1, 64]
DEVICES = [DeviceSpec("cpu-0", threads=1), DeviceSpec("cpu-1", threads=1)]
CHAIN, CLIENT = Link(1e6, 0.5), Link(1e6, 1.0)  # 1 byte per microsecond
HOP = 0.5 + 64 * 4 / 1e3  # one [1, 64] float tensor over CHAIN
CALL = {"cpu-0": 0.2, "cpu-1": 0.3}


def layers_costgraph(ms: float = 1.0) -> CostGraph:
    """One task per layer (its MatMul, Add, Relu), `ms` on either device, a [1, 64] edge
    between layers."""
    nodes = [n.name for n in MODEL.graph.node]
    return CostGraph(
        name="mlp",
        devices=tuple(Device(d.name, memory_bytes=1 << 30) for d in DEVICES),
        tasks=tuple(
            Task(f"t{i}", {"cpu-0": ms, "cpu-1": ms}, ops=tuple(nodes[3 * i : 3 * i + 3]))
            for i in range(6)
        ),
        edges=tuple(Edge(f"t{i}", f"t{i + 1}", 256) for i in range(5)),
        default_link=CHAIN,
    )


def plan_on(devices: list[str]):
    """The mlp with layer i on devices[i]."""
    cg = layers_costgraph()
    assignment = {t.id: devices[i] for i, t in enumerate(cg.tasks)}
    return cg, build_plan(MODEL, assignment, DEVICES, groups={t.id: t.ops for t in cg.tasks})


def test_one_stage_is_its_compute_and_the_gateway_hops() -> None:
    cg, plan = plan_on(["cpu-0"] * 6)
    assert len(plan.stages) == 1
    got = predict(cg, plan, CALL, CLIENT, fused=False)
    client = 1.0 + 2 * 256 / 1e3  # inputs there, outputs back
    assert got.client_ms == pytest.approx(client)
    assert got.served_ms == pytest.approx(HOP + 6.0 + CALL["cpu-0"] + HOP)
    assert got.latency_ms == pytest.approx(got.served_ms + client)


def test_a_front_end_in_the_first_stage_takes_no_hop() -> None:
    """`moirai serve` runs the front end in the process of the first stage: a one-stage plan is
    its compute and its call; a stage elsewhere gets its inputs and gives its outputs over the
    link from and to the first stage's device."""
    cg, one = plan_on(["cpu-0"] * 6)
    _, two = plan_on(["cpu-0"] * 3 + ["cpu-1"] * 3)
    assert predict(cg, one, CALL, CLIENT).served_ms == pytest.approx(6.0 + CALL["cpu-0"])
    assert predict(cg, two, CALL, CLIENT).served_ms == pytest.approx(
        6.0 + CALL["cpu-0"] + CALL["cpu-1"] + 2 * HOP
    )


def test_each_stage_adds_its_call_and_its_hop() -> None:
    cg, one = plan_on(["cpu-0"] * 6)
    _, two = plan_on(["cpu-0"] * 3 + ["cpu-1"] * 3)
    _, three = plan_on(["cpu-0"] * 2 + ["cpu-1"] * 2 + ["cpu-0"] * 2)
    assert [len(p.stages) for p in (one, two, three)] == [1, 2, 3]
    latency = [predict(cg, p, CALL, CLIENT, fused=False).latency_ms for p in (one, two, three)]
    assert latency[1] - latency[0] == pytest.approx(HOP + CALL["cpu-1"])
    assert latency[2] - latency[1] == pytest.approx(HOP + CALL["cpu-0"])


def test_a_pipelined_plan_has_a_shorter_period_than_one_stage() -> None:
    cg, one = plan_on(["cpu-0"] * 6)
    _, two = plan_on(["cpu-0"] * 3 + ["cpu-1"] * 3)
    single, split = predict(cg, one), predict(cg, two)
    assert single.period_ms >= 6.0  # the one device computes everything per request
    assert split.period_ms < single.period_ms
    assert split.throughput_rps == pytest.approx(1000.0 / split.period_ms)


def test_the_gateway_name_is_refused_for_a_device() -> None:
    cg, plan = plan_on(["cpu-0"] * 6)
    renamed = CostGraph(
        name="mlp",
        devices=(Device("gateway", memory_bytes=1 << 30),),
        tasks=tuple(Task(t.id, {"gateway": 1.0}, ops=t.ops) for t in cg.tasks),
        edges=cg.edges,
    )
    with pytest.raises(MoiraiError, match="gateway"):
        predict(renamed, plan)


def test_the_predicted_keys_round_trip_and_bad_ones_are_reported() -> None:
    p = Prediction(served_ms=4.0, client_ms=1.0, period_ms=2.5)
    assert Prediction.from_dict(p.to_dict()) == p
    assert p.to_dict()["latency_ms"] == 5.0 and p.throughput_rps == 400.0
    with pytest.raises(MoiraiError, match="served_ms"):
        Prediction.from_dict({"latency_ms": 5.0})


def test_call_overheads_come_from_a_measured_profile_only() -> None:
    devices = split_cpu(local_devices(), len(available_cores())).devices  # 1 thread each
    document = ProfileDocument.from_dict(
        {
            "format": "moirai.profile/v1",
            "model": {"name": "m", "sha256": "0" * 64},
            "devices": {"cpu": {"target": "cpu:threads=1", "call_overhead_ms": 0.25, "groups": []}},
        }
    )
    cpu = [d for d in devices if d.kind == "cpu"]
    assert call_overheads(DocumentProfile(document), cpu) == {d.name: 0.25 for d in cpu}
    assert call_overheads(None, devices) == {}


def test_a_hop_is_work_for_each_end_that_pays_for_its_transfers() -> None:
    """Half a hop's time on each CPU end, as a task there; a GPU end's half stays a wait."""
    cg = CostGraph(
        name="hops",
        devices=(
            Device("cpu-0", 1 << 30),
            Device("cpu-1", 1 << 30),
            Device("gpu-0", 1 << 30, kind="gpu"),
        ),
        tasks=(Task("a", {"cpu-0": 1.0}), Task("b", {"cpu-1": 1.0}), Task("c", {"gpu-0": 1.0})),
        edges=(Edge("a", "b", 500), Edge("a", "c", 500)),
        default_link=CHAIN,  # 0.5 ms + 500 bytes at 1 byte per microsecond: 1.0 ms
    )
    p = PlacementProblem(cg)  # the one place the split is made, for solvers and prediction
    cpu0, cpu1, gpu0 = (p.device_index[d] for d in ("cpu-0", "cpu-1", "gpu-0"))
    ab, ac = 0, 1
    assert p.send_work[ab][cpu0][cpu1] == 0.5 and p.recv_work[ab][cpu0][cpu1] == 0.5
    assert p.send_work[ac][cpu0][gpu0] == 0.5 and p.recv_work[ac][cpu0][gpu0] == 0.0
    plan = evaluate(cg, {"a": "cpu-0", "b": "cpu-1", "c": "gpu-0"})
    # a 0..1; its push to b holds cpu-0 1..1.5 (b reads it 1.5..2), then the push to c
    # 2..3 (the send port is busy until 2), of which cpu-0 works 2..2.5
    hops = {t.dst: (t.start_ms, t.end_ms, t.arrive_ms) for t in plan.transfers}
    assert hops == {"b": (1.0, 2.0, 2.0), "c": (2.0, 3.0, None)}
    assert plan.makespan_ms == pytest.approx(4.0)


def test_a_device_sending_a_branch_out_computes_the_other_later() -> None:
    """`a` on cpu-0 feeds `b` on cpu-1 and `c` on cpu-0: a served plan cannot hide the hop's
    work on cpu-0 behind `c`, as a model with transfers on the ports only (GPUs) does."""
    cg = CostGraph(
        name="branch",
        devices=(Device("cpu-0", 1 << 30), Device("cpu-1", 1 << 30)),
        tasks=(
            Task("a", {"cpu-0": 1.0}),
            Task("b", {"cpu-1": 4.0}),
            Task("c", {"cpu-0": 5.5}),
            Task("d", {"cpu-0": 1.0}),
        ),
        edges=(Edge("a", "b", 500), Edge("a", "c", 0), Edge("b", "d", 0), Edge("c", "d", 0)),
        default_link=CHAIN,  # the a -> b hop: 1.0 ms
    )
    assignment = {t.id: next(iter(t.compute_ms)) for t in cg.tasks}
    gpus = dataclasses.replace(
        cg, devices=tuple(dataclasses.replace(d, kind="gpu") for d in cg.devices)
    )
    ports = evaluate(gpus, assignment).makespan_ms
    served = evaluate(cg, assignment)
    assert ports == pytest.approx(7.5)  # c ends at 6.5, as b's result arrives; then d
    # a, its push to b (0.5 ms of cpu-0), c, then b's result taken in (0.25 ms), then d.
    assert served.makespan_ms == pytest.approx(1.0 + 0.5 + 5.5 + 0.25 + 1.0)


@pytest.mark.parametrize("objective", ["latency", "throughput"])
def test_plan_model_predicts_the_plan_as_served(tmp_path: Path, objective: str) -> None:
    path = tmp_path / "mlp.onnx"
    onnx.save(MODEL, path)
    planned = plan_model(
        path, split_cpu(local_devices(), 2), solver="heft", objective=objective, time_limit=5
    )
    p = planned.plan.predicted
    want = predict(planned.costgraph, planned.plan)
    assert p["latency_ms"] == pytest.approx(want.latency_ms)
    assert p["served_period_ms"] == pytest.approx(want.period_ms)
    assert p["makespan_ms"] == pytest.approx(planned.placement.makespan_ms)
    # The served plan takes the inputs from the front end and gives it the outputs.
    assert p["served_ms"] >= p["makespan_ms"]
    text = describe(planned.plan)
    assert f"predicted as served: latency {want.latency_ms:.2f} ms" in text
    assert ("req/s" in text) == (objective == "throughput")


def test_tensors_of_a_symbolic_sequence_are_priced_at_its_size(tmp_path: Path) -> None:
    """A transformer exported by PyTorch has [batch, sequence, hidden] inputs, outputs and
    stage borders, which the plan types [-1, -1, hidden]: the client's call and every hop were
    priced as one row (a GPT-2 decoder step's 512 KiB cache inputs as 4 KiB: predicted 1.29 ms,
    served 2.6-3.4). Now at the priced sequence: 128 rows of 64 floats each way."""
    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="project"),
            helper.make_node("Relu", ["h"], ["y"], name="act"),
        ],
        "seq",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", "sequence", 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", "sequence", 64])],
        [weight],
    )
    path = tmp_path / "seq.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    rows = 128 * 64 * 4
    planned = plan_model(
        path, split_cpu(local_devices(), 2), input_shapes={"sequence": [128]}, solver="heft"
    )
    assert planned.plan.inputs[0].shape == (-1, -1, 64)
    assert planned.plan.predicted["client_ms"] == pytest.approx(
        CLIENT_LOOPBACK.transfer_ms(2 * rows)
    )
    loaded = load(path, {"sequence": [128]})
    cg = CostGraph(
        name="seq",
        devices=tuple(Device(d.name, memory_bytes=1 << 30) for d in DEVICES),
        tasks=(
            Task("t0", {"cpu-0": 1.0}, ops=("project",)),
            Task("t1", {"cpu-1": 1.0}, ops=("act",)),
        ),
        edges=(Edge("t0", "t1", rows),),
    )
    plan = build_plan(
        loaded.proto,
        {"t0": "cpu-0", "t1": "cpu-1"},
        DEVICES,
        groups={"t0": ("project",), "t1": ("act",)},
        input_shapes=loaded.priced_shapes,
        dynamic=loaded.dynamic,
    )
    served = served_costgraph(cg, plan, sizes=loaded.tensor_bytes)
    assert plan.spec("h").shape == (-1, -1, 64)
    assert {(e.src, e.dst): e.bytes for e in served.edges} == {
        ("gateway:in", "s0"): rows,
        ("s0", "s1"): rows,
        ("s1", "gateway:out"): rows,
    }


def test_describe_counts_in_words() -> None:
    """It said '1 stages on cpu-0 (cpu, 1 threads)'."""
    one = build_plan(MODEL, {n.name: "cpu-0" for n in MODEL.graph.node}, DEVICES[:1])
    assert describe(one).startswith("model mlp: 1 stage on cpu-0 (cpu, 1 thread)\n")
    two = build_plan(
        MODEL,
        {n.name: f"cpu-{i % 2}" for i, n in enumerate(MODEL.graph.node)},
        [DeviceSpec("cpu-0", threads=2), DeviceSpec("cpu-1", threads=2)],
    )
    assert "stages on cpu-0 (cpu, 2 threads), cpu-1 (cpu, 2 threads)" in describe(two)


def two_branches(width: int = 1024, rows: int = 64, depth: int = 3) -> onnx.ModelProto:
    """x [rows, width] → two chains of `depth` MatMuls (width x width) → their sum: branches
    heavy enough that a latency plan runs them on two devices side by side."""
    rng = np.random.default_rng(0)
    nodes, weights = [], []
    for branch in "ab":
        last = "x"
        for i in range(depth):
            w = f"{branch}{i}_w"
            weights.append(
                numpy_helper.from_array(rng.standard_normal((width, width), np.float32), w)
            )
            nodes.append(
                helper.make_node("MatMul", [last, w], [f"{branch}{i}"], name=f"{branch}{i}")
            )
            last = w[:-2]
    nodes.append(helper.make_node("Add", [f"a{depth - 1}", f"b{depth - 1}"], ["y"], name="sum"))
    value = (onnx.TensorProto.FLOAT, [rows, width])
    graph = helper.make_graph(
        nodes,
        "two_branches",
        [helper.make_tensor_value_info("x", *value)],
        [helper.make_tensor_value_info("y", *value)],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_split_plan_is_served_as_scheduled(tmp_path: Path) -> None:
    """The branches run side by side on two devices and the join waits for both: the plan as
    served keeps the overlap the solver scheduled (each stage starts when its own inputs are in),
    so its prediction is the solver's makespan plus the gateway's hops in and out, and `auto`
    serves the split rather than the best device alone."""
    path = tmp_path / "two.onnx"
    onnx.save(two_branches(), path)
    devices = split_cpu(local_devices(), 2)
    split = plan_model(path, devices, time_limit=5, solver="cpsat")
    alone = plan_model(path, devices, time_limit=5, solver="single")
    p = split.plan.predicted
    assert len(split.plan.used_devices) == 2
    assert p["makespan_ms"] < alone.plan.predicted["makespan_ms"]
    # The front end runs in the first stage's process: x reaches the other device and y comes
    # back over one hop each, at most ([64, 1024] floats); the solver's schedule already has
    # one of those hops.
    hop = SERVING_LOOPBACK.transfer_ms(64 * 1024 * 4)
    assert p["makespan_ms"] <= p["served_ms"] <= p["makespan_ms"] + 2 * hop + 1e-9
    assert p["latency_ms"] < alone.plan.predicted["latency_ms"]
    chosen = plan_model(path, devices, time_limit=5)
    assert chosen.plan.predicted["latency_ms"] == pytest.approx(p["latency_ms"])


class CostlyCalls(AnalyticProfile):
    """The analytic profile, with a session call that costs `ms` on every device."""

    def __init__(self, ms: float) -> None:
        super().__init__()
        self.ms = ms

    def call_overhead_ms(self, device: object) -> float:
        return self.ms


def test_auto_serves_the_model_whole_when_a_split_would_serve_slower(tmp_path: Path) -> None:
    """Each stage costs a session call the solvers do not price: where the calls eat what the
    split gains, `auto` keeps the best device alone; a named solver keeps its own plan."""
    path = tmp_path / "two.onnx"
    onnx.save(two_branches(), path)
    devices = split_cpu(local_devices(), 2)
    profile = CostlyCalls(5.0)
    split = plan_model(path, devices, time_limit=5, solver="cpsat", profile=profile)
    alone = plan_model(path, devices, time_limit=5, solver="single", profile=profile)
    assert len(split.plan.stages) > 1
    assert split.plan.predicted["makespan_ms"] < alone.plan.predicted["makespan_ms"]
    assert split.plan.predicted["latency_ms"] > alone.plan.predicted["latency_ms"]
    chosen = plan_model(path, devices, time_limit=5, profile=profile)
    assert len(chosen.plan.stages) == 1
    assert chosen.plan.predicted["latency_ms"] == pytest.approx(alone.plan.predicted["latency_ms"])


def test_auto_takes_a_split_only_when_it_gains_more_than_the_margin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A split plan predicted faster than the best device alone is served only when it gains
    more than `SPLIT_MARGIN`: with the margin just above its gain `auto` keeps the device alone,
    just below it `auto` takes the split."""
    path = tmp_path / "two.onnx"
    onnx.save(two_branches(), path)
    devices = split_cpu(local_devices(), 2)
    split = plan_model(path, devices, time_limit=5, solver="cpsat").plan.predicted["latency_ms"]
    alone = plan_model(path, devices, time_limit=5, solver="single").plan.predicted["latency_ms"]
    gain = 1 - split / alone
    assert gain > 0.01
    monkeypatch.setattr(pipeline, "SPLIT_MARGIN", gain + 0.005)
    kept = plan_model(path, devices, time_limit=5).plan
    assert len(kept.stages) == 1
    assert kept.predicted["latency_ms"] == pytest.approx(alone)
    # The user is told what was declined, and why.
    (declined,) = kept.predicted["declined_splits"]
    assert sorted(declined["devices"]) == sorted(d.name for d in devices.devices)
    assert declined["split_ms"] == pytest.approx(split)
    assert declined["alone_ms"] == pytest.approx(alone)
    assert "margin" in describe(kept) and f"{100 * gain:.1f}% better" in describe(kept)
    monkeypatch.setattr(pipeline, "SPLIT_MARGIN", gain - 0.005)
    taken = plan_model(path, devices, time_limit=5).plan
    assert len(taken.used_devices) == 2
    assert taken.predicted["latency_ms"] == pytest.approx(split)
    assert "declined_splits" not in taken.predicted
