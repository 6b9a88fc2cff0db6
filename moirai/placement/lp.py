"""HiGHS helpers shared by the LP-based heuristics, the MILP and the LP bounds.

`new_highs` makes a silent instance on a given number of threads, `run_highs` runs it so that
Ctrl-C or the solve's stop ends it, and `solve_lp` minimises one column of a small sparse LP
within a deadline (GETF's and m-SCT's relaxations, and `path_lp`, the relaxation that couples
the assignment with paths, transfers and ports). `windowed_load`, the load bound in time
windows, keeps one HiGHS model and adds the windows its solutions violate.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
from collections.abc import Iterator
from typing import Any

from moirai.errors import InfeasibleError
from moirai.placement.bounds import heads_tails, lower_bound
from moirai.placement.contract import interruptible, passed, seconds_left
from moirai.placement.problem import PlacementProblem


def new_highs(threads: int) -> Any:
    """A silent HiGHS instance on `threads` threads.

    HiGHS keeps one process-wide thread pool sized by the first solve; a later solve asking for
    another size fails unless the pool is reset first, so reset it every time (solves here never
    run concurrently).
    """
    import highspy

    highspy.Highs.resetGlobalScheduler(True)
    _banner_muted()
    h = highspy.Highs()
    h.silent()
    h.setOptionValue("threads", threads)
    return h


@functools.cache
def _banner_muted() -> None:
    """Make this process's first HiGHS instance with standard output muted: HiGHS writes its
    banner ("Running HiGHS ...") there when it makes its first one, before any option can
    silence it, and `moirai place` prints its report there."""
    import highspy

    with _stdout_muted():
        highspy.Highs()


@contextlib.contextmanager
def _stdout_muted() -> Iterator[None]:
    """File descriptor 1 pointed at /dev/null for the block (C code writes to it directly)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def run_highs(h: Any) -> None:
    """`h.run()`, stopped by Ctrl-C or the solve's stop (`interruptible`): HiGHS's interrupt
    callbacks poll the flag that `cancelSolve` sets."""
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
    h.setOptionValue("time_limit", max(0.05, seconds_left(deadline)))
    inf = highspy.kHighsInf
    cost = np.zeros(ncol)
    cost[objective_col] = 1.0
    h.addVars(ncol, np.zeros(ncol), np.full(ncol, inf))
    h.changeColsCost(ncol, np.arange(ncol, dtype=np.int32), cost)
    _add_rows(h, rows)
    run_highs(h)
    status = h.getModelStatus()
    if status == highspy.HighsModelStatus.kInfeasible:
        raise InfeasibleError("no placement fits: the tasks' memory cannot be shared out")
    if status != highspy.HighsModelStatus.kOptimal:
        return None
    return list(h.getSolution().col_value)


SEPARATION_ROUNDS = 60
"""LPs `windowed_load` solves at most, each with the windows the last one violated most."""


def windowed_load(problem: PlacementProblem, deadline: float, hops: bool = False) -> float | None:
    """The windowed load bound: a fractional assignment's busiest device, in time windows.

    In a plan with makespan C, a task i on device k starts no earlier than its head
    `head[i][k]` and ends no later than C minus its tail after it (`tail[i][k] - p[i][k]`,
    `bounds.heads_tails`): so the tasks of k with head >= t and tail after >= s all run inside
    [t, C - s], one at a time, and C >= t + s + their times. When none of them is on k that
    says only C >= t + s, which is true of every plan as long as t + s is at most a known
    lower bound L. So, over fractional assignments (each task's shares sum to 1; memory per
    device), minimising C subject to C >= t + s + sum of p[i][k] x[i][k] over those tasks, for
    windows (t, 0) and (0, s) with t, s <= L and every device, is an LP whose optimum is at
    most any plan's makespan. There is a window per head (tail) value and device, too many
    to write down on large models, so they are separated: the LP starts with the window
    (0, 0) of each device, and each round adds, per device and side, the window the last
    solution violates most (a scan of the tasks in order of head, or of tail), with L the
    best bound so far (each LP's optimum is one, whatever rows it has), until none is violated
    (`SEPARATION_ROUNDS`; 3 to 15 rounds on the benchmark's random DAGs, well under a second).
    The window (0, 0) alone is the plain fractional load bound, which holds for the
    throughput objective's period as well: there it is all this computes. None when HiGHS
    does not finish the first LP by the deadline.

    With `hops` (latency, devices that pay for their transfers), the windows also hold the
    devices' hop work (`problem.hop_work`), priced by `_hop_columns` on the fractional
    assignment: a window reaching the end holds the sends of its tasks (a send starts after
    its task and ends before its consumer starts), one from the start their receives (which
    end before their task starts); the window (0, 0) holds both. On the bench's random DAGs
    it raises the bound by 15-30% (random-6 6.35 -> 8.35 ms, random-7 9.37 -> 10.82), but its
    first LP takes seconds on large models (HiGHS's interior point: 1.3 s on 600 tasks and 6
    devices, 5.4 s on 800 x 8, 15 s on 1,500 x 8; the simplex takes 27 s on 800 x 8), so
    `auto` asks for it only after the plain one, where the path LP does not run.
    """
    import highspy
    import numpy as np

    p = problem
    latency = p.objective == "latency"
    head, tail = heads_tails(p)
    after = [{k: tail[i][k] - p.compute[i][k] for k in p.cand[i]} for i in range(p.n)]
    known = lower_bound(p) if latency else 0.0
    col: dict[tuple[int, int], int] = {}
    for i in range(p.n):
        for k in p.cand[i]:
            col[i, k] = len(col)
    makespan = len(col)
    inf = highspy.kHighsInf
    rows: list[Row] = []
    with_hops = hops and latency and p.has_hop_work
    sends, recvs, ncol = _hop_columns(p, col, makespan + 1, rows) if with_hops else ({}, {}, 0)
    ncol = max(ncol, makespan + 1)
    h = new_highs(1)
    if sends or recvs:  # HiGHS's simplex stalls on the hop rows (800 tasks: 27 s, IPM 2 s)
        h.setOptionValue("solver", "ipm")
    h.addVars(ncol, np.zeros(ncol), np.full(ncol, inf))
    h.changeColCost(makespan, 1.0)
    busy = [
        [
            i
            for i in range(p.n)
            if k in p.cand[i] and (p.compute[i][k] > 0 or (k, i) in sends or (k, i) in recvs)
        ]
        for k in range(p.num_devices)
    ]

    def window(k: int, t: float, s: float) -> Row:
        inside = [i for i in busy[k] if not latency or (head[i][k] >= t and after[i][k] >= s)]
        cols = [makespan] + [col[i, k] for i in inside]
        vals = [1.0] + [-p.compute[i][k] for i in inside]
        for shares, side in ((sends, s), (recvs, t)):  # sends end by C, receives start from 0
            if side == 0:
                for i in inside:
                    for c, work in shares.get((k, i), ()):
                        cols.append(c)
                        vals.append(-work)
        return (t + s, inf, cols, vals)

    for i in range(p.n):
        cols = [col[i, k] for k in p.cand[i]]
        rows.append((1.0, 1.0, cols, [1.0] * len(cols)))
    for k in range(p.num_devices):
        on_k = [i for i in range(p.n) if k in p.cand[i]]
        if sum(p.mem[i] for i in on_k) > p.cap[k]:
            mem = [float(p.mem[i]) for i in on_k]
            rows.append((-inf, float(p.cap[k]), [col[i, k] for i in on_k], mem))
    seen = {(k, 0.0, 0.0) for k in range(p.num_devices) if busy[k]}
    rows += [window(*w) for w in sorted(seen)]
    best = None
    for _ in range(SEPARATION_ROUNDS):
        _add_rows(h, rows)
        h.setOptionValue("time_limit", max(0.05, seconds_left(deadline)))
        run_highs(h)
        status = h.getModelStatus()
        if status == highspy.HighsModelStatus.kInfeasible:
            raise InfeasibleError("no placement fits: the tasks' memory cannot be shared out")
        if status != highspy.HighsModelStatus.kOptimal:
            return best
        x = h.getSolution().col_value
        h.setOptionValue("solver", "simplex")  # later rounds start from this basis
        best = max(best or 0.0, x[makespan])
        known = max(known, best)
        if not latency or passed(deadline):
            return best
        rows = []
        for k in range(p.num_devices):
            for side, shares in ((head, sends), (after, recvs)):
                extra = {i: sum(work * x[c] for c, work in shares.get((k, i), ())) for i in busy[k]}
                t = _most_violated(p, busy[k], side, k, x, col, known, x[makespan], extra)
                w = (k, t, 0.0) if side is head else (k, 0.0, t)
                if t is not None and w not in seen:
                    seen.add(w)
                    rows.append(window(*w))
        if not rows:
            break
    return best


Row = tuple[float, float, list[int], list[float]]


Hops = dict[tuple[int, int], list[tuple[int, float]]]


def _hop_columns(
    p: PlacementProblem, col: dict[tuple[int, int], int], first: int, rows: list[Row]
) -> tuple[Hops, Hops, int]:
    """Columns for the hop work of a fractional assignment (`windowed_load`): per edge
    e = (i, j) and device k that pays for its transfers, `s[e][k] >= x[i][k] - x[j][k]` (i on
    k, j elsewhere: k sends) and `r[e][k] >= x[j][k] - x[i][k]` (k receives), rows appended to
    `rows`; in a plan each is 1 exactly when k does that share of the hop, which then takes at
    least its least share over the other end's devices. Returns, by (device, task), the
    columns and least shares of the task's sends and of its receives, and the column count."""
    sends: Hops = {}
    recvs: Hops = {}
    ncol = first
    for e, (i, j) in enumerate(p.edges):
        for k in range(p.num_devices):
            if not p.pays_for_transfers[k]:
                continue
            for me, other, hops, work in (
                (i, j, sends, lambda b, k=k, e=e: p.send_work[e][k][b]),
                (j, i, recvs, lambda a, k=k, e=e: p.recv_work[e][a][k]),
            ):
                if k not in p.cand[me]:
                    continue
                least = min((work(d) for d in p.cand[other] if d != k), default=0.0)
                if least <= 0:
                    continue
                cols, vals = [ncol, col[me, k]], [1.0, -1.0]
                if k in p.cand[other]:
                    cols.append(col[other, k])
                    vals.append(1.0)
                rows.append((0.0, math.inf, cols, vals))
                hops.setdefault((k, me), []).append((ncol, least))
                ncol += 1
    return sends, recvs, ncol


def _add_rows(h: Any, rows: list[Row]) -> None:
    import numpy as np

    starts, index, value = [], [], []
    for _, _, cols, vals in rows:
        starts.append(len(index))
        index.extend(cols)
        value.extend(vals)
    h.addRows(
        len(rows),
        np.array([r[0] for r in rows], dtype=np.float64),
        np.array([r[1] for r in rows], dtype=np.float64),
        len(index),
        np.array(starts, dtype=np.int32),
        np.array(index, dtype=np.int32),
        np.array(value, dtype=np.float64),
    )


def _most_violated(
    p: PlacementProblem,
    tasks: list[int],
    side: list[dict[int, float]],
    k: int,
    x: list[float],
    col: dict[tuple[int, int], int],
    known: float,
    makespan: float,
    extra: dict[int, float],
) -> float | None:
    """The threshold t <= `known` whose one-sided window on device k (the tasks with
    `side[i][k] >= t`) the fractional solution `x` violates most, or None when none is
    violated by more than a millionth of the makespan."""
    most, arg = 1e-6 * max(makespan, 1e-9), None
    load = 0.0
    for i in sorted(tasks, key=lambda i: side[i][k], reverse=True):
        load += p.compute[i][k] * x[col[i, k]] + extra[i]
        t = side[i][k]
        if t <= known and t + load - makespan > most:
            most, arg = t + load - makespan, t
    return arg


HOPS_S_PER_COLUMN_SQUARED = 5e-9
"""About what the first LP of `windowed_load` with `hops` costs, per its columns squared
(interior point, one core of the development machine: 18,000 columns 1.3 s, 32,000 5.4 s,
60,000 15 s)."""


def hops_seconds(problem: PlacementProblem) -> float:
    """About how long the first LP of `windowed_load` with `hops` takes: its columns are one
    per task and candidate, and two per edge and device that pays for its transfers."""
    p = problem
    paying = sum(p.pays_for_transfers)
    columns = sum(len(c) for c in p.cand) + 2 * len(p.edges) * paying
    return HOPS_S_PER_COLUMN_SQUARED * columns**2


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
    - `C >= sum_i p[i][k] x[i][k]` plus the device's hop work (`problem.hop_work`: its share
      of each pair's time, `z` times it, over the pairs leaving or entering it) for every
      device, and `C >=` the time each device's send port and receive port spend on transfers
      (`sum tau z` over those pairs), since a device does one thing at a time and a port moves
      one tensor at a time.
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
    if columns > PATH_LP_COLUMNS or columns * PATH_LP_S_PER_COLUMN > seconds_left(deadline):
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
    work: list[list[tuple[int, float]]] = [[] for _ in range(p.num_devices)]
    for k in range(p.num_devices):
        on_k = [i for i in range(p.n) if k in p.cand[i]]
        work[k] = [(col[i, k], p.compute[i][k]) for i in on_k]
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
        ends = [(col[i, a], [z[a, b] for b in p.cand[j]]) for a in p.cand[i]]
        ends += [(col[j, b], [z[a, b] for a in p.cand[i]]) for b in p.cand[j]]
        for x, pairs in ends:  # each end's share is the sum of its device pairs' shares
            rows.append((0.0, 0.0, [x, *pairs], [-1.0] + [1.0] * len(pairs)))
        cols = [start + j, start + i] + [col[i, a] for a in p.cand[i]]
        vals = [1.0, -1.0] + [-p.compute[i][a] for a in p.cand[i]]
        for (a, b), c in z.items():
            tau = p.transfer[e][a][b]
            if a != b and tau > 0:
                cols.append(c)
                vals.append(-tau)
                send[a].append((c, tau))
                recv[b].append((c, tau))
                for k, hop in ((a, p.send_work[e][a][b]), (b, p.recv_work[e][a][b])):
                    if hop > 0:
                        work[k].append((c, hop))
        rows.append((0.0, inf, cols, vals))
    for port in (*send, *recv, *work):
        if port:
            rows.append(
                (0.0, inf, [makespan] + [c for c, _ in port], [1.0] + [-t for _, t in port])
            )
    x = solve_lp(ncol, makespan, rows, deadline, method="ipm")
    return None if x is None else x[makespan]
