"""The Gantt chart (`moirai.placement.gantt`) draws the hop work that devices paying for their
transfers do on their own time, where the simulator schedules it, and none on GPUs."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from moirai.placement import evaluate
from moirai.placement.gantt import bars, draw_gantt, figure

from .instances import fork

ASSIGNMENT = {"a": "x", "b": "x", "c": "y", "d": "x"}


def test_hop_work_is_drawn_on_the_devices_that_pay() -> None:
    # test_simulate's hop work by hand: a->c 1..3 with x busy 1..2 and y receiving 2..3;
    # c->d 6..8 with y busy 6..7 and x receiving 7..8
    cpus = fork("cpu")
    plan = evaluate(cpus, ASSIGNMENT)
    hops = {(b.row, b.start_ms, b.end_ms, b.colour) for b in bars(plan, cpus) if b.kind == "hop"}
    assert hops == {("x", 1, 2, "y"), ("y", 2, 3, "x"), ("y", 6, 7, "x"), ("x", 7, 8, "y")}
    fig = figure(plan, cpus)
    try:
        (ax,) = fig.axes
        hatched = sorted((p.get_x(), p.get_width()) for p in ax.patches if p.get_hatch() == "xx")
        assert hatched == [(1, 1), (2, 1), (6, 1), (7, 1)]
        assert sum(p.get_hatch() == "//" for p in ax.patches) == 2  # the transfers
    finally:
        plt.close(fig)


def test_no_hop_work_on_gpus(tmp_path: Path) -> None:
    gpus = fork()
    plan = evaluate(gpus, ASSIGNMENT)
    assert [b.kind for b in bars(plan, gpus)].count("hop") == 0
    assert len(bars(plan, gpus)) == 4 + 2  # tasks and transfers
    draw_gantt(plan, gpus, tmp_path / "plan.png")
    assert (tmp_path / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
