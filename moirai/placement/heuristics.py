"""List-scheduling heuristics: `heft`, `getf`, `msct` (the paper's baselines) and `single`.

All of them build their schedule with the one simulator's `Schedule` (insertion-based, transfers
on send/receive ports, hop work on the devices that pay for their transfers), so they obey
Moirai's execution model including congestion and hop work, and all are
memory- and pin-aware: a task only goes to its candidate devices (runnable, pinned, fits alone)
and only where `memory.MemoryGuard` says the tasks not yet placed can still fit, so on a
memory-tight instance they answer whenever the tasks can be packed at all, and otherwise say
there is no plan (`InfeasibleError`).

- `heft` — Heterogeneous Earliest Finish Time, Topcuoglu, Hariri and Wu, "Performance-effective
  and low-complexity task scheduling for heterogeneous computing", IEEE TPDS 13(3), 2002: tasks
  by decreasing upward rank (mean compute over devices, mean transfer over device pairs), each
  to the device with the earliest finish time, insertion-based.
- `getf` — Generalized Earliest Time First, Su, Ren, Vardi and Wierman, "Communication-aware
  scheduling of precedence-constrained tasks on related machines" (Operations Research Letters,
  2021; arXiv 2004.14639). GETF first solves an LP relaxation that fixes, for each task, the
  group of machines it may use, then runs ETF (Hwang, Chow, Anger and Lee, SIAM J. Comput.
  1989) restricted to those groups: repeatedly start the ready (task, device) pair that can
  start earliest (ties: earliest finish, then the larger upward rank). Su et al. group
  *related* machines by speed; our devices are unrelated (each task has its own time per
  device), so our adaptation solves the analogous LP over fractional assignments x[i][k] (min D
  s.t. per-device load <= D, every precedence chain of fractional times plus fractional
  communication <= D, memory) with HiGHS, and lets task i use the devices carrying at least
  half of its largest fraction.
- `msct` — m-SCT, the memory-constrained Small Communication Time placer of Baechi (Jeon et
  al., "Baechi: Fast Device Placement of Machine Learning Graphs", SoCC 2020), after Hanen and
  Munier's SCT algorithm. An LP relaxation (x[e] in [0, 1] for "edge e pays its communication",
  each task has at most one favourite child and is the favourite of at most one parent,
  s_i + p_i + c_e x_e <= s_j, minimise the makespan) chooses favourite children (x_e < 0.5);
  then ETF scheduling where a device that just ran a task is held for its favourite child
  while that child is ready and can start earliest there: another task may use the device
  only if it ends before the child would start. Baechi assumes identical devices; we take the
  fastest compute time and the mean transfer time over device pairs in the LP, and schedule
  with per-device times.
- `single` — the best single device that can run and hold every task (no transfers at all): the
  baseline a distributed placement has to beat.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from moirai.errors import InfeasibleError
from moirai.placement.bounds import lower_bound, settle
from moirai.placement.contract import SolveOptions, stoppable
from moirai.placement.lp import solve_lp
from moirai.placement.memory import MemoryGuard
from moirai.placement.problem import PlacementProblem
from moirai.placement.result import Placement
from moirai.placement.simulate import (
    Schedule,
    TransferPlan,
    list_schedule,
    priority_order,
    upward_rank,
)

EPS = 1e-9


# ----------------------------------------------------------------------- HEFT
def heft(problem: PlacementProblem, deadline: float = math.inf) -> Schedule:
    p = problem
    order = priority_order(p, upward_rank(p))
    sched = Schedule(p)
    guard = MemoryGuard(p, deadline)
    for i in order:
        best: tuple[float, int, float, TransferPlan] | None = None
        for k in p.cand[i]:
            if not guard.allowed(i, k):
                continue
            start, plan = sched.plan(i, k)
            finish = start + p.compute[i][k]
            if best is None or finish < best[0] - EPS:
                best = (finish, k, start, plan)
        assert best is not None  # the guard's witness always leaves one device
        _, k, start, plan = best
        sched.commit(i, k, start, plan)
        guard.place(i, k)
    return sched


# ------------------------------------------------------------------------ ETF
def etf(
    problem: PlacementProblem,
    allowed: Sequence[Sequence[int]],
    favourite: Sequence[int] | None = None,
    deadline: float = math.inf,
) -> Schedule:
    """Earliest Time First over ready (task, device) pairs, memory-guarded.

    `allowed[i]` restricts task i's devices (falling back to all candidates when memory rules
    them all out). With `favourite` (m-SCT), a device whose last task's favourite child is
    ready and starts there earliest is held for it, and the child is placed there.
    """
    p = problem
    level = upward_rank(p)
    sched = Schedule(p)
    guard = MemoryGuard(p, deadline)
    waiting = [len(p.in_edges[i]) for i in range(p.n)]
    ready = {i for i in range(p.n) if waiting[i] == 0}
    last = [-1] * p.num_devices
    cache: dict[tuple[int, int], tuple[tuple[int, ...], float, TransferPlan]] = {}

    def estimate(i: int, k: int) -> tuple[float, TransferPlan]:
        stamp = (
            sched.device[k].version,
            sched.recv[k].version,
            *(sched.send[sched.where[p.edges[e][0]]].version for e in p.in_edges[i]),
            # the senders' hop work (a CPU's share of a transfer) sits on their devices
            *(sched.device[sched.where[p.edges[e][0]]].version for e in p.in_edges[i]),
        )
        hit = cache.get((i, k))
        if hit is not None and hit[0] == stamp:
            return hit[1], hit[2]
        start, plan = sched.plan(i, k)
        cache[(i, k)] = (stamp, start, plan)
        return start, plan

    def devices_of(i: int) -> list[int]:
        ks = [k for k in allowed[i] if guard.allowed(i, k)]
        return ks or [k for k in p.cand[i] if guard.allowed(i, k)]

    for _ in range(p.n):
        options: dict[int, list[tuple[float, int, TransferPlan]]] = {}
        for i in ready:
            options[i] = []
            for k in devices_of(i):
                start, plan = estimate(i, k)
                options[i].append((start, k, plan))
        held: dict[int, tuple[int, float]] = {}
        if favourite is not None:
            for k in range(p.num_devices):
                f = favourite[last[k]] if last[k] >= 0 else -1
                if f >= 0 and f in ready and options[f]:
                    best_f = min(s for s, _, _ in options[f])
                    mine = [s for s, kk, _ in options[f] if kk == k]
                    if mine and mine[0] <= best_f + EPS:
                        held[k] = (f, mine[0])
        held_for = {f: k for k, (f, _) in held.items()}

        def key(i: int, start: float, k: int) -> tuple[float, float, float, int, int]:
            # earliest start; ties: earliest finish, then the larger upward rank
            return (start, start + p.compute[i][k], -level[i], i, k)

        best: tuple[tuple[float, float, float, int, int], float, TransferPlan] | None = None
        for i, opts in options.items():
            for start, k, plan in opts:
                if k in held and held[k][0] != i and start + p.compute[i][k] > held[k][1] + EPS:
                    continue  # the device waits for its favourite child
                if i in held_for and held_for[i] != k:
                    continue  # a held-for child goes where it is held
                if best is None or key(i, start, k) < best[0]:
                    best = (key(i, start, k), start, plan)
        if best is None:  # every option was held back: ignore holds
            best = min(
                ((key(i, s, k), s, plan) for i, opts in options.items() for s, k, plan in opts),
                key=lambda option: option[0],
            )
        (_, _, _, i, k), start, plan = best
        sched.commit(i, k, start, plan)
        guard.place(i, k)
        last[k] = i
        ready.discard(i)
        for e in p.out_edges[i]:
            j = p.edges[e][1]
            waiting[j] -= 1
            if waiting[j] == 0:
                ready.add(j)
    return sched


def _getf_groups(problem: PlacementProblem, deadline: float) -> Sequence[Sequence[int]]:
    """GETF's LP relaxation over fractional assignments; the devices each task may use.

    Columns: x[i][k] (fraction of task i on device k), C[i] (completion), split[e] (how much
    edge e is cut: at least x[i][a] - x[j][a] for every device a), D (the makespan). Rows:
    every task fully assigned; C_j >= C_i + own fractional time + split_e * cheapest transfer;
    C_i <= D; each device's fractional load <= D; memory. Without an LP answer by the
    deadline, every candidate device stays allowed (plain ETF).
    """
    import highspy

    p = problem
    kk = p.num_devices
    xcol: list[dict[int, int]] = []
    ncol = 0
    for i in range(p.n):
        xcol.append({k: ncol + t for t, k in enumerate(p.cand[i])})
        ncol += len(p.cand[i])
    ccol = ncol
    scol = ccol + p.n
    dcol = scol + len(p.edges)
    ncol = dcol + 1
    rows: list[tuple[float, float, list[int], list[float]]] = []
    inf = highspy.kHighsInf
    for e, (i, j) in enumerate(p.edges):
        for a in p.cand[i]:
            cols, vals = [scol + e, xcol[i][a]], [1.0, -1.0]
            if a in xcol[j]:
                cols.append(xcol[j][a])
                vals.append(1.0)
            rows.append((0.0, inf, cols, vals))
    for i in range(p.n):
        cols = list(xcol[i].values())
        rows.append((1.0, 1.0, cols, [1.0] * len(cols)))
        own_c = [xcol[i][k] for k in p.cand[i]]
        own_v = [-p.compute[i][k] for k in p.cand[i]]
        rows.append((0.0, inf, [ccol + i, *own_c], [1.0, *own_v]))
        for e in p.in_edges[i]:
            j = p.edges[e][0]
            cheapest = min(
                (p.transfer[e][a][b] for a in p.cand[j] for b in p.cand[i] if a != b),
                default=0.0,
            )
            rows.append(
                (
                    0.0,
                    inf,
                    [ccol + i, ccol + j, scol + e, *own_c],
                    [1.0, -1.0, -cheapest, *own_v],
                )
            )
        rows.append((0.0, inf, [dcol, ccol + i], [1.0, -1.0]))
    for k in range(kk):
        cols = [xcol[i][k] for i in range(p.n) if k in xcol[i]]
        vals = [p.compute[i][k] for i in range(p.n) if k in xcol[i]]
        rows.append((0.0, inf, [dcol, *cols], [1.0, *(-v for v in vals)]))
        mvals = [float(p.mem[i]) for i in range(p.n) if k in xcol[i]]
        rows.append((-inf, float(p.cap[k]), cols, mvals))
    x = solve_lp(ncol, dcol, rows, deadline)
    if x is None:
        return p.cand
    groups = []
    for i in range(p.n):
        share = {k: x[c] for k, c in xcol[i].items()}
        top = max(share.values())
        groups.append(tuple(k for k in p.cand[i] if share[k] >= 0.5 * top - 1e-9))
    return groups


def getf(problem: PlacementProblem, deadline: float) -> Schedule:
    return etf(problem, _getf_groups(problem, deadline), deadline=deadline)


def _favourite_children(problem: PlacementProblem, deadline: float) -> list[int] | None:
    """m-SCT's LP (Hanen and Munier, as in Baechi): favourite child of each task, or -1;
    None without an LP answer by the deadline (then plain ETF)."""
    p = problem
    ne = len(p.edges)
    kk = p.num_devices
    pairs = max(1, kk * (kk - 1))
    c = [sum(sum(row) for row in p.transfer[e]) / pairs for e in range(ne)]
    # columns: x[e] (ne), s[i] (n), w
    scol = ne
    wcol = ne + p.n
    rows: list[tuple[float, float, list[int], list[float]]] = []
    import highspy

    inf = highspy.kHighsInf
    for e in range(ne):
        rows.append((-inf, 1.0, [e], [1.0]))
    for e, (i, j) in enumerate(p.edges):  # s_j - s_i - c_e x_e >= p_i
        rows.append((p.min_compute[i], inf, [scol + j, scol + i, e], [1.0, -1.0, -c[e]]))
    for i in range(p.n):
        out = p.out_edges[i]
        if out:  # at most one favourite child: sum x >= |out| - 1
            rows.append((len(out) - 1.0, inf, list(out), [1.0] * len(out)))
        inc = p.in_edges[i]
        if inc:
            rows.append((len(inc) - 1.0, inf, list(inc), [1.0] * len(inc)))
        rows.append((p.min_compute[i], inf, [wcol, scol + i], [1.0, -1.0]))
    x = solve_lp(wcol + 1, wcol, rows, deadline)
    if x is None:
        return None
    fav = [-1] * p.n
    has_parent = [False] * p.n
    for e in sorted(range(ne), key=lambda e: (x[e], e)):
        if x[e] >= 0.5:
            break
        i, j = p.edges[e]
        if fav[i] < 0 and not has_parent[j]:
            fav[i] = j
            has_parent[j] = True
    return fav


def msct(problem: PlacementProblem, deadline: float) -> Schedule:
    return etf(
        problem, problem.cand, favourite=_favourite_children(problem, deadline), deadline=deadline
    )


# --------------------------------------------------------------------- single
def single(problem: PlacementProblem, deadline: float = math.inf) -> Schedule:
    p = problem
    best: Schedule | None = None
    for k in range(p.num_devices):
        if all(k in p.cand[i] for i in range(p.n)) and sum(p.mem) <= p.cap[k]:
            sched = list_schedule(p, [k] * p.n)
            if best is None or sched.makespan < best.makespan - EPS:
                best = sched
    if best is None:
        raise InfeasibleError(
            "no single device can run and hold every task (pins, memory or unsupported "
            "operators): use a distributed solver"
        )
    return best


# ------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Heuristic:
    name: str
    description: str
    build: Callable[[PlacementProblem, float], Schedule]
    """Builds the schedule; LP-based ones give up their LP's advice at the deadline."""

    def available(self) -> tuple[bool, str]:
        return True, ""

    @stoppable
    def solve(self, problem: PlacementProblem, options: SolveOptions) -> Placement:
        started = time.monotonic()
        sched = self.build(problem, options.deadline)
        return finish_heuristic(problem, sched, self.name, started, options)


def plain_etf(problem: PlacementProblem, deadline: float = math.inf) -> Schedule:
    return etf(problem, problem.cand, deadline=deadline)


def finish_heuristic(
    problem: PlacementProblem,
    sched: Schedule,
    name: str,
    started: float,
    options: SolveOptions,
    bound: float | None = None,
) -> Placement:
    """A heuristic's plan with the problem's lower bound; `optimal` when it meets it."""
    lb = lower_bound(problem) if bound is None else bound
    plan = settle(sched.to_placement(name, "heuristic", lb, time.monotonic() - started), lb)
    options.report(name, plan.objective_ms, plan.lower_bound_ms)
    return plan


SOLVERS = (
    Heuristic("heft", "HEFT list scheduling (Topcuoglu et al. 2002)", heft),
    Heuristic("getf", "Generalized Earliest Time First (Su et al. 2021), LP groups", getf),
    Heuristic("msct", "m-SCT: memory-constrained SCT with favourite children (Baechi)", msct),
    Heuristic("single", "best single device", single),
)
