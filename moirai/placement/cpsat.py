"""`cpsat`: the placement problem as a constraint program for OR-Tools CP-SAT.

Same problem as the paper's MILP, but in scheduling primitives that CP-SAT propagates and
reasons about natively (no big-M):

- task i: start `S_i`, end `E_i = S_i + sum_k d[i,k] x[i,k]`, and for each candidate device k an
  optional fixed-size interval `(S_i, d[i,k])` present iff `x[i,k]`; `ExactlyOne(x[i,.])`;
- one `NoOverlap` per device over its task intervals;
- edge e = (i, j): transfer start `T_e >= E_i`, `S_j >= T_e + sum tau[e,a,b] y[e,a,b]`, where
  `y[e,a,b] <-> x[i,a] and x[j,b]` (a != b); for each such pair an optional interval
  `(T_e, tau[e,a,b])` present iff `y[e,a,b]`, added to device a's send-port `NoOverlap` and to
  device b's receive-port `NoOverlap` (congestion);
- hop work (`problem.hop_work`, on the devices that pay for their transfers): the sender's,
  an optional interval `(T_e, send[e,a,b])` present iff `y[e,a,b]` in device a's `NoOverlap`;
  the receiver's, an optional interval `(R_e, recv[e,a,b])` in device b's, with
  `R_e >= T_e + tau[e,a,b] - recv[e,a,b]` (the data is in) and `S_j >= R_e + recv[e,a,b]`;
- memory `sum_i mem_i x[i,k] <= cap_k`; makespan `C >= S_i + tail[i,k]` when `x[i,k]` (the tail
  includes i's own time, so this covers `C >= E_i`), minimised; redundantly `S_i >= head[i,k]`
  when `x[i,k]` (`bounds.heads_tails`) and `C >=` each device's load, its hop work included.

`throughput` keeps only the assignment: minimise `Z >=` each device's, send port's and receive
port's total time (a device that pays for its transfers counts those into and out of it too,
`simulate.loads`).

Time is integer: one unit is `1/scale` ms, with `scale` chosen from the instance so that the
horizon (a heuristic's makespan) spans at least 10^6 units, the shortest positive duration at
least ~100 and each operation's rounding at most 1/20000 of the horizon, capped at 10^9 units.
Durations are rounded *down*: then any real schedule maps to an integer one no longer than it
(floor(a + b) >= floor(a) + floor(b)), so CP-SAT's bound divided by the scale is a valid lower
bound of the real problem (the receiver's earliest start `T_e + tau - recv` rounds its `recv`
up for the same reason). The solution's assignment and operation order are replayed in exact
time by the simulator (`retime`); the difference to CP-SAT's own objective is the rounding
error, reported in the plan (`rounding_error_ms`).

Hints (CP-SAT's warm start) come from the heuristic plan, floored the same way, which keeps them
feasible. `num_workers` is the thread count; `random_seed` the seed. CP-SAT's parallel
portfolio races workers against the clock, so with several threads two runs stopped by the time
limit may differ; with `threads=1`, or when optimality is proven, results are reproducible.
Some presolve steps overrun CP-SAT's own time limit on a loaded machine, so a watchdog thread
also stops the search at the deadline; probing is skipped on large models (`PROBING_LIMIT`).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from moirai.errors import InfeasibleError, SolverError
from moirai.placement.bounds import heads_tails, lower_bound, serial_horizon, settle
from moirai.placement.contract import (
    SolveOptions,
    fall_back,
    interruptible,
    no_plan,
    stoppable,
)
from moirai.placement.memory import assignment_vars
from moirai.placement.problem import PlacementProblem
from moirai.placement.result import Placement
from moirai.placement.simulate import list_schedule, loads, retime
from moirai.placement.warm import warm_start

PROBING_LIMIT = 2000
"""Models with more optional intervals skip CP-SAT's probing in presolve: on them it can take
most of a minute before the search even starts, while the search itself finds and proves more."""
WATCHDOG_GRACE_S = 0.2


def choose_scale(problem: PlacementProblem, horizon_ms: float) -> float:
    """Integer time units per millisecond for this instance."""
    durations = [v for row in problem.compute for v in row.values() if v > 0]
    durations += [v for e in problem.transfer for row in e for v in row if v > 0]
    shortest = min(durations, default=1.0)
    horizon_ms = max(horizon_ms, shortest)
    operations = problem.n + len(problem.edges)
    units = min(1e9, max(1e6, 100.0 * horizon_ms / shortest, 2e4 * operations))
    return units / horizon_ms


@dataclass
class CpModel:
    """The CP-SAT model of a problem and where its variables sit."""

    model: Any
    scale: float
    x: list[dict[int, Any]]
    y: dict[tuple[int, int, int], Any]
    start: list[Any]
    end: list[Any]
    tstart: dict[int, Any]
    rstart: dict[int, Any]
    """Start of each edge's receiver's work (edges that may have some)."""
    objective: Any
    intervals: int


def build(
    problem: PlacementProblem,
    horizon_ms: float,
    allowed: Sequence[Sequence[int]] | None = None,
) -> CpModel:
    """The model; `allowed[i]` may narrow task i's devices (then its bound is not global)."""
    from ortools.sat.python import cp_model

    p = problem
    scale = choose_scale(p, horizon_ms)
    horizon = math.ceil(horizon_ms * scale) + p.n + len(p.edges) + 1
    cands = [tuple(allowed[i]) if allowed else p.cand[i] for i in range(p.n)]
    m = cp_model.CpModel()
    dur = [{k: math.floor(p.compute[i][k] * scale) for k in cands[i]} for i in range(p.n)]
    x = assignment_vars(m, p, cands)

    y: dict[tuple[int, int, int], Any] = {}
    tau: dict[tuple[int, int, int], int] = {}
    for e, (i, j) in enumerate(p.edges):
        for a in cands[i]:
            for b in cands[j]:
                if a == b:
                    continue
                lit = y[e, a, b] = m.NewBoolVar(f"y{e}_{a}_{b}")
                m.AddImplication(lit, x[i][a])
                m.AddImplication(lit, x[j][b])
                m.AddBoolOr([x[i][a].Not(), x[j][b].Not(), lit])
                tau[e, a, b] = math.floor(p.transfer[e][a][b] * scale)

    if p.objective == "throughput":
        z = m.NewIntVar(0, horizon * max(1, p.n), "period")
        for k in range(p.num_devices):
            own = [(t, y[key]) for key, t in tau.items() if k in key[1:]]
            m.Add(
                z
                >= sum(dur[i][k] * x[i][k] for i in range(p.n) if k in x[i])
                + sum(t * lit for t, lit in own if p.pays_for_transfers[k])
            )
            m.Add(z >= sum(t * y[key] for key, t in tau.items() if key[1] == k))
            m.Add(z >= sum(t * y[key] for key, t in tau.items() if key[2] == k))
        m.Minimize(z)
        return CpModel(m, scale, x, y, [], [], {}, {}, z, 0)

    start = [m.NewIntVar(0, horizon, f"s{i}") for i in range(p.n)]
    end = []
    device_iv: list[list[Any]] = [[] for _ in range(p.num_devices)]
    for i in range(p.n):
        end_i = m.NewIntVar(0, horizon, f"e{i}")
        m.Add(end_i == start[i] + sum(dur[i][k] * x[i][k] for k in cands[i]))
        end.append(end_i)
        for k in cands[i]:
            if dur[i][k] > 0:
                device_iv[k].append(
                    m.NewOptionalFixedSizeIntervalVar(start[i], dur[i][k], x[i][k], f"t{i}_{k}")
                )
    send_iv: list[list[Any]] = [[] for _ in range(p.num_devices)]
    recv_iv: list[list[Any]] = [[] for _ in range(p.num_devices)]
    tstart: dict[int, Any] = {}
    rstart: dict[int, Any] = {}
    hop_load: list[list[Any]] = [[] for _ in range(p.num_devices)]
    for e, (i, j) in enumerate(p.edges):
        keys = [key for key in ((e, a, b) for a in cands[i] for b in cands[j]) if key in y]
        if not keys:
            m.Add(start[j] >= end[i])
            continue
        t = tstart[e] = m.NewIntVar(0, horizon, f"T{e}")
        m.Add(t >= end[i])
        m.Add(start[j] >= t + sum(tau[key] * y[key] for key in keys))
        for key in keys:
            if tau[key] > 0:
                iv = m.NewOptionalFixedSizeIntervalVar(
                    t, tau[key], y[key], f"c{e}_{key[1]}_{key[2]}"
                )
                send_iv[key[1]].append(iv)
                recv_iv[key[2]].append(iv)
        sends = {key: math.floor(p.send_work[e][key[1]][key[2]] * scale) for key in keys}
        for key, d in sends.items():
            if d > 0:
                device_iv[key[1]].append(
                    m.NewOptionalFixedSizeIntervalVar(t, d, y[key], f"hs{e}_{key[1]}_{key[2]}")
                )
                hop_load[key[1]].append(d * y[key])
        recvs = {key: p.recv_work[e][key[1]][key[2]] * scale for key in keys}
        if not any(math.floor(v) > 0 for v in recvs.values()):
            continue
        r = rstart[e] = m.NewIntVar(0, horizon, f"R{e}")
        m.Add(r >= t + sum((tau[key] - math.ceil(v)) * y[key] for key, v in recvs.items()))
        m.Add(start[j] >= r + sum(math.floor(v) * y[key] for key, v in recvs.items()))
        for key, v in recvs.items():
            if math.floor(v) > 0:
                device_iv[key[2]].append(
                    m.NewOptionalFixedSizeIntervalVar(
                        r, math.floor(v), y[key], f"hr{e}_{key[1]}_{key[2]}"
                    )
                )
                hop_load[key[2]].append(math.floor(v) * y[key])
    for ivs in (*device_iv, *send_iv, *recv_iv):
        if len(ivs) > 1:
            m.AddNoOverlap(ivs)
    cmax = m.NewIntVar(0, horizon, "makespan")
    # heads and tails (`bounds.heads_tails`: earliest start on a device, least time from
    # there to the end): redundant, but they tighten propagation and the linear relaxation
    head, tail = heads_tails(p)
    for i in range(p.n):
        # linear in x (as in the MILP), so they enter CP-SAT's LP relaxation as they are
        hs = [math.floor(head[i][k] * scale) for k in cands[i]]
        ts = [math.floor(tail[i][k] * scale) for k in cands[i]]
        xs = [x[i][k] for k in cands[i]]
        m.Add(start[i] >= cp_model.LinearExpr.WeightedSum(xs, hs))
        m.Add(cmax >= start[i] + cp_model.LinearExpr.WeightedSum(xs, ts))
    for k in range(p.num_devices):
        load = [dur[i][k] * x[i][k] for i in range(p.n) if k in x[i] and dur[i][k] > 0]
        if load or hop_load[k]:
            m.Add(cmax >= sum(load) + sum(hop_load[k]))
    m.Minimize(cmax)
    intervals = sum(len(ivs) for ivs in (*device_iv, *send_iv, *recv_iv))
    return CpModel(m, scale, x, y, start, end, tstart, rstart, cmax, intervals)


def add_hint(cp: CpModel, problem: PlacementProblem, plan: Placement) -> None:
    """Hint every variable from a valid plan (floored to the model's time units).

    A complete, feasible hint is CP-SAT's first solution at once, which its large-neighbourhood
    search workers then improve; an incomplete one may be ignored for the whole time limit.
    """
    p = problem
    m, s = cp.model, cp.scale
    assign = [p.device_index[plan.assignment[t]] for t in p.tasks]
    for i in range(p.n):
        for k, v in cp.x[i].items():
            m.AddHint(v, int(assign[i] == k))
    for (e, a, b), v in cp.y.items():
        i, j = p.edges[e]
        m.AddHint(v, int(assign[i] == a and assign[j] == b))
    if p.objective == "throughput":
        m.AddHint(cp.objective, _period_units(cp, p, assign))
        return
    starts = {st.task: st.start_ms for st in plan.schedule}
    begin = [math.floor(starts[t] * s) for t in p.tasks]
    finish = [begin[i] + math.floor(p.compute[i][assign[i]] * s) for i in range(p.n)]
    for i in range(p.n):
        m.AddHint(cp.start[i], begin[i])
        m.AddHint(cp.end[i], finish[i])
    xs = {(x.src, x.dst): x for x in plan.transfers}
    for e, v in cp.tstart.items():
        i, j = p.edges[e]
        key = (p.tasks[i], p.tasks[j])
        m.AddHint(v, math.floor(xs[key].start_ms * s) if key in xs else finish[i])
    for e, v in cp.rstart.items():
        i, j = p.edges[e]
        x = xs.get((p.tasks[i], p.tasks[j]))
        if x is None:  # no transfer: any time between the source's end and the consumer's start
            m.AddHint(v, finish[i])
            continue
        arrive = x.arrival_ms
        rw = p.recv_work[e][assign[i]][assign[j]]
        m.AddHint(v, math.floor((arrive - rw) * s))
    m.AddHint(cp.objective, max(finish))


def _period_units(cp: CpModel, problem: PlacementProblem, assign: list[int]) -> int:
    """The period of an assignment in the model's (floored) units."""
    return int(max(loads(problem, assign, lambda ms: math.floor(ms * cp.scale))))


@dataclass(frozen=True)
class CpSatSolver:
    name: str = "cpsat"
    description: str = "OR-Tools CP-SAT: intervals, NoOverlap per device and port"

    def available(self) -> tuple[bool, str]:
        try:
            from ortools.sat.python import cp_model  # noqa: F401
        except ImportError:
            return False, "ortools is not installed"
        return True, ""

    @stoppable
    def solve(self, problem: PlacementProblem, options: SolveOptions) -> Placement:
        return solve_cpsat(problem, options)


class Session:
    """One CP-SAT model of a problem, searched once or several times, each time from a hint.

    `auto` gives CP-SAT several turns between other searches, each from the best plan found so
    far by anyone (a complete hint is CP-SAT's first solution at once): the model is built once,
    and its proven bound only grows from turn to turn. With `allowed`, tasks are restricted to
    those devices (large instances): its plans are then heuristic improvements, and its bound is
    the problem's simple one.
    """

    def __init__(
        self,
        problem: PlacementProblem,
        horizon_ms: float,
        allowed: Sequence[Sequence[int]] | None = None,
        label: str = "cpsat",
        parameters: Mapping[str, Any] | None = None,
    ) -> None:
        self.problem = problem
        self.allowed = allowed
        self.label = label
        self.parameters = dict(parameters or {})
        self.cp = build(problem, horizon_ms, allowed)
        self.bound = lower_bound(problem)
        self.turns = 0
        self.status = ""

    def search(self, options: SolveOptions, hint: Placement | None) -> Placement | None:
        """The best plan CP-SAT finds within `options`' limits from `hint` (re-timed exactly),
        or None when it finds none. Raises `InfeasibleError` when it proves there is none."""
        from ortools.sat.python import cp_model

        started = time.monotonic()
        p, cp, label = self.problem, self.cp, self.label
        cp.model.ClearHints()
        if hint is not None:
            add_hint(cp, p, hint)
        solver = cp_model.CpSolver()
        params = solver.parameters
        params.max_time_in_seconds = max(0.05, options.remaining())
        if options.work_limit is not None:
            params.max_deterministic_time = options.work_limit
        params.num_workers = options.threads
        params.random_seed = options.seed + self.turns
        params.catch_sigint_signal = False  # Ctrl-C must stop the run, not only the search
        if cp.intervals > PROBING_LIMIT:
            params.cp_model_probing_level = 0
        for key, value in self.parameters.items():
            setattr(params, key, value)
        self.turns += 1
        scale = cp.scale
        exact = self.allowed is None
        session = self

        class Progress(cp_model.CpSolverSolutionCallback):
            def on_solution_callback(self) -> None:
                bound = self.BestObjectiveBound() / scale if exact else session.bound
                options.report(label, self.ObjectiveValue() / scale, bound)

        if options.progress is not None and exact:
            solver.best_bound_callback = lambda bound: options.report(label, None, bound / scale)
        # CP-SAT checks its time limit less often in some presolve steps, and a loaded machine
        # stretches them: a watchdog stops the search at the deadline whatever the phase.
        watchdog = threading.Timer(options.remaining() + WATCHDOG_GRACE_S, solver.StopSearch)
        watchdog.daemon = True
        watchdog.start()
        try:
            callback = Progress() if options.progress is not None else None
            status = interruptible(lambda: solver.Solve(cp.model, callback), solver.StopSearch)
        finally:
            watchdog.cancel()
        self.status = solver.StatusName(status)
        if status == cp_model.INFEASIBLE and exact:
            raise InfeasibleError(f"{label}: no placement fits the device memories (proven)")
        if status == cp_model.MODEL_INVALID:
            raise SolverError(f"{label}: CP-SAT rejected the model ({solver.ResponseStats()})")
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            return None
        if exact:
            self.bound = max(self.bound, solver.BestObjectiveBound() / scale)
        assign = [next(k for k, v in cp.x[i].items() if solver.Value(v)) for i in range(p.n)]
        schedules = [list_schedule(p, assign)]
        if p.objective == "latency":
            starts = [solver.Value(v) / scale for v in cp.start]
            tstarts = {e: solver.Value(v) / scale for e, v in cp.tstart.items()}
            rstarts = {e: solver.Value(v) / scale for e, v in cp.rstart.items()}
            schedules.append(retime(p, assign, starts, tstarts, rstarts))
        sched = min(schedules, key=lambda s: s.makespan)
        extra = {"time_unit_ms": 1.0 / scale, "cpsat_status": self.status}
        plan = sched.to_placement(label, "feasible", self.bound, time.monotonic() - started, extra)
        plan.extra["rounding_error_ms"] = max(
            0.0, plan.objective_ms - solver.ObjectiveValue() / scale
        )
        if not exact:
            plan.extra["note"] = "devices per task restricted: bound is the simple one"
        settle(plan, self.bound)
        return plan


def solve_cpsat(
    problem: PlacementProblem,
    options: SolveOptions,
    allowed: Sequence[Sequence[int]] | None = None,
    label: str = "cpsat",
    parameters: Mapping[str, Any] | None = None,
) -> Placement:
    """Solve with CP-SAT from `options.hint` (HEFT when absent); never worse than the hint.

    With `allowed`, tasks are restricted to those devices (large instances): the result is
    then a heuristic improvement whose bound is the problem's simple one. `parameters` sets
    CP-SAT parameters by name (after the defaults here).
    """
    started = time.monotonic()
    p = problem
    warm = options.hint or warm_start(p, options.deadline)
    horizon = warm.objective_ms if warm is not None else serial_horizon(p)
    session = Session(p, horizon, allowed, label, parameters)
    try:
        plan = session.search(options, warm)
    except InfeasibleError:
        if allowed is None or warm is None:
            raise
        plan = None
    if plan is None:
        if warm is None:
            raise no_plan(label, options)
        note = "no solution within the time limit"
        if session.status == "INFEASIBLE":
            note = "restricted model infeasible"
        return fall_back(warm, label, session.bound, started, note, options)
    if warm is not None and warm.objective_ms < plan.objective_ms:
        return fall_back(warm, label, session.bound, started, "kept the warm start", options)
    plan.solve_seconds = time.monotonic() - started
    options.report(label, plan.objective_ms, plan.lower_bound_ms)
    return plan


SOLVERS = (CpSatSolver(),)
