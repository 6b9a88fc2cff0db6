"""A model over protobuf's 2 GiB limit, weights in external data: planned, cut and served, each
stage server holding its own weights and no more.

The model is `moirai.zoo.matmul_chain` at 13400: three 718 MB weights, 2.15 GB in all, just over
2 GiB. Only every 64th row of a weight is written; the rest of its data file is a hole, so it
costs the disk a few megabytes and the test no time writing (ONNX Runtime reads the holes as
zeros, which changes nothing of what is checked here).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from moirai import zoo
from moirai.devices import DeviceSet, local_devices
from moirai.planning import plan_model
from moirai.planning.cpu import split_cpu
from moirai.runtime.local import LocalDeployment
from moirai.runtime.sequential import run_sequential
from moirai.sessions import STAGE_SERVER_OVERHEAD_BYTES
from moirai.weights import PROTOBUF_LIMIT
from stage_server.client import InferenceClient

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SIZE = 13400
WEIGHT = SIZE * SIZE * 4


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = zoo.matmul_chain(tmp_path_factory.mktemp("large") / "chain.onnx", SIZE, 3, dense=False)
    assert path.with_name("chain.onnx.data").stat().st_size > PROTOBUF_LIMIT
    yield path
    path.with_name("chain.onnx.data").unlink()


@pytest.fixture(scope="module")
def expected(large: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """ONNX Runtime on the whole model in this process (mapping its weights, as the stage
    servers do, rather than packing a second copy of them)."""
    x = np.random.default_rng(0).standard_normal((1, SIZE)).astype(np.float32)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_prepacking", "1")
    session = ort.InferenceSession(str(large), options, providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x})
    assert np.abs(y).max() > 0.1  # the written rows make a real answer
    return {"x": x}, y


def _cpus(memory_bytes: float, parts: int) -> DeviceSet:
    """`parts` one-thread CPU devices of this machine with `memory_bytes` each."""
    machine = split_cpu(local_devices(), 1)
    cpu = dataclasses.replace(machine.devices[0], memory_bytes=int(memory_bytes), threads=1)
    devices = (dataclasses.replace(cpu, name=f"cpu-{i}", device_id=i) for i in range(parts))
    return DeviceSet(tuple(devices), machine.default_link)


def _peak_resident(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_split_over_two_small_devices_each_server_holds_its_own_weights(
    large: Path, expected: tuple[dict[str, np.ndarray], np.ndarray], tmp_path: Path
) -> None:
    # Two weights (1.44 GB) and the overhead fit in 1.6 GB; three would not.
    planned = plan_model(large, _cpus(1.6e9, 2), time_limit=5)
    plan = planned.plan
    assert len(plan.stages) == 2
    memory = {d.name: 0 for d in planned.costgraph.devices}
    for task in planned.costgraph.tasks:
        memory[planned.placement.assignment[task.id]] += task.memory_bytes
    assert sorted(memory.values())[-1] >= 2 * WEIGHT
    # Where two weights leave no room for packed copies beside them, only the mapped ones;
    # the device with one weight has room for its packed copy.
    packs = {d: plan.device(d).prepack for d in plan.used_devices}
    assert packs == {d: memory[d] < 2 * WEIGHT for d in plan.used_devices}
    inputs, want = expected
    with LocalDeployment(plan, large, tmp_path / "run") as deployment:
        with InferenceClient(deployment.grpc_url) as client:
            for _ in range(2):
                got = client.infer(plan.model_name, inputs)["y"]
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        for device in plan.used_devices:
            peak = _peak_resident(deployment.pids[device])
            if packs[device]:  # its weights twice while they are packed, within the device
                assert peak <= 1.6e9, (device, peak)
            else:
                assert peak <= memory[device] + STAGE_SERVER_OVERHEAD_BYTES, (device, peak)
            assert peak < 2.5 * WEIGHT  # never the whole model


def test_one_device_large_enough_serves_it_as_one_stage(
    large: Path, expected: tuple[dict[str, np.ndarray], np.ndarray]
) -> None:
    planned = plan_model(large, _cpus(2.5e9, 1), time_limit=5)
    assert len(planned.plan.stages) == 1
    inputs, want = expected
    got = run_sequential(planned.model, planned.plan, inputs)["y"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
