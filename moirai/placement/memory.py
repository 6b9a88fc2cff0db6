"""Memory feasibility for greedy placers: a packing of the tasks, and the guard that keeps one.

A list scheduler places tasks one at a time; on a memory-tight instance an early choice can
leave a later task with no device that has room. `MemoryGuard` prevents that: it holds a
*witness*, an assignment of the tasks not yet placed that fits in the memory left, and allows
placing task i on device k only when some witness still exists afterwards. Since the witness's
own device for i is always allowed, a greedy placer guarded by it always completes.

The first witness is a packing of every task: first-fit decreasing, and when that fails (it is a
heuristic), the exact packing problem (a generalized assignment: each task to one candidate
device, per-device capacity) on CP-SAT within the deadline. CP-SAT proves infeasibility too, so
a heuristic says "no plan" only when there is none, or when the deadline passed first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from moirai.errors import InfeasibleError, StoppedError
from moirai.placement.contract import interruptible, seconds_left, stopped
from moirai.placement.problem import PlacementProblem, gib

PACKING_MIN_S = 0.5
"""Time the exact packing gets even when the caller's deadline has (nearly) passed: a
heuristic should answer rather than give up on a tight instance after a slow LP."""


def first_fit_decreasing(
    problem: PlacementProblem, tasks: Sequence[int], free: Sequence[int]
) -> list[int] | None:
    """A memory-feasible assignment of `tasks` into `free` bytes per device, or None.

    Largest task first, each to the candidate device with the most free memory (worst fit, which
    keeps room spread out for later choices). Entries of tasks not listed are -1.
    """
    free = list(free)
    out = [-1] * problem.n
    for i in sorted(tasks, key=lambda i: (-problem.mem[i], i)):
        best = -1
        for k in problem.cand[i]:
            if free[k] >= problem.mem[i] and (best < 0 or free[k] > free[best]):
                best = k
        if best < 0:
            return None
        free[best] -= problem.mem[i]
        out[i] = best
    return out


def assignment_vars(
    model: Any, problem: PlacementProblem, cands: Sequence[Sequence[int]]
) -> list[dict[int, Any]]:
    """In CP-SAT `model`, one Boolean per task and candidate device (`cands[i]`), exactly one
    true per task, and each device's tasks within its memory: the assignment part that the
    packing and the CP-SAT solver share."""
    p = problem
    x = [{k: model.NewBoolVar(f"x{i}_{k}") for k in cands[i]} for i in range(p.n)]
    for i in range(p.n):
        model.AddExactlyOne(x[i].values())
    for k in range(p.num_devices):
        items = [(p.mem[i], x[i][k]) for i in range(p.n) if k in x[i] and p.mem[i] > 0]
        if sum(w for w, _ in items) > p.cap[k]:
            model.Add(sum(w * v for w, v in items) <= p.cap[k])
    return x


def exact_packing(problem: PlacementProblem, deadline: float = math.inf) -> list[int] | None:
    """A memory-feasible assignment of every task by CP-SAT, or None when time runs out (or
    the solve was stopped).

    Raises `InfeasibleError` when CP-SAT proves that none exists.
    """
    from ortools.sat.python import cp_model

    p = problem
    m = cp_model.CpModel()
    x = assignment_vars(m, p, p.cand)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(PACKING_MIN_S, seconds_left(deadline))
    solver.parameters.num_workers = 1
    solver.parameters.catch_sigint_signal = False
    status = interruptible(lambda: solver.Solve(m), solver.StopSearch)
    if status == cp_model.INFEASIBLE:
        raise InfeasibleError(
            f"no placement fits the device memories (proven): {gib(sum(p.mem))} of tasks on "
            f"{gib(sum(p.cap))} of devices cannot be shared out"
        )
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None
    return [next(k for k, v in x[i].items() if solver.Value(v)) for i in range(p.n)]


def packing(problem: PlacementProblem, deadline: float = math.inf) -> list[int]:
    """A memory-feasible assignment of every task (first-fit decreasing, else exact).

    Raises `InfeasibleError` when there is none, or none was found by the deadline, and
    `StoppedError` when the solve was stopped first.
    """
    witness = first_fit_decreasing(problem, range(problem.n), problem.cap)
    if witness is None:
        witness = exact_packing(problem, deadline)
    if witness is None and stopped():
        raise StoppedError("stopped before it found a placement that fits the device memories")
    if witness is None:
        raise InfeasibleError(
            "found no placement that fits the device memories in time "
            f"({gib(sum(problem.mem))} of tasks on {gib(sum(problem.cap))} of devices; not "
            "proven impossible): raise --time-limit or try --solver cpsat"
        )
    return witness


class MemoryGuard:
    """Keeps a greedy placement memory-feasible for the tasks it has not placed yet.

    `allowed(i, k)` answers from the current witness when moving i to k keeps it fitting
    (O(1)); otherwise it tries first-fit decreasing for the other unplaced tasks with i on k,
    adopts that witness when it fits, and answers False when it does not. Every True answer
    keeps its proof (the witness it was checked against), and `place(i, k)` adopts the proof of
    that very answer: a placer may ask about several moves before it commits one, and a later
    question may replace the witness that justified an earlier answer.
    """

    def __init__(self, problem: PlacementProblem, deadline: float = math.inf) -> None:
        self.problem = problem
        self.free = list(problem.cap)
        self.unplaced = set(range(problem.n))
        self._proofs: dict[tuple[int, int], list[int]] = {}
        self._set_witness(packing(problem, deadline))

    def _set_witness(self, witness: list[int]) -> None:
        self.witness = witness
        self.load = [0] * self.problem.num_devices
        for i in self.unplaced:
            self.load[witness[i]] += self.problem.mem[i]

    def _fits(self, i: int, k: int) -> bool:
        """Whether the current witness, with i moved to k, fits the memory left."""
        m = self.problem.mem[i]
        reserved = self.load[k] - (m if self.witness[i] == k else 0)
        return self.free[k] - m >= reserved

    def allowed(self, i: int, k: int) -> bool:
        p = self.problem
        if p.mem[i] > self.free[k]:
            return False
        if not self._fits(i, k):
            free = list(self.free)
            free[k] -= p.mem[i]
            witness = first_fit_decreasing(p, [j for j in self.unplaced if j != i], free)
            if witness is None:
                return False
            witness[i] = k
            self._set_witness(witness)
        self._proofs[i, k] = self.witness
        return True

    def place(self, i: int, k: int) -> None:
        """Commit task i to device k; `allowed(i, k)` must have said True since the last place."""
        proof = self._proofs.get((i, k))
        if proof is None:
            raise RuntimeError(f"MemoryGuard.place({i}, {k}) without allowed() (a bug)")
        if proof is not self.witness:
            self._set_witness(proof)
        self._proofs.clear()  # no answer outlives a placement (and no proof shares the list)
        m = self.problem.mem[i]
        self.free[k] -= m
        self.load[self.witness[i]] -= m
        self.unplaced.discard(i)
        self.witness[i] = k
