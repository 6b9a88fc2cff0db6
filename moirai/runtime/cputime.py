"""The CPU that processes and all their descendants have spent, every thread counted.

Read from the scheduler's nanosecond counts in /proc (`/proc/PID/task/TID/schedstat`): clock-tick
counts are too coarse for requests of a millisecond, and CPU per request survives a noisy
machine far better than requests/s. `moirai demo` reports its serving processes' CPU per request
with it, and the benchmarks (`bench/loadgen.py`) measure every serving stack the same way.
Linux only; elsewhere the counts are 0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path


def process_tree(pids: Sequence[int]) -> list[int]:
    """The processes and all their descendants."""
    out, todo = [], list(pids)
    while todo:
        pid = todo.pop()
        out.append(pid)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return out


def cpu_ms(pids: Sequence[int]) -> float:
    """CPU milliseconds so far of every thread of these processes and their descendants."""
    total = 0
    for pid in process_tree(pids):
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError):  # a thread that just ended
                    total += int((task / "schedstat").read_text().split()[0])
    return total / 1e6
