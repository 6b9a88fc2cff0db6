"""Local search over assignments, evaluated by the simulator's list scheduling.

Given an assignment, list scheduling (`simulate.list_schedule`) gives a good schedule in a few
milliseconds even for hundreds of tasks, so a search over assignments alone is cheap and
general. A move takes a *block* — a task and up to 2^m of the tasks that follow it on the same
device, in topological order (a branch, a chain, a layer) — to another device. Moving single
tasks rarely helps: it creates two transfers; moving a block pays for its transfers once. Moves
are tried on the most critical tasks first (largest start + upward rank under the current
assignment, which is the makespan exactly on the critical path; for the period, the tasks on
the busiest device, by `simulate.loads`), first improvement, in a seeded random order within
equal criticality, until no move improves. A pass of the descent tries each task once: after a
move the order is computed again, but the tasks the pass has tried are not tried again until
the next pass (rescanning from the most critical task spent most of the work on moves that had
just failed; on the random DAGs of `bench/placement.py` this alone took random-3 from 9.21 to
8.5 ms in 10 s of search). Memory and candidate devices are respected.

At such a local optimum the search *kicks* (iterated local search): a few random critical
blocks go to random other devices whatever it costs, the descent runs again from there, and the
result replaces the best only when it is better; otherwise the next kick starts from the best.

A move is evaluated by replaying the accepted schedule's order of operations with the block
on its new device (`simulate.Replay`): the operations before the first one the move touches
stay where they were, only the rest are placed again, and the replay stops as soon as an
operation's end plus its longest path to the end shows that the move cannot beat the current
makespan. Most moves lose, and most lose early, so a move costs about 1.5 ms on 600 tasks (a
full list schedule and replay cost about 10 ms). A winning move is list scheduled as well, and
the better schedule is kept.

The search counts its evaluations and stops after `max_evaluations` (its work limit: the same
count gives the same result on any machine) or at the deadline, whichever comes first.
`LocalSearch` goes on where it stopped when run again (its pass, the tasks tried, whether it
stands at a local optimum), so the turns `auto` gives it in its race add up to one search
instead of each turn starting a descent anew; `improve` is one run of it.

`auto` runs it before the exact solver (a better hint for CP-SAT's search) and after it, and it
is all `auto` can do on graphs too large for an exact model.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from moirai.placement.bounds import OPTIMALITY_TOL
from moirai.placement.contract import passed
from moirai.placement.problem import PlacementProblem
from moirai.placement.result import Placement
from moirai.placement.simulate import (
    Replay,
    Schedule,
    list_schedule,
    loads,
    period,
    retime,
    upward_rank,
)

MAX_BLOCK = 64
KICK_BLOCKS = 3
"""At most this many blocks move in one kick."""


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


@dataclass
class _Pass:
    """A descent's pass: the tasks by criticality, the next to try, those tried, and whether
    a move was made."""

    order: list[int]
    next: int = 0
    tried: set[int] = field(default_factory=set)
    improved: bool = False


class _Search:
    """The state of one search: the current assignment, its value, the work done."""

    def __init__(
        self,
        problem: PlacementProblem,
        assignment: Sequence[int],
        deadline: float,
        max_evaluations: float,
        rng: random.Random,
        start: Timing | None = None,
    ) -> None:
        self.p = problem
        self.timing = start
        self.deadline = deadline
        self.max_evaluations = max_evaluations
        self.rng = rng
        self.evaluations = 0
        self.replay: Replay | None = None
        self.pass_: _Pass | None = None
        """The descent's pass under way, if the work ran out in it."""
        self.assign = list(assignment)
        self.used = [0] * problem.num_devices
        for i, k in enumerate(self.assign):
            self.used[k] += problem.mem[i]
        self.accept(*self.evaluate())

    def out_of_work(self) -> bool:
        return self.evaluations >= self.max_evaluations or passed(self.deadline)

    def evaluate(self) -> tuple[float, Schedule | None]:
        """The objective of the current assignment. For the makespan, the better of two
        schedules: list scheduling by upward rank, and the last accepted schedule replayed
        (`simulate.retime`) with the moved tasks where they now belong, which keeps a good
        schedule's order of operations (HEFT's or CP-SAT's) through a move."""
        self.evaluations += 1
        if self.p.objective != "latency":
            return period(self.p, self.assign), None
        s = list_schedule(self.p, self.assign)
        if self.timing is not None:
            starts, transfers = self.timing
            kept = retime(self.p, self.assign, starts, transfers)
            if kept.makespan < s.makespan:
                s = kept
        return s.makespan, s

    def evaluate_move(self, block: list[int]) -> tuple[float, Schedule | None]:
        """The objective after moving `block` (already moved in `self.assign`). For the
        makespan: the accepted schedule replayed from the move on (`simulate.Replay`), inf when
        it cannot beat the current value; accepted moves are then list scheduled as well."""
        if self.replay is None:
            return self.evaluate()
        self.evaluations += 1
        s = self.replay.evaluate(self.assign, block, self.value * (1 - 1e-9))
        if s is None:
            return math.inf, None
        listed = list_schedule(self.p, self.assign)
        if listed.makespan < s.makespan:
            s = listed
        return s.makespan, s

    def accept(self, value: float, sched: Schedule | None) -> None:
        self.value, self.sched = value, sched
        if sched is not None:
            self.timing = timing(self.p, sched)
            self.replay = Replay(self.p, self.assign, *self.timing)
            if self.replay.schedule.makespan < value:
                self.value, self.sched = self.replay.schedule.makespan, self.replay.schedule
                self.timing = timing(self.p, self.sched)

    def targets(self, block: list[int]) -> list[int]:
        p = self.p
        home = self.assign[block[0]]
        mem = sum(p.mem[j] for j in block)
        return [
            k
            for k in range(p.num_devices)
            if k != home and self.used[k] + mem <= p.cap[k] and all(k in p.cand[j] for j in block)
        ]

    def move(self, block: list[int], k: int) -> None:
        p = self.p
        home = self.assign[block[0]]
        mem = sum(p.mem[j] for j in block)
        self.used[home] -= mem
        self.used[k] += mem
        for j in block:
            self.assign[j] = k

    def descend(self) -> bool:
        """First-improvement block moves until none improves: True there (a local optimum),
        False when the work ran out first (the next call resumes the pass where it stopped).

        A pass tries every task once, most critical first; after a move is made the order is
        computed again for the new schedule, but the tasks already tried in this pass are not
        tried again (a rescan from the top would spend most of the work on critical tasks that
        just failed: on random-3 the accepted move's task sat at position 14 of the order in
        the median). A pass that made a move is followed by another."""
        while not self.out_of_work():
            if self.pass_ is None:
                self.pass_ = _Pass(_order(self.p, self.assign, self.sched, self.rng))
            now = self.pass_
            while now.next < len(now.order):
                i = now.order[now.next]
                if i in now.tried:
                    now.next += 1
                    continue
                moved = self._try(i)
                if moved is None:  # out of work: this task first next time
                    return False
                now.tried.add(i)
                now.next += 1
                if moved:
                    now.improved = True
                    now.order, now.next = _order(self.p, self.assign, self.sched, self.rng), 0
            self.pass_ = None
            if not now.improved:
                return True
        return False

    def _try(self, i: int) -> bool | None:
        """The first improving move of a block from task i, made; whether there was one (None:
        the work ran out first)."""
        for block in _blocks(self.p, self.assign, i):
            home = self.assign[i]
            targets = self.targets(block)
            self.rng.shuffle(targets)
            for k in targets:
                if self.out_of_work():
                    return None
                self.move(block, k)
                value, sched = self.evaluate_move(block)
                if value < self.value * (1 - 1e-9):
                    self.accept(value, sched)
                    return True
                self.move(block, home)
        return False

    def restore(self, assign: list[int], value: float, sched: Schedule | None) -> None:
        self.assign = list(assign)
        self.used = [0] * self.p.num_devices
        for i, k in enumerate(self.assign):
            self.used[k] += self.p.mem[i]
        self.accept(value, sched)
        self.pass_ = None

    def kick(self) -> None:
        """Move a few random blocks among the most critical tasks to random devices."""
        order = _order(self.p, self.assign, self.sched, self.rng)
        critical = order[: max(1, len(order) // 10)]
        for _ in range(self.rng.randint(1, KICK_BLOCKS)):
            i = self.rng.choice(critical)
            block = self.rng.choice(_blocks(self.p, self.assign, i))
            targets = self.targets(block)
            if targets:
                self.move(block, self.rng.choice(targets))
        self.accept(*self.evaluate())
        self.pass_ = None


class LocalSearch:
    """A local search that goes on where it stopped: `run` until a deadline or a total of
    evaluations, then `run` again later (the race in `auto` gives it turns) without trying
    again the moves its last pass has already tried, nor proving again that a local optimum is
    one.

    From the start assignment it descends to a local optimum, then (with `kicks`) kicks and
    descends again, keeping the best assignment found; it stops early once the value meets
    `bound` (a lower bound: nothing better exists). `start` is the timing of the schedule the
    assignment comes from (`timing`), so that the search begins from that schedule rather
    than from a list schedule of it."""

    def __init__(
        self,
        problem: PlacementProblem,
        assignment: Sequence[int],
        seed: int = 0,
        bound: float = 0.0,
        start: Timing | None = None,
    ) -> None:
        self.bound = bound
        self._search = _Search(problem, assignment, math.inf, math.inf, random.Random(seed), start)
        s = self._search
        self.best: tuple[list[int], float, Schedule | None] = (list(s.assign), s.value, s.sched)
        """The best assignment so far, its objective value and (latency) its schedule."""
        self._settled = False
        """Whether the search stands at a local optimum (the next step is a kick)."""

    @property
    def value(self) -> float:
        return self.best[1]

    @property
    def evaluations(self) -> int:
        """The moves (and kicks) evaluated since it was made: its work."""
        return self._search.evaluations

    def run(
        self, deadline: float, max_evaluations: float = math.inf, kicks: bool = True
    ) -> tuple[list[int], float, Schedule | None]:
        """Search until `deadline`, or until `max_evaluations` in all since it was made, and
        return the best so far. Without `kicks` it stops at the next local optimum."""
        s = self._search
        s.deadline, s.max_evaluations = deadline, max_evaluations
        while not s.out_of_work() and self.value > self.bound * (1 + OPTIMALITY_TOL):
            if not self._settled:
                self._settled = s.descend()
                if s.value < self.value * (1 - 1e-9):
                    self.best = (list(s.assign), s.value, s.sched)
                if not self._settled:
                    break
            if not kicks:
                break
            if s.assign != self.best[0]:  # back to the best
                s.restore(*self.best)
            s.kick()
            self._settled = False
        return self.best


def improve(
    problem: PlacementProblem,
    assignment: list[int],
    deadline: float,
    seed: int = 0,
    max_evaluations: float = math.inf,
    bound: float = 0.0,
    start: Timing | None = None,
    kicks: bool = True,
) -> tuple[list[int], float, Schedule | None]:
    """A better (or the same) assignment, its objective value and (latency) its schedule, by
    block moves and kicks (`LocalSearch`, in one run). Without `kicks` it stops at the first
    local optimum (plain descent)."""
    search = LocalSearch(problem, assignment, seed, bound, start)
    return search.run(deadline, max_evaluations, kicks)


Timing = tuple[Sequence[float], Mapping[int, float]]
"""Start of every task, and of every cross-device transfer by edge index."""


def timing(problem: PlacementProblem, sched: Schedule) -> Timing:
    """A schedule's timing; a same-device edge's transfer, were it to cross, would start when
    its source ends."""
    transfers = {e: sched.end[i] for e, (i, _) in enumerate(problem.edges)}
    transfers.update({e: s for e, (s, _) in sched.xfer.items()})
    return list(sched.start), transfers


def plan_timing(problem: PlacementProblem, plan: Placement) -> Timing:
    """The timing of a plan's schedule, in the problem's indices."""
    p = problem
    starts = [0.0] * p.n
    ends = [0.0] * p.n
    for s in plan.schedule:
        i = p.task_index[s.task]
        starts[i], ends[i] = s.start_ms, s.end_ms
    transfers = {e: ends[i] for e, (i, _) in enumerate(p.edges)}
    index = {(p.edges[e][0], p.edges[e][1]): e for e in range(len(p.edges))}
    for x in plan.transfers:
        transfers[index[p.task_index[x.src], p.task_index[x.dst]]] = x.start_ms
    return starts, transfers
