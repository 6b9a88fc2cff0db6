"""Placement: solvers, the simulator that checks them, and the placement result format.

The one entry point is `solve(costgraph, solver="auto", ...)`: it builds the
`PlacementProblem` once (objective, pins, memory limits; cheap infeasibility checks), picks the
solver from the registry by name, runs it within the time limit, and re-checks the returned
plan with the simulator (`check`) before handing it back, so every plan a caller sees is a
valid schedule under Moirai's execution model with its makespan recomputed.

Modules, in import order (`LAYERS`; each imports only from those before it, which a test
checks): `problem` (the problem and its index view), `result` (the `moirai.placement/v1` plan),
`simulate` (the one simulator: schedule builder, list-scheduling evaluator, re-timer, checker,
period), `bounds` (lower bounds), `contract` (what every solver takes and shares), `memory`
(packings and the guard greedy placers keep memory-feasible with), `lp` (HiGHS helpers), the
heuristics (`heuristics`), `warm` (the exact solvers' default start), `local` (local search),
the exact solvers (`milp`, `cpsat`), `series` (the series decomposition between cut
vertices, solved segment by segment), `auto`, and `registry` (solvers by name); `gantt` draws a
plan.

Objectives: `latency`, the makespan of one request under the execution model, and
`throughput`, the pipelined period (`simulate.period`): the busiest device, send port or
receive port per request, where a device that pays for its transfers (a CPU by default, or the
cost graph's `transfers_occupy_device`) is also busy for every transfer into and out of it,
because a CPU stage server copies those tensors on its own cores. That key extends
`moirai.costgraph/v1`; `docs/throughput-model.md` says why and how each solver applies it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping

from moirai.costgraph import CostGraph
from moirai.errors import SolverError
from moirai.placement.bounds import lower_bound
from moirai.placement.contract import Progress, ProgressCallback, SolveOptions, Solver
from moirai.placement.problem import OBJECTIVES, Objective, PlacementProblem
from moirai.placement.registry import get_solver, register, solvers
from moirai.placement.result import Placement, ScheduledTask, ScheduledTransfer
from moirai.placement.simulate import (
    InvalidScheduleError,
    Schedule,
    check,
    list_schedule,
    period,
)

__all__ = [
    "LAYERS",
    "OBJECTIVES",
    "InvalidScheduleError",
    "Objective",
    "Placement",
    "PlacementProblem",
    "Progress",
    "ProgressCallback",
    "Schedule",
    "ScheduledTask",
    "ScheduledTransfer",
    "SolveOptions",
    "Solver",
    "check",
    "default_threads",
    "evaluate",
    "get_solver",
    "list_schedule",
    "lower_bound",
    "period",
    "register",
    "solve",
    "solve_problem",
    "solvers",
]


LAYERS = (
    "problem",
    "result",
    "simulate",
    "bounds",
    "contract",
    "memory",
    "lp",
    "heuristics",
    "warm",
    "local",
    "milp",
    "cpsat",
    "series",
    "auto",
    "registry",
    "gantt",
)


def default_threads() -> int:
    """All the cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def solve(
    costgraph: CostGraph,
    solver: str = "auto",
    objective: Objective = "latency",
    time_limit: float = 60.0,
    threads: int | None = None,
    seed: int = 0,
    pins: Mapping[str, str] | None = None,
    progress: ProgressCallback | None = None,
    memory_limits: Mapping[str, int] | None = None,
    stop: threading.Event | None = None,
) -> Placement:
    """Place `costgraph` with the named solver; the plan is checked by the simulator.

    `solver`: `auto` (default), `cpsat`, `milp` (= `milp-highs`), `milp-gurobi`, `heft`, `getf`,
    `msct`, `single`. `time_limit` bounds the whole call (seconds); `threads` defaults to every
    core this process may use; `pins` fix tasks to devices; `memory_limits` lower device
    memories (bytes); `progress` receives improving incumbents and bounds; `stop`, once set,
    ends the solve early with its best plan (`SolveOptions.stop`). Heuristics are
    deterministic; exact solvers are deterministic for a seed when they finish by proof or run
    on one thread (a multi-threaded search cut by the clock may end elsewhere).

    Raises `InfeasibleError` when no placement can satisfy memory, runnable devices and pins,
    `SolverError` for an unknown or unavailable solver.
    """
    problem = PlacementProblem(costgraph, objective, dict(pins or {}), dict(memory_limits or {}))
    options = SolveOptions(
        time_limit=time_limit,
        threads=threads or default_threads(),
        seed=seed,
        progress=progress,
        stop=stop,
    )
    return solve_problem(problem, solver, options)


def solve_problem(problem: PlacementProblem, solver: str, options: SolveOptions) -> Placement:
    """Run one registered solver on a built problem and re-check its plan."""
    started = time.monotonic()
    plan = get_solver(solver).solve(problem, options)
    try:
        plan.makespan_ms = check(problem, plan)
    except InvalidScheduleError as e:
        raise SolverError(f"solver {plan.solver!r} produced an invalid plan (a bug): {e}") from e
    if plan.period_ms is None:  # a registered solver may leave it out; check verified it if not
        plan.period_ms = period(
            problem, [problem.device_index[plan.assignment[t]] for t in problem.tasks]
        )
    plan.solve_seconds = time.monotonic() - started
    return plan


def evaluate(
    costgraph: CostGraph | PlacementProblem,
    assignment: Mapping[str, str],
    priority: list[str] | None = None,
) -> Placement:
    """A valid plan for a given assignment (list scheduling), e.g. to compare a hand placement."""
    problem = costgraph if isinstance(costgraph, PlacementProblem) else PlacementProblem(costgraph)
    started = time.monotonic()
    sched = list_schedule(problem, assignment, priority)
    return sched.to_placement(
        "evaluate", "heuristic", lower_bound(problem), time.monotonic() - started
    )
