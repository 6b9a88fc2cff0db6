"""Plans are stable: the same inputs give the same plan on an idle and on a loaded machine.

`auto` stops by proof on graphs the series decomposition solves (every zoo model), and every
step before the proof is limited by work, not time; two CPU hogs here (one per core of the
CI machine) must not change the plan.
"""

from __future__ import annotations

import subprocess
import sys

from moirai.placement import solve

from .instances import inception_costgraph


def test_a_proven_plan_is_the_same_on_a_loaded_machine() -> None:
    cg = inception_costgraph(7, 4)
    quiet = solve(cg, "auto", time_limit=60, threads=2)
    assert quiet.extra["stopped_by"] == "proof" and quiet.status == "optimal"
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        loaded = solve(cg, "auto", time_limit=60, threads=2)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert loaded.extra["stopped_by"] == "proof"
    assert loaded.assignment == quiet.assignment
    assert loaded.schedule == quiet.schedule
    shorter = solve(cg, "auto", time_limit=20, threads=1)
    assert shorter.assignment == quiet.assignment
