"""moirai.planning.together: several models planned on the same devices, memory shared."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from moirai.devices import DeviceSet, parse_devices
from moirai.errors import InfeasibleError
from moirai.planning import PlanningInputs, plan_model, resolve
from moirai.planning.together import held_memory, plan_together
from moirai.sessions import STAGE_SERVER_OVERHEAD_BYTES as OVERHEAD

MIB = 1 << 20


def chain(path: Path, width: int, depth: int, seed: int) -> Path:
    """x[1, width] → (MatMul → Relu) × depth: `depth` weights of width² floats."""
    rng = np.random.default_rng(seed)
    nodes, weights, prev = [], [], "x"
    for i in range(depth):
        w = rng.standard_normal((width, width)).astype(np.float32) / width
        weights.append(numpy_helper.from_array(w, f"w{i}"))
        out = "y" if i == depth - 1 else f"h{i}"
        nodes += [
            helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"], name=f"mm{i}"),
            helper.make_node("Relu", [f"m{i}"], [out], name=f"relu{i}"),
        ]
        prev = out
    graph = helper.make_graph(
        nodes,
        path.stem,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])],
        weights,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def devices(count: int, memory_bytes: int) -> DeviceSet:
    return parse_devices(
        {
            "devices": [
                {
                    "name": "cpu",
                    "kind": "cpu",
                    "count": count,
                    "threads": 1,
                    "peak_flops": 1e11,
                    "memory_bandwidth_bytes_per_s": 1e10,
                    "memory_bytes": memory_bytes,
                }
            ]
        }
    )


def plan_one(inputs: PlanningInputs, device_sets: Sequence[DeviceSet]):
    return plan_model(
        inputs.model, device_sets, time_limit=2, profile=inputs.profile, fused_front_end=False
    )


def inputs_of(paths: dict[str, Path], device_set: DeviceSet) -> dict[str, PlanningInputs]:
    return {name: resolve(path, device_set) for name, path in paths.items()}


def test_two_models_share_the_devices_memory_and_the_split_is_one_line(tmp_path: Path) -> None:
    """Two models (2 MiB and 1 MiB of weights) on two devices with room for one stage server
    and 3 MiB of tasks each: each device holds what fits, never more than its memory (tasks and
    each stage server's overhead), and the line names every device with what each model holds
    there."""
    paths = {
        "big": chain(tmp_path / "big.onnx", 512, 2, 0),  # 2 MiB
        "small": chain(tmp_path / "small.onnx", 256, 4, 1),  # 1 MiB
    }
    memory = OVERHEAD + 3 * MIB
    together = plan_together(inputs_of(paths, devices(2, memory)), plan_one)
    assert list(together.planned) == ["big", "small"]
    assert [d.name for d in together.devices.devices] == ["cpu-0", "cpu-1"]
    held = together.held
    for device in ("cpu-0", "cpu-1"):
        assert sum(held.get(device, {}).values()) <= memory
    for name, planned in together.planned.items():
        tasks = sum(t.memory_bytes for t in planned.costgraph.tasks)
        used = {d for p in planned.placements for d in p.assignment.values()}
        assert sum(held_memory(planned).values()) == tasks + OVERHEAD * len(used)
        assert sum(held[d].get(name, 0) for d in held) == tasks + OVERHEAD * len(used)
    line = together.describe_memory()
    assert "\n" not in line
    assert line.startswith("memory (each CPU stage server 128.0 MiB beside its tasks): cpu-0 (")
    assert "; cpu-1 (131.0 MiB): " in line and "free" in line and "big 130.0 MiB" in line


def test_models_that_fit_only_apart_are_refused_in_one_line(tmp_path: Path) -> None:
    """Two models of 2 MiB and 1 MiB of weights on one device with room for two stage servers
    and 2.5 MiB of tasks: each fits alone, together they do not; the refusal names the model,
    what the other holds, and the fix."""
    paths = {
        "a": chain(tmp_path / "a.onnx", 512, 2, 0),
        "b": chain(tmp_path / "b.onnx", 512, 1, 1),
    }
    device_set = devices(1, 2 * OVERHEAD + 5 * MIB // 2)
    inputs = inputs_of(paths, device_set)
    for one in inputs.values():
        plan_one(one, [device_set])  # each fits alone
    with pytest.raises(InfeasibleError) as e:
        plan_together(inputs, plan_one)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(
        "model 'b' does not fit beside 'a' in the devices' memory (memory (each CPU stage "
        "server 128.0 MiB beside its tasks): cpu-0 (258.5 MiB): a 130.0 MiB, 128.5 MiB free): "
    ), message
    assert "serve fewer models together, or on devices with more memory" in message


def test_the_largest_model_is_planned_first_and_chooses_the_devices(tmp_path: Path) -> None:
    paths = {
        "small": chain(tmp_path / "small.onnx", 64, 2, 0),
        "large": chain(tmp_path / "large.onnx", 256, 2, 1),
    }
    seen: list[tuple[str, dict[str, int]]] = []

    def spy(inputs: PlanningInputs, device_sets: Sequence[DeviceSet]):
        memory = {d.name: d.memory_bytes for s in device_sets for d in s.devices}
        seen.append((inputs.model.name, memory))
        return plan_one(inputs, device_sets)

    together = plan_together(inputs_of(paths, devices(2, OVERHEAD + 64 * MIB)), spy)
    assert [name for name, _ in seen] == ["large", "small"]
    whole = OVERHEAD + 64 * MIB
    assert seen[0][1] == {"cpu-0": whole, "cpu-1": whole}
    large_held = held_memory(together.planned["large"])
    assert seen[1][1] == {d: whole - large_held.get(d, 0) for d in ("cpu-0", "cpu-1")}
    assert list(together.planned) == ["small", "large"]  # reported in the order given


def test_models_go_to_the_devices_the_others_keep_least_busy(tmp_path: Path) -> None:
    """Two models that each run best alone on one device: the second goes to the device the
    first leaves idle, not onto the first's (the solvers see memory, not the others' compute)."""
    paths = {
        "one": chain(tmp_path / "one.onnx", 256, 2, 0),
        "two": chain(tmp_path / "two.onnx", 128, 2, 1),
    }
    together = plan_together(inputs_of(paths, devices(2, OVERHEAD + 64 * MIB)), plan_one)
    used = {name: set(held_memory(p)) for name, p in together.planned.items()}
    assert len(used["one"]) == len(used["two"]) == 1
    assert used["one"] != used["two"]
