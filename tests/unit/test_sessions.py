"""Stage sessions as `moirai.sessions` builds them: intra-op threads spin only where they hold
every core their thread may run on."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from moirai.devices import available_cores
from moirai.partition import build_plan
from moirai.runtime.local import cores_shared
from moirai.sessions import create_session
from moirai.stageplan import DeviceSpec, StagePlan

from .onnx_patterns import matmul_add


def _plan(devices: list[DeviceSpec], assignment: list[str]) -> StagePlan:
    """The two nodes of `matmul_add` on these devices, in order."""
    model = matmul_add()
    for i, node in enumerate(model.graph.node):
        node.name = f"n{i}"
    return build_plan(model, {"n0": assignment[0], "n1": assignment[1]}, devices)


def _on_cores(cores: set[int], work: Callable[[], str]) -> str:
    """`work()` in a thread pinned to `cores`, as a stage server builds a device's sessions."""
    out: list[str] = []

    def pinned() -> None:
        os.sched_setaffinity(0, cores)
        out.append(work())

    thread = threading.Thread(target=pinned)
    thread.start()
    thread.join()
    return out[0]


def _spinning(threads: int, spin: bool = True) -> Callable[[], str]:
    """How a session of `threads` threads spins: "0", or "1" and stopping after each run."""
    model = matmul_add()

    def build() -> str:
        device = DeviceSpec("cpu-0", threads=threads)
        options = create_session(model, device, spin=spin).get_session_options()
        spinning = options.get_session_config_entry("session.intra_op.allow_spinning")
        if spinning == "1":
            assert options.get_session_config_entry("session.force_spinning_stop") == "1"
        return spinning

    return build


def test_threads_spin_only_when_they_are_exactly_the_cores_they_may_run_on() -> None:
    cores = available_cores()
    assert _on_cores({cores[0]}, _spinning(1)) == "0"  # one thread: nothing to spin
    assert _on_cores({cores[0]}, _spinning(2)) == "0"  # more threads than cores
    if len(cores) >= 2:  # CI's machines have 2
        two = set(cores[:2])
        assert _on_cores(two, _spinning(2)) == "1"  # a device alone on its cores
        assert _on_cores(two, _spinning(1)) == "0"  # a share of them: the rest is another's


def test_threads_told_not_to_spin_never_do() -> None:
    """`spin=False` (`moirai stage --no-spin`): other stage servers share these cores."""
    cores = available_cores()
    if len(cores) >= 2:  # CI's machines have 2
        assert _on_cores(set(cores[:2]), _spinning(2, spin=False)) == "0"
    assert _on_cores({cores[0]}, _spinning(1, spin=False)) == "0"


def test_stage_servers_share_cores_with_several_models_or_unpinned_cpu_devices() -> None:
    cpus = [DeviceSpec(f"cpu-{i}", threads=2) for i in range(2)]
    gpu = DeviceSpec("gpu-0", kind="gpu", threads=None, device_id=0)
    two_cpus = _plan(cpus, ["cpu-0", "cpu-1"])
    cpu_and_gpu = _plan([cpus[0], gpu], ["cpu-0", "gpu-0"])
    assert not cores_shared(two_cpus, models=1, pinned=True)  # each on cores of its own
    assert cores_shared(two_cpus, models=1, pinned=False)  # they did not fit the cores
    assert not cores_shared(cpu_and_gpu, models=1, pinned=False)  # one CPU device: alone
    assert cores_shared(cpu_and_gpu, models=2, pinned=True)  # two models on the same cores
