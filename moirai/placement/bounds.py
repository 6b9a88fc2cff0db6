"""Lower bounds on the objective, valid for every placement of a problem.

- Critical path: the longest path through the DAG with every task at its fastest candidate
  device and no transfers (no plan can beat the chain of its dependencies).
- Device-aware critical path (stronger): `head[i][k]`, the earliest task i can start on device
  k, is at least, for every predecessor j, the least over j's devices a of
  `head[j][a] + p[j][a] + transfer(a -> k)` (zero when a == k); `tail[i][k]`, the least time
  from i's start on k to the end, is symmetric. Any plan puts j on some device a* and its real
  times dominate these by induction, so `min_k head[i][k] + tail[i][k]` bounds the makespan for
  every task i. It sees that leaving a fast device costs a transfer, which the plain bound does
  not. The exact models use `head`/`tail` too, as conditional release times and tails.
- Total work: every task takes at least its fastest time somewhere, and the devices can share
  it at best perfectly, so the sum of fastest times over the number of devices.

Both hold for the makespan; for the pipelined period (throughput) the work bound holds as well,
and so does the slowest single task at its fastest (transfers, on ports or on the devices that
pay for them, only add to the loads). Exact solvers report their own proven bound, and so does
the series decomposition (`moirai.placement.series`); `auto` takes the best and names it in the
plan (`bound_from`). Pins and memory restrict candidates, so the bounds use the
candidate devices of each task, not all devices. The LP bounds, which need HiGHS, live in
`moirai.placement.lp`: `windowed_load` (fractional loads in time windows) and `path_lp`
(assignment, start times, transfers and ports in one LP).
"""

from __future__ import annotations

from collections.abc import Mapping

from moirai.placement.problem import PlacementProblem
from moirai.placement.result import Placement

OPTIMALITY_TOL = 1e-4
"""Relative gap under which a plan counts as `optimal`: exact solvers stop at a relative gap of
1e-6 and CP-SAT's integer time rounds durations, so an exact zero is rare even when proven."""


def critical_path(problem: PlacementProblem) -> float:
    p = problem
    finish = [0.0] * p.n
    for i in range(p.n):  # tasks are in topological order
        ready = max((finish[p.edges[e][0]] for e in p.in_edges[i]), default=0.0)
        finish[i] = ready + p.min_compute[i]
    return max(finish, default=0.0)


def heads_tails(problem: PlacementProblem) -> tuple[list[dict[int, float]], list[dict[int, float]]]:
    """`head[i][k]` and `tail[i][k]` (tail includes i's own time on k), for k in `cand[i]`."""
    p = problem
    head: list[dict[int, float]] = [{} for _ in range(p.n)]
    for i in range(p.n):
        for k in p.cand[i]:
            h = 0.0
            for e in p.in_edges[i]:
                j = p.edges[e][0]
                h = max(
                    h,
                    min(head[j][a] + p.compute[j][a] + p.transfer[e][a][k] for a in p.cand[j]),
                )
            head[i][k] = h
    tail: list[dict[int, float]] = [{} for _ in range(p.n)]
    for i in reversed(range(p.n)):
        for k in p.cand[i]:
            t = 0.0
            for e in p.out_edges[i]:
                j = p.edges[e][1]
                t = max(t, min(p.transfer[e][k][b] + tail[j][b] for b in p.cand[j]))
            tail[i][k] = p.compute[i][k] + t
    return head, tail


def device_critical_path(problem: PlacementProblem) -> float:
    head, tail = heads_tails(problem)
    return max(
        (min(head[i][k] + tail[i][k] for k in problem.cand[i]) for i in range(problem.n)),
        default=0.0,
    )


def total_work(problem: PlacementProblem) -> float:
    return sum(problem.min_compute) / problem.num_devices


def serial_horizon(problem: PlacementProblem) -> float:
    """An upper bound on the optimum: every task at its slowest candidate and every transfer at
    its slowest pair, one after another (a valid schedule whatever the assignment)."""
    p = problem
    tasks = sum(max(p.compute[i][k] for k in p.cand[i]) for i in range(p.n))
    return tasks + sum(max(max(row) for row in t) for t in p.transfer)


def simple_bounds(problem: PlacementProblem) -> dict[str, float]:
    """The simple bounds for the problem's objective, by name (as plans report them)."""
    if problem.objective == "throughput":
        return {
            "work": total_work(problem),
            "slowest task": max(problem.min_compute, default=0.0),
        }
    return {
        "critical path": critical_path(problem),
        "device critical path": device_critical_path(problem),
        "work": total_work(problem),
    }


def strongest(bounds: Mapping[str, float]) -> tuple[str, float]:
    """The binding bound: the largest, the first named on a tie."""
    name = max(bounds, key=lambda k: bounds[k], default="none")
    return name, bounds.get(name, 0.0)


def lower_bound(problem: PlacementProblem) -> float:
    """The best of the simple bounds for the problem's objective."""
    return strongest(simple_bounds(problem))[1]


def settle(plan: Placement, bound: float, source: str | None = None) -> Placement:
    """Record `bound` in `plan` (never above its objective) and mark it `optimal` when the gap
    is within `OPTIMALITY_TOL`; otherwise its status is left as the solver set it. `source`
    names the bound (`bound_from` in the plan: a simple bound, `series`, or a solver's own)."""
    plan.lower_bound_ms = min(bound, plan.objective_ms)
    if source is not None:
        plan.extra["bound_from"] = source
    if plan.objective_ms <= bound * (1 + OPTIMALITY_TOL) + 1e-12:
        plan.status = "optimal"
    return plan
