"""Stage sessions as `moirai.sessions` builds them: intra-op threads spin only where they hold
every core their thread may run on."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from moirai.devices import available_cores
from moirai.sessions import create_session
from moirai.stageplan import DeviceSpec

from .onnx_patterns import matmul_add


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


def _spinning(threads: int) -> Callable[[], str]:
    """How a session of `threads` threads spins: "0", or "1" and stopping after each run."""
    model = matmul_add()

    def build() -> str:
        options = create_session(model, DeviceSpec("cpu-0", threads=threads)).get_session_options()
        spin = options.get_session_config_entry("session.intra_op.allow_spinning")
        if spin == "1":
            assert options.get_session_config_entry("session.force_spinning_stop") == "1"
        return spin

    return build


def test_threads_spin_only_when_they_are_exactly_the_cores_they_may_run_on() -> None:
    cores = available_cores()
    assert _on_cores({cores[0]}, _spinning(1)) == "0"  # one thread: nothing to spin
    assert _on_cores({cores[0]}, _spinning(2)) == "0"  # more threads than cores
    if len(cores) >= 2:  # CI's machines have 2
        two = set(cores[:2])
        assert _on_cores(two, _spinning(2)) == "1"  # a device alone on its cores
        assert _on_cores(two, _spinning(1)) == "0"  # a share of them: the rest is another's
