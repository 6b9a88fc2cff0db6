"""The exact solvers' default start, from the heuristics that need no LP."""

from __future__ import annotations

import math

from moirai.errors import InfeasibleError
from moirai.placement.bounds import lower_bound
from moirai.placement.heuristics import heft, plain_etf, single
from moirai.placement.problem import PlacementProblem
from moirai.placement.result import Placement


def warm_start(problem: PlacementProblem, deadline: float = math.inf) -> Placement | None:
    """The exact solvers' default start: the best plan of the heuristics that need no LP — HEFT,
    ETF (GETF and m-SCT without their LPs' advice) and the best single device; None when none
    of them fits memory."""
    lb = lower_bound(problem)
    plans = []
    for name, build in (("heft", heft), ("etf", plain_etf), ("single", single)):
        try:
            plans.append(build(problem, deadline).to_placement(name, "heuristic", lb, 0.0))
        except InfeasibleError:
            continue
    return min(plans, key=lambda plan: plan.objective_ms, default=None)
