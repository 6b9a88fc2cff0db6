"""Lower bounds on the objective, valid for every placement of a problem.

- Critical path: the longest path through the DAG with every task at its fastest candidate
  device and no transfers (no plan can beat the chain of its dependencies).
- Device-aware critical path (stronger): `head[i][k]`, the earliest task i can start on device
  k, is at least, for every predecessor j, the least over j's devices a of
  `head[j][a] + p[j][a] + transfer(a -> k)` (zero when a == k); `tail[i][k]`, the least time
  from i's start on k to the end, is symmetric. Any plan puts j on some device a* and its real
  times dominate these by induction, so `min_k head[i][k] + tail[i][k]` bounds the makespan for
  every task i. It sees that leaving a fast device costs a transfer, which the plain bound does
  not.
- Sequenced critical path (stronger still): the same with heads and tails that also count a
  task's predecessors together (`heads_tails`): those on its device run there one at a time,
  and the others' tensors pass its device's receive port one at a time, so for each split of
  the predecessors between the device and elsewhere the task waits for two single-machine
  schedules, and its head is the least over the splits (successors and the send port alike for
  tails). On the benchmark's random DAGs, whose tasks join two or three branches, it raises
  the device-aware bound by up to 13%. The LP bounds and the exact models use these heads
  and tails too (as conditional release times and tails).
- Total work: every task takes at least its fastest time somewhere, and the devices can share
  it at best perfectly, so the sum of fastest times over the number of devices.

All hold for the makespan; for the pipelined period (throughput) the work bound holds as well,
and so does the slowest single task at its fastest (transfers, on ports or on the devices that
pay for them, only add to the loads). Exact solvers report their own proven bound, and so does
the series decomposition (`moirai.placement.series`); `auto` takes the best and names it in the
plan (`bound_from`). Pins and memory restrict candidates, so the bounds use the
candidate devices of each task, not all devices. The LP bounds, which need HiGHS, live in
`moirai.placement.lp`: `windowed_load` (fractional loads in time windows) and `path_lp`
(assignment, start times, transfers and ports in one LP).
"""

from __future__ import annotations

import weakref
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


NEIGHBOURS = 8
"""`heads_tails` sequences at most this many predecessors (successors) of a task, those that
weigh most; the others count one at a time (2^8 subsets per task and device)."""


HeadsTails = tuple[list[dict[int, float]], list[dict[int, float]]]
_KNOWN: dict[tuple[int, bool], HeadsTails] = {}
"""`heads_tails` per live problem (by id, dropped with the problem): the sequenced heads take
most of a second on 1,500 tasks and 8 devices, and the simple bounds, both LP bounds and the
exact models each ask for them."""


def heads_tails(problem: PlacementProblem, sequenced: bool = True) -> HeadsTails:
    """`head[i][k]` and `tail[i][k]` (tail includes i's own time on k), for k in `cand[i]`;
    computed once per problem and shared, so callers must not change them.

    Plain (`sequenced=False`): each predecessor j of i on k counts alone, at the least over
    j's devices a of `head[j][a] + p[j][a] + transfer(a -> k)`. Sequenced (the default), the
    predecessors also count together: those on k run on k one at a time, and those elsewhere
    send their tensors through k's receive port one at a time; so for each split of the
    predecessors into the ones on k and the others, i waits for both single-machine
    schedules (in order of release: `_release_order`), and the head is the least over the
    splits. Tails are symmetric (successors on k after i, one at a time; transfers out of
    k's send port one at a time). Every plan's times dominate these, by induction in
    topological order, so they stay valid heads and tails.
    """
    key = (id(problem), sequenced)
    known = _KNOWN.get(key)
    if known is None:
        known = _KNOWN[key] = _heads_tails(problem, sequenced)
        weakref.finalize(problem, _KNOWN.pop, key, None)
    return known


def _heads_tails(p: PlacementProblem, sequenced: bool) -> HeadsTails:
    send, recv = p.send_work, p.recv_work
    head: list[dict[int, float]] = [{} for _ in range(p.n)]
    for i in range(p.n):
        for k in p.cand[i]:
            waits = []
            for e in p.in_edges[i]:
                j = p.edges[e][0]
                others = [a for a in p.cand[j] if a != k]
                on = (head[j][k], p.compute[j][k]) if k in p.cand[j] else None
                off = (
                    (
                        min(head[j][a] + p.compute[j][a] for a in others),
                        min(p.transfer[e][a][k] for a in others),
                        min(head[j][a] + p.compute[j][a] + p.transfer[e][a][k] for a in others),
                        # k's share of the hop: from the transfer's end less that share on
                        min(
                            head[j][a] + p.compute[j][a] + p.transfer[e][a][k] - recv[e][a][k]
                            for a in others
                        ),
                        min(recv[e][a][k] for a in others),
                    )
                    if others
                    else None
                )
                waits.append((on, off))
            head[i][k] = _least_wait(waits, sequenced)
    tail: list[dict[int, float]] = [{} for _ in range(p.n)]
    for i in reversed(range(p.n)):
        for k in p.cand[i]:
            waits = []
            for e in p.out_edges[i]:
                j = p.edges[e][1]
                others = [b for b in p.cand[j] if b != k]
                on = (tail[j][k] - p.compute[j][k], p.compute[j][k]) if k in p.cand[j] else None
                off = (
                    (
                        min(tail[j][b] for b in others),
                        min(p.transfer[e][k][b] for b in others),
                        min(p.transfer[e][k][b] + tail[j][b] for b in others),
                        # k's share of the hop: from the transfer's start, then the rest
                        min(p.transfer[e][k][b] - send[e][k][b] + tail[j][b] for b in others),
                        min(send[e][k][b] for b in others),
                    )
                    if others
                    else None
                )
                waits.append((on, off))
            tail[i][k] = p.compute[i][k] + _least_wait(waits, sequenced)
    return head, tail


Wait = tuple[tuple[float, float] | None, tuple[float, float, float, float, float] | None]
"""A neighbour of a task on a device: `(release, duration)` on that device, or None when it
cannot go there; and elsewhere `(release, transfer, total, hop release, hop)`: the least
release there, the least transfer to (from) the device, the least of release plus transfer,
and the device's own share of the hop (`problem.hop_work`) as a job on the device: its least
release and least duration (0 where the device does no hop work); None when it can go nowhere
else. For tails, releases read as times after (`_release_order`)."""


def _least_wait(waits: list[Wait], sequenced: bool) -> float:
    """The least time a task waits for its neighbours (`Wait`) over the ways to split them
    between its device and the others: with `sequenced`, those on the device run one at a
    time, and the transfers of the others pass one port one at a time."""
    inf = float("inf")

    def alone(w: Wait) -> float:
        on, off = w
        return min(on[0] + on[1] if on else inf, off[2] if off else inf)

    least = max((alone(w) for w in waits), default=0.0)
    if not sequenced or len(waits) < 2:
        return least
    heavy = sorted(waits, key=alone, reverse=True)[:NEIGHBOURS]
    best = inf
    for mask in range(1 << len(heavy)):
        here: list[tuple[float, float]] = []
        port: list[tuple[float, float]] = []
        value = 0.0
        for b, (on, off) in enumerate(heavy):
            if mask >> b & 1:
                if on is None:
                    value = inf
                    break
                here.append(on)
            else:
                if off is None:
                    value = inf
                    break
                port.append(off[:2])
                value = max(value, off[2])
                if off[4] > 0:
                    here.append(off[3:])
        if value >= best:
            continue
        value = max(value, _release_order(here), _release_order(port))
        best = min(best, value)
    return max(least, best)


def _release_order(jobs: list[tuple[float, float]]) -> float:
    """The least time one machine needs to finish `jobs` (release, duration), run one at a
    time: in order of release. By symmetry it is also the least time from the start to the
    end when the jobs start together and each has a time after it (the release read as that
    time after: `max over subsets of min release + sum of durations` either way)."""
    t = 0.0
    for release, duration in sorted(jobs):
        t = max(t, release) + duration
    return t


def device_critical_path(problem: PlacementProblem, sequenced: bool = False) -> float:
    head, tail = heads_tails(problem, sequenced)
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
        "sequenced critical path": device_critical_path(problem, sequenced=True),
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
