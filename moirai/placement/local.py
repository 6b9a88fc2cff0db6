"""Local search over assignments, evaluated by the simulator's list scheduling.

Given an assignment, list scheduling (`simulate.list_schedule`) gives a good schedule in a few
milliseconds even for hundreds of tasks, so a search over assignments alone is cheap and
general. A move takes a *block* — a task and up to 2^m of the tasks that follow it on the same
device, in topological order (a branch, a chain, a layer) — to another device. Moving single
tasks rarely helps: it creates two transfers; moving a block pays for its transfers once. Moves
are tried on the most critical tasks first (largest start + upward rank under the current
assignment, which is the makespan exactly on the critical path; for the period, the tasks on
the busiest device, by `simulate.loads`), first improvement, in a seeded random order within
equal criticality, until no move improves or the deadline passes. Memory and candidate
devices are respected.

`auto` runs it before the exact solver (a better hint for CP-SAT's search) and after it, and it
is all `auto` can do on graphs too large for an exact model.
"""

from __future__ import annotations

import random
import time

from moirai.placement.problem import PlacementProblem
from moirai.placement.simulate import Schedule, list_schedule, loads, period, upward_rank

MAX_BLOCK = 64


def _blocks(problem: PlacementProblem, assign: list[int], i: int) -> list[list[int]]:
    """Task i alone, then growing sets of its same-device successors (BFS in topo order)."""
    p = problem
    k = assign[i]
    block = [i]
    seen = {i}
    frontier = 0
    while frontier < len(block) and len(block) < MAX_BLOCK:
        for e in p.out_edges[block[frontier]]:
            j = p.edges[e][1]
            if j not in seen and assign[j] == k:
                seen.add(j)
                block.append(j)
        frontier += 1
    sizes = [1]
    while sizes[-1] * 2 < len(block):
        sizes.append(sizes[-1] * 2)
    if len(block) > 1:
        sizes.append(len(block))
    return [block[:size] for size in sizes]


def _order(
    problem: PlacementProblem, assign: list[int], sched: Schedule | None, rng: random.Random
) -> list[int]:
    p = problem
    noise = [rng.random() for _ in range(p.n)]
    if sched is None:  # throughput: tasks of the busiest device first
        load = loads(p, assign)
        return sorted(range(p.n), key=lambda i: (-load[assign[i]], noise[i]))
    rank = upward_rank(p, assign)
    return sorted(range(p.n), key=lambda i: (-(sched.start[i] + rank[i]), noise[i]))


def improve(
    problem: PlacementProblem, assignment: list[int], deadline: float, seed: int = 0
) -> tuple[list[int], float]:
    """A better (or the same) assignment and its objective value, by block moves."""
    p = problem
    rng = random.Random(seed)
    assign = list(assignment)
    used = [0] * p.num_devices
    for i, k in enumerate(assign):
        used[k] += p.mem[i]
    latency = p.objective == "latency"

    def evaluate(a: list[int]) -> tuple[float, Schedule | None]:
        if latency:
            s = list_schedule(p, a)
            return s.makespan, s
        return period(p, a), None

    best, sched = evaluate(assign)
    improved = True
    while improved and time.monotonic() < deadline:
        improved = False
        for i in _order(p, assign, sched, rng):
            if improved or time.monotonic() >= deadline:
                break
            for block in _blocks(p, assign, i):
                if improved or time.monotonic() >= deadline:
                    break
                home = assign[i]
                mem = sum(p.mem[j] for j in block)
                targets = [
                    k
                    for k in range(p.num_devices)
                    if k != home
                    and used[k] + mem <= p.cap[k]
                    and all(k in p.cand[j] for j in block)
                ]
                rng.shuffle(targets)
                for k in targets:
                    for j in block:
                        assign[j] = k
                    value, s = evaluate(assign)
                    if value < best * (1 - 1e-9):
                        best, sched = value, s
                        used[home] -= mem
                        used[k] += mem
                        improved = True
                        break
                    for j in block:
                        assign[j] = home
    return assign, best
