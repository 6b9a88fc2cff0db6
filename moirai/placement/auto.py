"""`auto` (the default): heuristics first, then the best exact solver in the time left.

1. Run the heuristics (`heft`, `getf`, `msct`, `single`); each takes well under a second on
   models of thousands of tasks. The best plan is the incumbent; if it meets the lower bound it
   is optimal and we stop.
2. Improve it with the exact solver that is available, warm-started from the incumbent:
   CP-SAT (interval model, usually far stronger on scheduling than a big-M MILP), else the MILP
   on HiGHS. CP-SAT also answers tiny instances in milliseconds, so there is no separate path
   for them.
3. Large instances: the CP-SAT model has one optional interval per (task, candidate device) and
   per (edge, device pair). Past `FULL_MODEL_LIMIT` intervals it is too big to search well in
   a minute on a few cores, so each task keeps only its devices within `NEAR_FASTEST` of its
   fastest time plus the devices the heuristics' plans used for it (the incumbent stays inside
   the restricted model, so it can only improve). The bound then stays the simple one. Past
   `RESTRICTED_LIMIT` intervals even that is skipped, and a local search over assignments
   (list-scheduling evaluator) uses the time instead.
4. Return the best plan found, the best bound, the gap and a status: `optimal` when the gap is
   within tolerance, `feasible` when an exact solver improved on the heuristics, `heuristic`
   otherwise; also when the exact solver finds nothing in time.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, replace

from moirai.errors import InfeasibleError
from moirai.placement.bounds import lower_bound, settle
from moirai.placement.problem import PlacementProblem
from moirai.placement.registry import SolveOptions, no_plan_message
from moirai.placement.result import Placement
from moirai.placement.simulate import list_schedule, period

EXACT_PREFERENCE = ("cpsat", "milp-highs")
FULL_MODEL_LIMIT = 12_000
RESTRICTED_LIMIT = 40_000
NEAR_FASTEST = 1.5
HEURISTIC_SHARE = 0.25
"""Share of the time limit the heuristics' LPs (GETF, m-SCT) may use before giving up their
advice; the list schedulers themselves take well under a second even on thousands of tasks."""
RESERVE_S = 0.5
"""Seconds kept back from the exact solver for re-timing, checking and writing the plan."""


def interval_count(problem: PlacementProblem, allowed: list[tuple[int, ...]]) -> int:
    p = problem
    count = sum(len(a) for a in allowed)
    for i, j in p.edges:
        count += len(allowed[i]) * len(allowed[j]) - len(set(allowed[i]) & set(allowed[j]))
    return count


def restrict(problem: PlacementProblem, plans: list[Placement]) -> list[tuple[int, ...]]:
    """Devices kept per task for large instances: near its fastest, or used by a plan."""
    p = problem
    used = [{p.device_index[plan.assignment[t]] for plan in plans} for t in p.tasks]
    return [
        tuple(
            k
            for k in p.cand[i]
            if p.compute[i][k] <= NEAR_FASTEST * p.min_compute[i] or k in used[i]
        )
        for i in range(p.n)
    ]


def local_search(
    problem: PlacementProblem, plan: Placement, deadline: float, seed: int
) -> Placement | None:
    """Move single tasks to other devices while that shortens the objective.

    Candidates come from the current critical path first (moving anything else cannot shorten
    the makespan); each move is evaluated by list scheduling and kept if it improves. Ends at
    the deadline or when no single move helps. Returns a better plan or None.
    """
    p = problem
    rng = random.Random(seed)
    assign = [p.device_index[plan.assignment[t]] for t in p.tasks]
    used = [0] * p.num_devices
    for i, k in enumerate(assign):
        used[k] += p.mem[i]

    def value(a: list[int]) -> float:
        if p.objective == "throughput":
            return period(p, a)
        return list_schedule(p, a).makespan

    best = value(assign)
    start_value = best
    improved = True
    while improved and time.monotonic() < deadline:
        improved = False
        order = list(range(p.n))
        rng.shuffle(order)
        for i in order:
            if time.monotonic() >= deadline:
                break
            for k in p.cand[i]:
                if k == assign[i] or used[k] + p.mem[i] > p.cap[k]:
                    continue
                old = assign[i]
                assign[i] = k
                v = value(assign)
                if v < best * (1 - 1e-9):
                    best = v
                    used[old] -= p.mem[i]
                    used[k] += p.mem[i]
                    improved = True
                    break
                assign[i] = old
    if best >= start_value * (1 - 1e-9):
        return None
    return list_schedule(p, assign).to_placement("local-search", "heuristic", 0.0, 0.0)


@dataclass(frozen=True)
class AutoSolver:
    name: str = "auto"
    description: str = "heuristics, then CP-SAT (or the MILP) warm-started, within the limit"

    def available(self) -> tuple[bool, str]:
        return True, ""

    def solve(self, problem: PlacementProblem, options: SolveOptions) -> Placement:
        from moirai.placement.heuristics import SOLVERS as HEURISTICS
        from moirai.placement.registry import get_solver, solvers

        started = time.monotonic()
        p = problem
        lb = lower_bound(p)
        quiet = replace(
            options,
            progress=None,
            deadline=min(options.deadline, started + HEURISTIC_SHARE * options.time_limit),
        )
        plans: list[Placement] = []
        for h in HEURISTICS:
            try:
                plans.append(h.solve(p, quiet))
            except InfeasibleError:
                continue
        best = min(plans, key=lambda plan: plan.objective_ms, default=None)
        if best is not None:
            options.report("auto", started, best.objective_ms, lb, f"best heuristic: {best.solver}")
            if settle(best, lb).status == "optimal":
                return self._done(best, best.solver, started)

        registered = {s.name: s for s in solvers()}
        exact = next(
            (n for n in EXACT_PREFERENCE if n in registered and registered[n].available()[0]),
            None,
        )
        label = best.solver if best is not None else "none"
        deadline = options.deadline - RESERVE_S
        if exact is not None and deadline > time.monotonic():
            sub = replace(options, hint=best, deadline=deadline)
            allowed = [p.cand[i] for i in range(p.n)]
            size = interval_count(p, allowed)
            if exact == "cpsat" and best is not None and size > FULL_MODEL_LIMIT:
                allowed = restrict(p, plans)
                size = interval_count(p, allowed)
                if size <= RESTRICTED_LIMIT:
                    from moirai.placement.cpsat import solve_cpsat

                    found = solve_cpsat(p, sub, allowed=allowed)
                else:
                    found = None
            else:
                found = get_solver(exact).solve(p, sub)
            if found is not None and (best is None or found.objective_ms < best.objective_ms):
                best, label = found, exact
            if found is not None:
                lb = max(lb, found.lower_bound_ms)
        if best is None:
            raise InfeasibleError(no_plan_message("auto", options))
        if best.status != "optimal" and time.monotonic() < deadline:
            improved = local_search(p, best, deadline, options.seed)
            if improved is not None:
                best, label = improved, f"{label}+local-search"
        best.status = "feasible" if label in ("cpsat", "milp-highs") else "heuristic"
        settle(best, lb)
        return self._done(best, label, started)

    def _done(self, plan: Placement, label: str, started: float) -> Placement:
        plan.solver = f"auto({label})"
        plan.solve_seconds = time.monotonic() - started
        return plan


SOLVERS = (AutoSolver(),)
