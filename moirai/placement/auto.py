"""`auto` (the default): heuristics, series decomposition, local search, then an exact solver.

1. Run the heuristics (`heft`, `getf`, `msct`, `single`); the list schedulers take well under a
   second on thousands of tasks, and their LPs get at most `HEURISTIC_SHARE` of the limit. The
   best plan is the incumbent; if it meets the lower bound it is optimal and we stop.
2. Series decomposition (`moirai.placement.series`, latency only): when the graph has cut
   vertices (a concat closing an Inception module, the norm after a residual add, every layer
   of a chain), the segments between them are solved exactly one by one, each for the devices
   of its ends, and the cheapest chain of segments is both a plan and a lower bound; it ends
   as soon as they meet (every zoo model, usually within seconds) or after `SERIES_SHARE` of
   the time left.
3. Local search (`moirai.placement.local`: block moves evaluated by list scheduling) improves
   the incumbent for up to `LOCAL_SHARE` of the time left; it stops earlier at a local optimum.
   A better incumbent is a better hint for the exact solver's own search.
4. The exact solvers, warm-started from the incumbent: first the paper's MILP on HiGHS when
   its model is small enough (`MILP_ROWS`, and quick to build for the time it would get,
   `BUILD_S_PER_ROW`), for `MILP_SHARE` of the time left, then CP-SAT
   (interval model, no big-M) with the better plan as its hint for the rest. Neither dominates:
   the MILP's LP bound closes some zoo instances in seconds where CP-SAT's search stalls, and
   CP-SAT proves and improves instances whose MILP is hopeless (n^2 disjunctions). Both answer
   tiny instances in milliseconds, so there is no separate path for them.
5. Large instances: the CP-SAT model has one optional interval per (task, candidate device) and
   per (edge, device pair). Past `FULL_MODEL_LIMIT` intervals it is too big to search well in
   a minute on a few cores, so each task keeps only its devices within `NEAR_FASTEST` of its
   fastest time plus the devices the plans so far used for it (the incumbent stays inside the
   restricted model, so it can only improve); the bound is then the simple one. Past
   `RESTRICTED_LIMIT` intervals, or when building the model would take too much of the time
   left, no exact model is built and the local search has all the time.
6. Whatever time is left after the exact solver (it stopped early without proving optimality,
   or there was none) goes to the local search again.

It returns the best plan found with the best bound (named in the plan's `bound_from`: a simple
bound of `moirai.placement.bounds`, `series`, or an exact solver's own), the gap and a status:
`optimal` when the gap is within tolerance, `feasible` when an exact solver (or the series
decomposition) produced the plan, `heuristic` otherwise; also when the exact solver finds
nothing in time. `solver` says which step produced the plan,
e.g. `auto(cpsat)` or `auto(heft+local)`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from moirai.errors import InfeasibleError
from moirai.placement import cpsat, heuristics, milp
from moirai.placement.bounds import settle, simple_bounds, strongest
from moirai.placement.contract import SolveOptions, no_plan_message
from moirai.placement.local import improve
from moirai.placement.problem import PlacementProblem
from moirai.placement.result import Placement
from moirai.placement.series import decompose
from moirai.placement.simulate import list_schedule

EXACT_PREFERENCE = ("cpsat", "milp-highs", "series")
MILP_ROWS = 150_000
MILP_MAX_TASKS = 800
MILP_SHARE = 0.3
"""The MILP runs first, for this share of the time left, when its model has at most
`MILP_ROWS` rows: its LP bound proves some instances in seconds where CP-SAT's search stalls
(and CP-SAT proves others the MILP cannot touch)."""
FULL_MODEL_LIMIT = 12_000
RESTRICTED_LIMIT = 40_000
NEAR_FASTEST = 1.5
HEURISTIC_SHARE = 0.25
"""Share of the time limit the heuristics' LPs (GETF, m-SCT) may use before giving up their
advice; the list schedulers themselves take well under a second even on thousands of tasks."""
LOCAL_SHARE = 0.15
"""Share of the time left after the heuristics that the first local search may use."""
BUILD_S_PER_INTERVAL = 3e-4
BUILD_S_PER_ROW = 2.5e-5
BUILD_SHARE = 0.3
"""Building a model in Python takes about `BUILD_S_PER_INTERVAL` per optional interval
(CP-SAT), or `BUILD_S_PER_ROW` per row to build the MILP and load it into HiGHS, neither of
which stops at a deadline (a 94,000-row MILP: 1.3 s to build, 0.9 s in HiGHS before its time
limit is looked at, on the 2-core development machine); no exact model is built when that would
take more than `BUILD_SHARE` of the time it gets."""
SERIES_SHARE = 0.5
"""Share of the time left that the series decomposition (`moirai.placement.series`) may use;
it stops earlier once its plan is proven optimal, which on graphs with cut vertices (every zoo
model) is usually within seconds."""
RESERVE_S = 0.5
"""Seconds kept back for re-timing, checking and writing the plan."""


def interval_count(problem: PlacementProblem, allowed: Sequence[Sequence[int]]) -> int:
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


@dataclass(frozen=True)
class AutoSolver:
    name: str = "auto"
    description: str = "heuristics, local search, then CP-SAT (or the MILP), within the limit"

    def available(self) -> tuple[bool, str]:
        return True, ""

    def solve(self, problem: PlacementProblem, options: SolveOptions) -> Placement:
        started = time.monotonic()
        p = problem
        bounds = simple_bounds(p)
        lb = strongest(bounds)[1]
        deadline = options.deadline - RESERVE_S
        quiet = replace(
            options,
            progress=None,
            deadline=min(deadline, started + HEURISTIC_SHARE * options.time_limit),
        )
        plans: list[Placement] = []
        for h in heuristics.SOLVERS:
            try:
                plans.append(h.solve(p, quiet))
            except InfeasibleError:
                continue
        best = min(plans, key=lambda plan: plan.objective_ms, default=None)
        label = best.solver if best is not None else "none"
        if best is not None:
            options.report("auto", best.objective_ms, lb, f"best heuristic: {label}")
            if settle(best, lb).status == "optimal":
                return self._done(best, label, started, bounds)
        now = time.monotonic()
        series_options = replace(options, deadline=now + SERIES_SHARE * max(0.0, deadline - now))
        split = decompose(p, series_options)
        if split is not None:
            bounds["series"] = split.bound
            lb = strongest(bounds)[1]
            if split.plan is not None:
                plan = split.plan.to_placement("series", "heuristic", lb, 0.0)
                if best is None or plan.objective_ms < best.objective_ms * (1 - 1e-9):
                    best, label = plan, "series"
                    plans.append(plan)
            if best is not None:
                options.report("auto", best.objective_ms, lb, f"series: {split.segments} segments")
                if settle(best, lb).status == "optimal":
                    return self._done(best, label, started, bounds)
        if best is not None:
            best, label = self._local(p, best, label, deadline, options, started, LOCAL_SHARE)
            if settle(best, lb).status == "optimal":
                return self._done(best, label, started, bounds)
            plans.append(best)

        found = self._exact(p, best, plans, replace(options, hint=best, deadline=deadline))
        if found is not None:
            bounds[found.solver] = found.lower_bound_ms
            lb = strongest(bounds)[1]
            if best is None or found.objective_ms < best.objective_ms * (1 - 1e-9):
                best, label = found, found.solver
        if best is None:
            raise InfeasibleError(no_plan_message("auto", options))
        if settle(best, lb).status != "optimal":
            best, label = self._local(p, best, label, deadline, options, started, 1.0)
        if best.status != "optimal":
            best.status = "feasible" if label in EXACT_PREFERENCE else "heuristic"
        return self._done(best, label, started, bounds)

    @staticmethod
    def _exact(
        p: PlacementProblem, best: Placement | None, plans: list[Placement], sub: SolveOptions
    ) -> Placement | None:
        """The exact solvers' best plan (MILP first when small, then CP-SAT), or None."""
        highs = next(s for s in milp.SOLVERS if s.name == "milp-highs")
        available = {s.name for s in (highs, *cpsat.SOLVERS) if s.available()[0]}
        found: list[Placement] = []
        hint = best
        share = 1.0 if "cpsat" not in available else MILP_SHARE
        milp_s = share * sub.remaining()
        rows = milp.count_rows(p, MILP_ROWS) if p.n <= MILP_MAX_TASKS else math.inf
        small = p.objective == "throughput" or (
            rows <= MILP_ROWS and rows * BUILD_S_PER_ROW <= BUILD_SHARE * milp_s
        )
        if "milp-highs" in available and small:
            plan = highs.solve(p, replace(sub, hint=hint, deadline=time.monotonic() + milp_s))
            if plan.status == "optimal":
                return plan
            found.append(plan)
            if hint is None or plan.objective_ms < hint.objective_ms:
                hint = plan
        if "cpsat" in available and sub.remaining() > 0:
            sub = replace(sub, hint=hint)
            size = interval_count(p, p.cand)
            allowed: list[tuple[int, ...]] | None = None
            if hint is not None and size > FULL_MODEL_LIMIT:
                allowed = restrict(p, [*plans, *found])
                size = interval_count(p, allowed)
                if size > RESTRICTED_LIMIT:
                    size = math.inf
            if hint is None or size * BUILD_S_PER_INTERVAL <= BUILD_SHARE * sub.remaining():
                found.append(cpsat.solve_cpsat(p, sub, allowed=allowed))
        if not found:
            return None
        bound = max(plan.lower_bound_ms for plan in found)
        plan = min(found, key=lambda plan: plan.objective_ms)
        plan.lower_bound_ms = bound
        return plan

    @staticmethod
    def _local(
        p: PlacementProblem,
        plan: Placement,
        label: str,
        deadline: float,
        options: SolveOptions,
        started: float,
        share: float,
    ) -> tuple[Placement, str]:
        """Local search from `plan` for `share` of the time left; the better plan and label."""
        now = time.monotonic()
        if now >= deadline:
            return plan, label
        assign = [p.device_index[plan.assignment[t]] for t in p.tasks]
        better, value = improve(p, assign, now + share * (deadline - now), options.seed)
        if value >= plan.objective_ms * (1 - 1e-9):
            return plan, label
        new = list_schedule(p, better).to_placement("local", "heuristic", 0.0, 0.0)
        label = label if label.endswith("+local") else f"{label}+local"
        options.report("auto", new.objective_ms, None, f"local search: {label}")
        return new, label

    def _done(
        self, plan: Placement, label: str, started: float, bounds: dict[str, float]
    ) -> Placement:
        source, bound = strongest(bounds)
        settle(plan, bound, source)
        plan.solver = f"auto({label})"
        plan.solve_seconds = time.monotonic() - started
        return plan


SOLVERS = (AutoSolver(),)
