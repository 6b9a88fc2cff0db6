"""Ctrl-C during a solve ends `moirai place` at once, with status 130 and one line.

CP-SAT catches SIGINT itself unless told not to, and a native search holding the main thread
delays Python's KeyboardInterrupt until it ends: either way the plan used to be printed with
status 0 (and `serve` went on to serve it). These run the real command in a subprocess.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .instances import layered_costgraph

PROMPT_S = 10.0
"""Generous: the solve would otherwise run for the whole 60 s time limit."""


@pytest.mark.parametrize("solver", ["cpsat", "milp", "auto"])
def test_ctrl_c_stops_the_solve_and_the_command(tmp_path: Path, solver: str) -> None:
    costgraph = tmp_path / "cg.json"
    layered_costgraph(seed=1, tasks=300, devices=6).save(costgraph)
    argv = [sys.executable, "-m", "moirai", "place", "--costgraph", str(costgraph)]
    argv += ["--solver", solver, "--time-limit", "60", "--threads", "1"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    try:
        line = proc.stderr.readline()  # the first progress report: the search is under way
        assert line.startswith("moirai: ["), line
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        out, err = proc.communicate(timeout=PROMPT_S + 20)
    finally:
        proc.kill()
    assert time.monotonic() - sent < PROMPT_S
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err and "terminate called" not in err, err
    assert err.strip().splitlines()[-1] == "moirai: interrupted"
    assert "makespan" not in out  # no plan printed
