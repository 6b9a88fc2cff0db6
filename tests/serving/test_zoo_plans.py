"""Stage plans of the bundled models reproduce the whole model: under random placements of the
cost graph's fusion groups, and under the solvers' placements."""

from __future__ import annotations

import random

import numpy as np
import onnxruntime as ort
import pytest

from moirai import zoo
from moirai.devices import local_devices
from moirai.partition import build_plan
from moirai.planning import build_costgraph, plan_model
from moirai.planning.cpu import split_cpu
from moirai.runtime.sequential import run_sequential
from moirai.stageplan import DeviceSpec
from moirai.weights import ort_session

pytestmark = pytest.mark.timeout(300)
DEVICES = split_cpu(local_devices(), 2)
# A spread of architectures that keeps the suite within its time on two cores.
MODELS = ["squeezenet", "shufflenet", "inception_v1", "gpt2_small"]


def inputs_for(plan, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for t in plan.inputs:
        shape = plan.priced_shape(t.name)
        if t.datatype == "INT64":
            out[t.name] = rng.integers(0, 100, size=shape).astype(np.int64)
        else:
            out[t.name] = rng.random(shape).astype(np.float32)
    return out


def whole(model, inputs):
    session = ort_session(model, ort.SessionOptions(), ["CPUExecutionProvider"])
    return dict(zip([o.name for o in model.graph.output], session.run(None, inputs), strict=True))


def check(model, plan):
    inputs = inputs_for(plan)
    want = whole(model, inputs)
    got = run_sequential(model, plan, inputs)
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("name", MODELS)
def test_solver_and_random_placements_reproduce_zoo_models(name: str) -> None:
    planned = plan_model(
        zoo.get(name), DEVICES, input_shapes=zoo.input_shapes(name), objective="throughput",
        time_limit=5,
    )  # fmt: skip
    check(planned.model, planned.plan)
    p = planned.plan.predicted
    assert p["latency_ms"] == pytest.approx(p["served_ms"] + p["client_ms"])
    assert p["client_ms"] > 0
    costgraph = build_costgraph(zoo.get(name), DEVICES, zoo.input_shapes(name))
    devices = [DeviceSpec(f"cpu-{i}", threads=1) for i in range(3)]
    rng = random.Random(name)
    for _ in range(2):
        assignment = {t.id: rng.choice(devices).name for t in costgraph.tasks}
        plan = build_plan(
            planned.model, assignment, devices, groups={t.id: t.ops for t in costgraph.tasks}
        )
        check(planned.model, plan)
