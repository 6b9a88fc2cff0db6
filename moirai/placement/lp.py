"""HiGHS helpers shared by the LP-based heuristics, the MILP and the LP bound.

`new_highs` makes a silent instance on a given number of threads, `run_highs` runs it so that
Ctrl-C stops it, and `solve_lp` minimises one column of a small sparse LP within a deadline
(GETF's and m-SCT's relaxations, `windowed_load`, the load bound in time windows, and
`path_lp`, the relaxation that couples the assignment with paths, transfers and ports).
"""

from __future__ import annotations

import time
from typing import Any

from moirai.errors import InfeasibleError
from moirai.placement.bounds import heads_tails, lower_bound
from moirai.placement.contract import interruptible
from moirai.placement.problem import PlacementProblem


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
    method: str | None = None,
) -> list[float] | None:
    """Minimise one column subject to sparse rows (lower, upper, cols, vals), columns >= 0;
    None when HiGHS does not finish by the deadline (the caller then drops the LP's advice).
    `method` is HiGHS's `solver` option (`ipm`, `simplex`; by default HiGHS chooses)."""
    import highspy
    import numpy as np

    h = new_highs(1)
    if method is not None:
        h.setOptionValue("solver", method)
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


WINDOWS = 12
"""Release and tail thresholds per side in `windowed_load` (24 windows in all)."""
ROUNDS = 4
"""LPs `windowed_load` solves at most, each with windows up to the last one's bound."""


def windowed_load(problem: PlacementProblem, deadline: float) -> float | None:
    """The windowed load bound: a fractional assignment's busiest device, in time windows.

    In a plan with makespan C, a task i on device k starts no earlier than its head
    `head[i][k]` and ends no later than C minus its tail after it (`tail[i][k] - p[i][k]`,
    `bounds.heads_tails`): so the tasks of k with head >= t and tail after >= s all run inside
    [t, C - s], one at a time, and C >= t + s + their times. When none of them is on k that
    says only C >= t + s, which is true of every plan as long as t + s is at most a known
    lower bound L. So, over fractional assignments (each task's shares sum to 1; memory per
    device), minimising C subject to C >= t + s + sum of p[i][k] x[i][k] over those tasks, for
    a grid of windows (t, 0) and (0, s) with t, s <= L and every device, is an LP whose optimum
    is at most any plan's makespan, and a new L: the LP is solved again with windows up to it
    while that raises it (`ROUNDS`). The window (0, 0) alone is the plain fractional load bound,
    which holds for the throughput objective's period as well: there it is all this computes.
    None when HiGHS does not finish by the deadline.
    """
    p = problem
    head, tail = heads_tails(p)
    after = [{k: tail[i][k] - p.compute[i][k] for k in p.cand[i]} for i in range(p.n)]
    known = lower_bound(p) if p.objective == "latency" else 0.0
    best = None
    for _ in range(ROUNDS):
        value = _windowed_lp(p, head, after, known, deadline)
        if value is None:
            return best
        best = max(value, best or 0.0)
        if value <= known * (1 + 1e-3):
            break
        known = value
    return best


def _windowed_lp(
    p: PlacementProblem,
    head: list[dict[int, float]],
    after: list[dict[int, float]],
    known: float,
    deadline: float,
) -> float | None:
    import highspy

    col: dict[tuple[int, int], int] = {}
    for i in range(p.n):
        for k in p.cand[i]:
            col[i, k] = len(col)
    makespan = len(col)
    inf = highspy.kHighsInf
    rows: list[tuple[float, float, list[int], list[float]]] = []
    for i in range(p.n):
        cols = [col[i, k] for k in p.cand[i]]
        rows.append((1.0, 1.0, cols, [1.0] * len(cols)))
    for k in range(p.num_devices):
        on_k = [i for i in range(p.n) if k in p.cand[i]]
        if sum(p.mem[i] for i in on_k) > p.cap[k]:
            mem = [float(p.mem[i]) for i in on_k]
            rows.append((-inf, float(p.cap[k]), [col[i, k] for i in on_k], mem))
    windows = [(0.0, 0.0)]
    if p.objective == "latency":
        heads = sorted({h for i in range(p.n) for h in head[i].values() if 0 < h <= known})
        tails = sorted({a for i in range(p.n) for a in after[i].values() if 0 < a <= known})
        windows += [(t, 0.0) for t in _grid(heads)] + [(0.0, s) for s in _grid(tails)]
    for t, s in windows:
        for k in range(p.num_devices):
            inside = [
                i
                for i in range(p.n)
                if k in p.cand[i]
                and p.compute[i][k] > 0
                and (p.objective != "latency" or (head[i][k] >= t and after[i][k] >= s))
            ]
            if inside:
                cols = [makespan] + [col[i, k] for i in inside]
                vals = [1.0] + [-p.compute[i][k] for i in inside]
                rows.append((t + s, inf, cols, vals))
    x = solve_lp(makespan + 1, makespan, rows, deadline)
    return None if x is None else x[makespan]


def _grid(values: list[float]) -> list[float]:
    """At most `WINDOWS` of the sorted `values`, spread evenly."""
    if len(values) <= WINDOWS:
        return values
    return [values[round(j * (len(values) - 1) / (WINDOWS - 1))] for j in range(WINDOWS)]


PATH_LP_COLUMNS = 80_000
"""`path_lp` is skipped on models with more columns (its transfer variables grow with edges
times device pairs)."""
PATH_LP_S_PER_COLUMN = 1.5e-4
"""About what building and solving `path_lp`'s model costs per column with HiGHS's interior
point method on one core of the development machine (17,000 columns: 1.6 s, 33,000-47,000:
5.5-8.5 s; the dual simplex it used before took 3 s and 32 s); the model is not built when
that estimate passes its deadline."""


def path_lp_columns(problem: PlacementProblem) -> int:
    p = problem
    count = sum(len(c) for c in p.cand) + p.n + 1
    return count + sum(len(p.cand[i]) * len(p.cand[j]) for i, j in p.edges)


def path_lp(problem: PlacementProblem, deadline: float) -> float | None:
    """The path LP bound (latency): assignment, start times, transfers and ports in one LP.

    Variables: the fractional assignment `x[i][k]` (shares sum to 1; memory per device), a
    start `S_i` per task, and per edge e = (i, j) a transport `z[e][a][b] >= 0` between i's
    and j's shares (`sum_b z[e][a][b] = x[i][a]`, `sum_a z[e][a][b] = x[j][b]`; in a plan,
    1 for the pair (i's device, j's device) and 0 elsewhere). Rows, each true of every plan
    with makespan C read as an integral point:
    - `S_j >= S_i + sum_a p[i][a] x[i][a] + sum_{a != b} tau[e][a][b] z[e][a][b]` (precedence,
      with i's time and the edge's transfer under the assignment);
    - `S_i >= sum_k head[i][k] x[i][k]` and `C >= S_i + sum_k tail[i][k] x[i][k]` (the
      device-aware heads and tails of `bounds.heads_tails`, which hold for i's own device);
    - `C >= sum_i p[i][k] x[i][k]` for every device, and `C >=` the time each device's send
      port and receive port spend on transfers (`sum tau z` over the pairs leaving or entering
      it), since a port moves one tensor at a time.
    Its optimum is at most any plan's makespan. Unlike the load bounds it sees that keeping a
    chain on the fast device leaves its neighbours' shares elsewhere paying for transfers on
    their paths and ports. None when the model has more than `PATH_LP_COLUMNS` columns or would
    take longer than the time left (`PATH_LP_S_PER_COLUMN`), for the throughput objective
    (whose LP is the MILP's own), or when HiGHS does not finish by the deadline.
    """
    p = problem
    if p.objective != "latency":
        return None
    columns = path_lp_columns(p)
    if columns > PATH_LP_COLUMNS or columns * PATH_LP_S_PER_COLUMN > deadline - time.monotonic():
        return None
    import highspy

    inf = highspy.kHighsInf
    head, tail = heads_tails(p)
    col: dict[tuple[int, int], int] = {}
    for i in range(p.n):
        for k in p.cand[i]:
            col[i, k] = len(col)
    start = len(col)
    makespan = start + p.n
    ncol = makespan + 1
    rows: list[tuple[float, float, list[int], list[float]]] = []
    for i in range(p.n):
        cols = [col[i, k] for k in p.cand[i]]
        rows.append((1.0, 1.0, cols, [1.0] * len(cols)))
        rows.append((0.0, inf, [start + i, *cols], [1.0, *(-head[i][k] for k in p.cand[i])]))
        rows.append(
            (0.0, inf, [makespan, start + i, *cols], [1.0, -1.0, *(-tail[i][k] for k in p.cand[i])])
        )
    for k in range(p.num_devices):
        on_k = [i for i in range(p.n) if k in p.cand[i]]
        if on_k:
            cols = [makespan] + [col[i, k] for i in on_k]
            rows.append((0.0, inf, cols, [1.0] + [-p.compute[i][k] for i in on_k]))
        if sum(p.mem[i] for i in on_k) > p.cap[k]:
            mem = [float(p.mem[i]) for i in on_k]
            rows.append((-inf, float(p.cap[k]), [col[i, k] for i in on_k], mem))
    send: list[list[tuple[int, float]]] = [[] for _ in range(p.num_devices)]
    recv: list[list[tuple[int, float]]] = [[] for _ in range(p.num_devices)]
    for e, (i, j) in enumerate(p.edges):
        z = {}
        for a in p.cand[i]:
            for b in p.cand[j]:
                z[a, b] = ncol
                ncol += 1
        for a in p.cand[i]:
            rows.append(
                (
                    0.0,
                    0.0,
                    [col[i, a], *(z[a, b] for b in p.cand[j])],
                    [-1.0] + [1.0] * len(p.cand[j]),
                )
            )
        for b in p.cand[j]:
            rows.append(
                (
                    0.0,
                    0.0,
                    [col[j, b], *(z[a, b] for a in p.cand[i])],
                    [-1.0] + [1.0] * len(p.cand[i]),
                )
            )
        cols = [start + j, start + i] + [col[i, a] for a in p.cand[i]]
        vals = [1.0, -1.0] + [-p.compute[i][a] for a in p.cand[i]]
        for (a, b), c in z.items():
            tau = p.transfer[e][a][b]
            if a != b and tau > 0:
                cols.append(c)
                vals.append(-tau)
                send[a].append((c, tau))
                recv[b].append((c, tau))
        rows.append((0.0, inf, cols, vals))
    for port in (*send, *recv):
        if port:
            rows.append(
                (0.0, inf, [makespan] + [c for c, _ in port], [1.0] + [-t for _, t in port])
            )
    x = solve_lp(ncol, makespan, rows, deadline, method="ipm")
    return None if x is None else x[makespan]
