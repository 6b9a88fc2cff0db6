"""HiGHS helpers shared by the LP-based heuristics and the MILP.

`new_highs` makes a silent instance on a given number of threads, `run_highs` runs it so that
Ctrl-C stops it, and `solve_lp` minimises one column of a small sparse LP within a deadline
(GETF's and m-SCT's relaxations).
"""

from __future__ import annotations

import time
from typing import Any

from moirai.errors import InfeasibleError
from moirai.placement.contract import interruptible


def new_highs(threads: int) -> Any:
    """A silent HiGHS instance on `threads` threads.

    HiGHS keeps one process-wide thread pool sized by the first solve; a later solve asking for
    another size fails unless the pool is reset first, so reset it every time (solves here never
    run concurrently).
    """
    import highspy

    highspy.Highs.resetGlobalScheduler(True)
    h = highspy.Highs()
    h.silent()
    h.setOptionValue("threads", threads)
    return h


def run_highs(h: Any) -> None:
    """`h.run()`, stopped by Ctrl-C (`interruptible`): HiGHS's interrupt callbacks poll the flag
    that `cancelSolve` sets."""
    h.HandleUserInterrupt = True
    interruptible(h.run, h.cancelSolve)


def solve_lp(
    ncol: int,
    objective_col: int,
    rows: list[tuple[float, float, list[int], list[float]]],
    deadline: float,
) -> list[float] | None:
    """Minimise one column subject to sparse rows (lower, upper, cols, vals), columns >= 0;
    None when HiGHS does not finish by the deadline (the caller then drops the LP's advice)."""
    import highspy
    import numpy as np

    h = new_highs(1)
    h.setOptionValue("time_limit", max(0.05, deadline - time.monotonic()))
    inf = highspy.kHighsInf
    cost = np.zeros(ncol)
    cost[objective_col] = 1.0
    h.addVars(ncol, np.zeros(ncol), np.full(ncol, inf))
    h.changeColsCost(ncol, np.arange(ncol, dtype=np.int32), cost)
    starts, index, value = [], [], []
    for _, _, cols, vals in rows:
        starts.append(len(index))
        index.extend(cols)
        value.extend(vals)
    h.addRows(
        len(rows),
        np.array([r[0] for r in rows]),
        np.array([r[1] for r in rows]),
        len(index),
        np.array(starts, dtype=np.int32),
        np.array(index, dtype=np.int32),
        np.array(value, dtype=np.float64),
    )
    run_highs(h)
    status = h.getModelStatus()
    if status == highspy.HighsModelStatus.kInfeasible:
        raise InfeasibleError("no placement fits: the tasks' memory cannot be shared out")
    if status != highspy.HighsModelStatus.kOptimal:
        return None
    return list(h.getSolution().col_value)
