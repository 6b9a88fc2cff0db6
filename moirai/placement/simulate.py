"""The one simulator of Moirai's execution model (`../shared/formats/costgraph.md`).

Model: a task runs on one device for its `compute_ms` there; tasks on one device never overlap;
a task starts once every input has arrived (a predecessor on the same device has finished; one on
another device has finished *and* that edge's transfer has finished); a transfer starts after its
source task ends and lasts the edge's transfer time for that device pair; congestion: a device
sends at most one transfer at a time (its send port) and receives at most one at a time (its
receive port). Zero-length tasks and transfers occupy nothing. Makespan = the last end.

Hop work (Moirai's extension, `problem.hop_work`): a device that pays for its transfers (a CPU,
`PlacementProblem.pays_for_transfers`) also does part of every hop on its own time, and computes
nothing meanwhile. A transfer of edge e from a to b that starts at T occupies a's device for
`send_work[e][a][b]` from T (the sender encodes and writes) and b's device for
`recv_work[e][a][b]` at some time R >= T + transfer - recv_work (the receiver reads and files the
data once it is in; it may do so later when busy), and its consumer starts after R + recv_work
(the transfer's *arrival*, its end when b does no work). The ports still carry the whole
transfer, so every bound that prices transfers on paths and ports stays valid, and the hop work
only adds to what a device does. A plan records R + recv_work as a transfer's `arrive_ms`.

Three things live here and nowhere else:

- `Schedule`: a schedule under construction over timelines (device, send port, receive port).
  Placing a task on a device schedules its incoming transfers at their earliest common gap on
  the sender's send port and the receiver's receive port (in order of data readiness), then the
  task at the earliest gap on the device (insertion-based, as in HEFT). The heuristics build
  their schedules with it, so every heuristic obeys exactly this model.
- `list_schedule(problem, assignment, priority)`: the evaluator that turns an assignment (and a
  priority order, by default the upward rank under that assignment) into a valid schedule; and
  `retime(problem, assignment, starts)`, which replays another solver's schedule operation by
  operation in the order of its start times. Replaying in start order with insertion never
  starts an operation later than the solver did (by induction over the order), so exact
  solvers lose nothing, and their plans are re-timed in exact floating point whatever rounding
  or tolerances they used. `Replay` is `retime` for a search: it remembers the order, and
  replays an assignment that differs in a few tasks from the first operation they touch.
- `check(costgraph_or_problem, placement)`: verifies a finished plan rule by rule and reports
  the first violated rule in one line (`InvalidScheduleError`); returns the recomputed makespan.

`period` gives the pipelined period of an assignment for the throughput objective, from
`loads`, the busy time per request of every device and port. The period has its own resource
model: a device whose `pays_for_transfers` is set (by default a CPU: its stage server copies and
serialises every tensor it sends or receives on its own cores) is busy for its transfers as
well as its tasks (in full: in steady state both ends' work and the wait add up per request).
"""

from __future__ import annotations

import heapq
import itertools
import math
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from moirai.costgraph import CostGraph
from moirai.errors import MoiraiError
from moirai.placement.problem import PlacementProblem, gib, hop_work
from moirai.placement.result import Placement, ScheduledTask, ScheduledTransfer, Status


class InvalidScheduleError(MoiraiError):
    """A plan violates the execution model (one line naming the rule and the culprits)."""


# ------------------------------------------------------------------- timelines
class Timeline:
    """Busy intervals `[start, end)` of one resource, sorted and disjoint; intervals that touch
    are kept as one (a device that runs its tasks back to back is one interval, so finding the
    next gap after a task's ready time does not walk over every task of the run: on 1,500
    tasks, 3 devices, this walk took most of a list schedule's time)."""

    __slots__ = ("ends", "starts", "version")

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.version = 0

    def first_free(self, t: float, dur: float) -> float:
        """Earliest `t' >= t` at which `[t', t' + dur)` is free (`dur` > 0): one pass over the
        busy intervals from t, which are sorted and disjoint."""
        starts, ends = self.starts, self.ends
        idx = bisect_right(ends, t)
        n = len(starts)
        while idx < n and starts[idx] < t + dur:
            t = ends[idx]
            idx += 1
        return t

    def add(self, start: float, end: float) -> None:
        if end <= start:
            return
        starts, ends = self.starts, self.ends
        idx = bisect_left(starts, start)
        before = idx > 0 and ends[idx - 1] == start
        after = idx < len(starts) and starts[idx] == end
        if before and after:  # fills the gap between two intervals
            ends[idx - 1] = ends[idx]
            del starts[idx]
            del ends[idx]
        elif before:
            ends[idx - 1] = end
        elif after:
            starts[idx] = start
        else:
            starts.insert(idx, start)
            ends.insert(idx, end)
        self.version += 1

    def remove(self, start: float, end: float) -> None:
        """Free `[start, end)`, which was added: cut it out of the interval that holds it."""
        if end <= start:
            return
        starts, ends = self.starts, self.ends
        idx = bisect_right(starts, start) - 1
        first, last = starts[idx], ends[idx]
        if first < start and end < last:
            ends[idx] = start
            starts.insert(idx + 1, end)
            ends.insert(idx + 1, last)
        elif first < start:
            ends[idx] = start
        elif end < last:
            starts[idx] = end
        else:
            del starts[idx]
            del ends[idx]
        self.version += 1


def earliest_fit(windows: Sequence[tuple[Timeline, float]], ready: float) -> float:
    """Earliest `t >= ready` at which every `(timeline, duration)` is free on `[t, t + duration)`
    (windows of one operation that start together: a transfer's ports and its sender's work)."""
    t = ready
    moved = True
    while moved:
        moved = False
        for tl, dur in windows:
            if dur <= 0:
                continue
            free = tl.first_free(t, dur)
            if free > t:
                t = free
                moved = True
    return t


def earliest_gap(timelines: Sequence[Timeline], ready: float, dur: float) -> float:
    """Earliest `t >= ready` at which `[t, t + dur)` is free on every timeline."""
    if dur <= 0:
        return ready
    if len(timelines) == 1:
        return timelines[0].first_free(ready, dur)
    t = ready
    moved = True
    while moved:
        moved = False
        for tl in timelines:
            free = tl.first_free(t, dur)
            if free > t:
                t = free
                moved = True
    return t


# -------------------------------------------------------------------- schedule
TransferPlan = list[tuple[int, float, float, float]]
"""Incoming transfers of a task: (edge index, start, end, arrival)."""


class Schedule:
    """A (partial) schedule under Moirai's execution model, built one operation at a time."""

    def __init__(self, problem: PlacementProblem) -> None:
        self.problem = problem
        k = problem.num_devices
        self.device = [Timeline() for _ in range(k)]
        self.send = [Timeline() for _ in range(k)]
        self.recv = [Timeline() for _ in range(k)]
        self.where = [-1] * problem.n
        self.start = [0.0] * problem.n
        self.end = [0.0] * problem.n
        self.xfer: dict[int, tuple[float, float]] = {}
        """Each cross-device edge's transfer on the ports: (start, end)."""
        self.arrive: dict[int, float] = {}
        """When each transfer's data is in its consumer's hands: the end of the receiver's
        work, or of the transfer when the receiver does none."""

    # ---------------------------------------------------------------- tasks
    def plan(self, i: int, k: int) -> tuple[float, TransferPlan]:
        """Earliest start of task i on device k, with its incoming transfers (not committed).

        Every predecessor must be placed. Incoming cross-device transfers not yet scheduled
        (`place_transfer` may have sent some already) are tried in order of their source's end,
        each at the earliest gap on both ports and its sender's device, its receiver's work at
        the earliest gap on device k once the data is in (tentatively booked so they do not
        collide with each other), then the task at the earliest gap on the device.
        """
        p = self.problem
        ready = 0.0
        cross: list[tuple[float, int, int]] = []
        for e in p.in_edges[i]:
            j = p.edges[e][0]
            a = self.where[j]
            if a == k:
                ready = max(ready, self.end[j])
            elif e in self.xfer:
                ready = max(ready, self.arrive[e])
            else:
                cross.append((self.end[j], e, a))
        plan: TransferPlan = []
        if cross:
            cross.sort()
            for r, e, a in cross:
                s, f, arrive = self._book(e, a, k, r)
                plan.append((e, s, f, arrive))
                ready = max(ready, arrive)
            for (e, s, f, arrive), (_, _, a) in zip(plan, cross, strict=True):
                self._unbook(e, a, k, s, f, arrive)
        return earliest_gap((self.device[k],), ready, p.compute[i][k]), plan

    def _book(
        self, e: int, a: int, b: int, ready: float, receive: bool = True
    ) -> tuple[float, float, float]:
        """Book edge e's transfer from a to b at its earliest (ports and the sender's work from
        the same start), then (`receive`) the receiver's work at its earliest once the data is
        in; returns (start, end, arrival)."""
        p = self.problem
        d, sw = p.transfer[e][a][b], p.send_work[e][a][b]
        s = earliest_fit(((self.send[a], d), (self.recv[b], d), (self.device[a], sw)), ready)
        self.send[a].add(s, s + d)
        self.recv[b].add(s, s + d)
        self.device[a].add(s, s + sw)
        arrive = self._receive(e, a, b, s + d) if receive else s + d
        return s, s + d, arrive

    def _receive(self, e: int, a: int, b: int, end: float) -> float:
        """Book the receiver's work of edge e's transfer (ending at `end`) at its earliest on
        device b; returns the arrival."""
        rw = self.problem.recv_work[e][a][b]
        if rw <= 0:
            return end
        arrive = earliest_gap((self.device[b],), end - rw, rw) + rw
        self.device[b].add(arrive - rw, arrive)
        return arrive

    def _unbook(self, e: int, a: int, b: int, s: float, f: float, arrive: float) -> None:
        p = self.problem
        self.send[a].remove(s, f)
        self.recv[b].remove(s, f)
        self.device[a].remove(s, s + p.send_work[e][a][b])
        rw = p.recv_work[e][a][b]
        self.device[b].remove(arrive - rw, arrive)

    def commit(self, i: int, k: int, start: float, plan: TransferPlan) -> None:
        p = self.problem
        for e, s, f, arrive in plan:
            a = self.where[p.edges[e][0]]
            self.send[a].add(s, f)
            self.recv[k].add(s, f)
            self.device[a].add(s, s + p.send_work[e][a][k])
            rw = p.recv_work[e][a][k]
            self.device[k].add(arrive - rw, arrive)
            self.xfer[e] = (s, f)
            self.arrive[e] = arrive
        end = start + p.compute[i][k]
        self.device[k].add(start, end)
        self.where[i] = k
        self.start[i] = start
        self.end[i] = end

    def place(self, i: int, k: int) -> float:
        """Place task i on device k at its earliest start; returns its end."""
        start, plan = self.plan(i, k)
        self.commit(i, k, start, plan)
        return self.end[i]

    # ----------------------------------------------------- one op at a time
    def place_transfer(self, e: int, k: int, receive: bool = True) -> float:
        """Schedule edge e's transfer to device k (its source placed) at the earliest gap, with
        its sender's hop work and (`receive`) its receiver's; returns its arrival (its end when
        the receiver's work is left for `place_receive`)."""
        a = self.where[self.problem.edges[e][0]]
        s, f, arrive = self._book(e, a, k, self.end[self.problem.edges[e][0]], receive)
        self.xfer[e] = (s, f)
        if receive or self.problem.recv_work[e][a][k] <= 0:
            self.arrive[e] = arrive
        return arrive

    def place_receive(self, e: int, k: int) -> float:
        """Schedule the receiver's work of edge e's transfer (placed) on device k; returns
        the arrival."""
        a = self.where[self.problem.edges[e][0]]
        self.arrive[e] = self._receive(e, a, k, self.xfer[e][1])
        return self.arrive[e]

    def place_task_after_inputs(self, i: int, k: int) -> None:
        """Place task i on device k once its inputs are there (transfers already scheduled)."""
        p = self.problem
        ready = 0.0
        for e in p.in_edges[i]:
            j = p.edges[e][0]
            ready = max(ready, self.end[j] if self.where[j] == k else self.arrive[e])
        self.commit(i, k, earliest_gap((self.device[k],), ready, p.compute[i][k]), [])

    # --------------------------------------------------------------- result
    @property
    def makespan(self) -> float:
        ends = [*self.end, *self.arrive.values()]
        return max(ends, default=0.0)

    def to_placement(
        self,
        solver: str,
        status: Status,
        lower_bound_ms: float,
        solve_seconds: float,
        extra: Mapping[str, Any] | None = None,
    ) -> Placement:
        p = self.problem
        if any(k < 0 for k in self.where):
            raise RuntimeError(f"{solver}: schedule is incomplete")
        names, devs = p.tasks, p.devices
        order = sorted(range(p.n), key=lambda i: (self.start[i], i))
        schedule = [
            ScheduledTask(names[i], devs[self.where[i]], self.start[i], self.end[i]) for i in order
        ]
        transfers = []
        for e in sorted(self.xfer, key=lambda e: (self.xfer[e][0], e)):
            i, j = p.edges[e]
            s, f = self.xfer[e]
            a, b = self.where[i], self.where[j]
            arrive = self.arrive[e] if p.recv_work[e][a][b] > 0 else None
            transfers.append(ScheduledTransfer(names[i], names[j], devs[a], devs[b], s, f, arrive))
        return Placement(
            costgraph=p.costgraph.name,
            solver=solver,
            status=status,
            makespan_ms=self.makespan,
            lower_bound_ms=lower_bound_ms,
            solve_seconds=solve_seconds,
            assignment={names[i]: devs[self.where[i]] for i in range(p.n)},
            schedule=schedule,
            transfers=transfers,
            objective=p.objective,
            period_ms=period(p, self.where),
            extra=dict(extra or {}),
        )


# ------------------------------------------------------------------ evaluators
def upward_rank(problem: PlacementProblem, assignment: Sequence[int] | None = None) -> list[float]:
    """HEFT's upward rank: the longest path from a task to the end, itself included.

    With an assignment, times are those of the assigned devices and transfers; without one,
    the mean compute time over candidate devices and the mean transfer time over device pairs
    (Topcuoglu et al. 2002).
    """
    p = problem
    rank = [0.0] * p.n
    if assignment is None:
        w = [sum(p.compute[i][k] for k in p.cand[i]) / len(p.cand[i]) for i in range(p.n)]
        kk = p.num_devices
        pairs = max(1, kk * (kk - 1))
        c = [sum(sum(row) for row in p.transfer[e]) / pairs for e in range(len(p.edges))]
    else:
        w = [p.compute[i][assignment[i]] for i in range(p.n)]
        c = [p.transfer[e][assignment[a]][assignment[b]] for e, (a, b) in enumerate(p.edges)]
    for i in reversed(range(p.n)):
        best = 0.0
        for e in p.out_edges[i]:
            best = max(best, c[e] + rank[p.edges[e][1]])
        rank[i] = w[i] + best
    return rank


def priority_order(problem: PlacementProblem, rank: Sequence[float]) -> list[int]:
    """Tasks by decreasing rank; a topological order when rank strictly decreases along edges
    (upward ranks do as long as compute times are positive; ties fall back to topological
    position, which keeps zero-time tasks after their predecessors)."""
    return sorted(range(problem.n), key=lambda i: (-rank[i], i))


def _topological_priority(problem: PlacementProblem, order: Sequence[int]) -> list[int]:
    """Make a priority order topological: a task waits until its predecessors have gone."""
    pos = {i: n for n, i in enumerate(order)}
    indeg = [len(problem.in_edges[i]) for i in range(problem.n)]
    ready = [(pos[i], i) for i in range(problem.n) if indeg[i] == 0]
    heapq.heapify(ready)
    out = []
    while ready:
        _, i = heapq.heappop(ready)
        out.append(i)
        for e in problem.out_edges[i]:
            j = problem.edges[e][1]
            indeg[j] -= 1
            if indeg[j] == 0:
                heapq.heappush(ready, (pos[j], j))
    return out


def list_schedule(
    problem: PlacementProblem,
    assignment: Sequence[int] | Mapping[str, str],
    priority: Sequence[int] | Sequence[str] | None = None,
    eager: bool | None = None,
) -> Schedule:
    """Turn an assignment into a valid schedule by list scheduling.

    Tasks go in `priority` order (made topological if it is not), by default by decreasing
    upward rank under the assignment; each is placed at its earliest start on its device.
    `eager`: a task's outgoing transfers are sent as soon as it is placed (a stage server
    pushes its outputs as soon as it has them), rather than when their consumer is placed;
    its sender's hop work then sits right after the task instead of after the tasks placed on
    its device in between. None (the default): both, the better schedule kept, where the
    problem has hop work; lazy otherwise.
    """
    if eager is None:
        lazy = list_schedule(problem, assignment, priority, eager=False)
        if not problem.has_hop_work:
            return lazy
        sent = list_schedule(problem, assignment, priority, eager=True)
        return sent if sent.makespan < lazy.makespan else lazy
    assign = _as_indices(problem, assignment)
    if priority is None:
        order = priority_order(problem, upward_rank(problem, assign))
    else:
        order = [problem.task_index[t] if isinstance(t, str) else t for t in priority]
        if sorted(order) != list(range(problem.n)):
            raise ValueError("priority must list every task exactly once")
    order = _topological_priority(problem, order)
    sched = Schedule(problem)
    rank = {i: q for q, i in enumerate(order)}
    p = problem
    for i in order:
        sched.place(i, assign[i])
        if eager:
            out = [e for e in p.out_edges[i] if assign[p.edges[e][1]] != assign[i]]
            for e in sorted(out, key=lambda e: rank[p.edges[e][1]]):
                sched.place_transfer(e, assign[p.edges[e][1]])
    return sched


def _operations(
    problem: PlacementProblem, assignment: Sequence[int]
) -> tuple[dict[int, list[int]], dict[int, int]]:
    """The operations of an assignment and their precedence: task i is `i`, edge e's transfer
    `n + e`, its receiver's hop work (where there is some) `n + m + e` (m edges); successors of
    each, and how many predecessors each waits for."""
    p = problem
    n, m = p.n, len(p.edges)
    succs: dict[int, list[int]] = {i: [] for i in range(n)}
    waiting = dict.fromkeys(range(n), 0)
    for e, (i, j) in enumerate(p.edges):
        a, b = assignment[i], assignment[j]
        if a != b:
            x = n + e
            succs[i].append(x)
            waiting[x] = 1
            if p.recv_work[e][a][b] > 0:
                succs[x] = [n + m + e]
                succs[n + m + e] = [j]
                waiting[n + m + e] = 1
            else:
                succs[x] = [j]
        else:
            succs[i].append(j)
        waiting[j] += 1
    return succs, waiting


def retime(
    problem: PlacementProblem,
    assignment: Sequence[int],
    task_start: Sequence[float],
    transfer_start: Mapping[int, float],
    recv_start: Mapping[int, float] | None = None,
) -> Schedule:
    """Replay a solver's schedule in exact time, operation by operation in start order.

    `transfer_start[e]` is the solver's start of each cross-device edge (a missing one counts
    as its destination's start), `recv_start[e]` the start of its receiver's hop work (a
    missing one counts as late as its consumer allows). Operations are released in order of
    the solver's start, but never before their predecessors (so zero-length operations and a
    solver's tolerances, which may put a successor a hair before its predecessor, cannot break
    the replay).
    """
    succs, waiting = _operations(problem, assignment)
    sched = Schedule(problem)
    _release(sched, assignment, task_start, transfer_start, recv_start or {}, succs, waiting)
    return sched


def _release(
    sched: Schedule,
    assignment: Sequence[int],
    task_start: Sequence[float],
    transfer_start: Mapping[int, float],
    recv_start: Mapping[int, float],
    succs: dict[int, list[int]],
    waiting: dict[int, int],
    limit: float = math.inf,
    order: list[int] | None = None,
    tail: tuple[Sequence[float], set[int]] | None = None,
) -> bool:
    """Place the operations of `waiting` (`_operations`' ids) in order of their solver start,
    each once its predecessors (`succs`, counted in `waiting`) are placed; appends them to
    `order` as they go. False, leaving the schedule unfinished, as soon as an operation ends
    after `limit`, or (with `tail`: the time after each task to the end on its longest path,
    and the tasks whose tails are not known) once those tasks are placed, as soon as a task's
    end plus its tail, or a transfer's arrival plus its destination's rank, exceeds it."""
    p = sched.problem
    n, m = p.n, len(p.edges)
    after, unknown = tail if tail is not None else ((), set())
    checking = tail is not None and not unknown

    def key(op: int) -> tuple[float, int]:
        if op < n:
            return task_start[op], 2 * op
        e = (op - n) % m
        i, j = p.edges[e]
        if op < n + m:
            return transfer_start.get(e, task_start[j]), 2 * j - 1
        rw = p.recv_work[e][assignment[i]][assignment[j]]
        return recv_start.get(e, task_start[j] - rw), 2 * j - 1

    ready = [(key(op), op) for op, count in waiting.items() if count == 0]
    heapq.heapify(ready)
    while ready:
        _, op = heapq.heappop(ready)
        if op < n:
            sched.place_task_after_inputs(op, assignment[op])
            end = sched.end[op]
            if checking:
                end += after[op]
            elif op in unknown:
                unknown.discard(op)
                checking = tail is not None and not unknown
        else:
            e = (op - n) % m
            j = p.edges[e][1]
            if op < n + m:
                end = sched.place_transfer(e, assignment[j], receive=False)
            else:
                end = sched.place_receive(e, assignment[j])
            if checking:
                end += after[j] + p.compute[j][assignment[j]]
        if end > limit:
            return False
        if order is not None:
            order.append(op)
        for nxt in succs.get(op, ()):
            waiting[nxt] -= 1
            if waiting[nxt] == 0:
                heapq.heappush(ready, (key(nxt), nxt))
    return True


class Replay:
    """`retime` of one assignment that remembers its order of operations, so that the replay of
    an assignment differing in a few tasks re-places only what follows the change (the local
    search's move evaluation: a few milliseconds less per move on hundreds of tasks, and a
    move that cannot win stops as soon as an operation ends past the value to beat).

    The base replay places operations in a sequence (start order, predecessors first). Moving
    tasks to other devices changes those tasks and the transfers of their edges (and their hop
    work); the operations placed before the first of them (the cut) have all their
    predecessors before the cut too and none of them changed, so in the new assignment they
    stay where they are. `evaluate` keeps that prefix and replays the rest, in the same start
    order, into the timelines the prefix leaves: a valid schedule of the new assignment (each
    operation at its earliest gap once its inputs are in), usually exactly `retime`'s.
    """

    def __init__(
        self,
        problem: PlacementProblem,
        assignment: Sequence[int],
        task_start: Sequence[float],
        transfer_start: Mapping[int, float],
        recv_start: Mapping[int, float] | None = None,
    ) -> None:
        p = problem
        self.problem = p
        self.task_start = task_start
        self.transfer_start = transfer_start
        self.recv_start = recv_start or {}
        order: list[int] = []
        succs, waiting = _operations(p, assignment)
        sched = Schedule(p)
        _release(
            sched,
            assignment,
            task_start,
            transfer_start,
            self.recv_start,
            succs,
            waiting,
            order=order,
        )
        self.schedule = sched
        self.order = order
        self.position = {op: q for q, op in enumerate(order)}
        # every resource's busy intervals, by start, with the position of their operation
        busy: list[list[tuple[float, float, int]]] = [[] for _ in range(3 * p.num_devices)]
        kk, n, m = p.num_devices, p.n, len(p.edges)
        for i in range(p.n):
            if sched.end[i] > sched.start[i]:
                busy[sched.where[i]].append((sched.start[i], sched.end[i], self.position[i]))
        for e, (s, f) in sched.xfer.items():
            a, b = sched.where[p.edges[e][0]], sched.where[p.edges[e][1]]
            q = self.position[n + e]
            if f > s:
                busy[kk + a].append((s, f, q))
                busy[2 * kk + b].append((s, f, q))
            sw, rw = p.send_work[e][a][b], p.recv_work[e][a][b]
            if sw > 0:
                busy[a].append((s, s + sw, q))
            if rw > 0:
                arrive = sched.arrive[e]
                busy[b].append((arrive - rw, arrive, self.position[n + m + e]))
        # each resource's intervals as columns, and the latest position among the first q of
        # them (so that the intervals placed before a cut are found by bisection, bar the few
        # that an earlier operation inserted after a later one)
        self.busy: list[tuple[list[float], list[float], list[int], list[int]]] = []
        for items in busy:
            items.sort()
            positions = [it[2] for it in items]
            self.busy.append(
                (
                    [it[0] for it in items],
                    [it[1] for it in items],
                    positions,
                    list(itertools.accumulate(positions, max)),
                )
            )
        # the transfers, and their arrivals, by the position of their last operation
        xfers = sorted((self.position[n + e], e) for e in sched.xfer)
        self.xfers = ([q for q, _ in xfers], [(e, sched.xfer[e]) for _, e in xfers])
        arrivals = sorted(
            (self.position.get(n + m + e, self.position[n + e]), e) for e in sched.arrive
        )
        self.arrivals = ([q for q, _ in arrivals], [(e, sched.arrive[e]) for _, e in arrivals])
        rank = upward_rank(p, assignment)
        self.after = [rank[i] - p.compute[i][assignment[i]] for i in range(p.n)]
        """Longest path from each task's end to the end (no resources): a task that does not
        lead to a moved one keeps it in the new assignment, so its end plus this is a lower
        bound of the new makespan."""

    def evaluate(
        self, assignment: Sequence[int], moved: Sequence[int], limit: float = math.inf
    ) -> Schedule | None:
        """The replay of `assignment`, which differs from the base's in the tasks `moved`
        only; None when an operation ends after `limit` (the makespan would be above it)."""
        p, n, base, position = self.problem, self.problem.n, self.schedule, self.position
        m = len(p.edges)
        cut = len(self.order)
        for i in moved:
            cut = min(cut, position[i])
            for e in p.in_edges[i]:
                q = position.get(n + e)
                if q is not None and q < cut:
                    cut = q
        sched = Schedule(p)
        sched.where = list(base.where)
        sched.start = list(base.start)
        sched.end = list(base.end)
        sched.xfer = dict(self.xfers[1][: bisect_left(self.xfers[0], cut)])
        # a transfer's arrival is known once its last operation (its receiver's work) is kept
        sched.arrive = dict(self.arrivals[1][: bisect_left(self.arrivals[0], cut)])
        kk = p.num_devices
        for r, (starts, ends, positions, latest) in enumerate(self.busy):
            q = bisect_left(latest, cut)
            if r < kk:
                tl = sched.device[r]
            elif r < 2 * kk:
                tl = sched.send[r - kk]
            else:
                tl = sched.recv[r - 2 * kk]
            tl.starts = starts[:q]
            tl.ends = ends[:q]
            for t in range(q, len(starts)):
                if positions[t] < cut:
                    tl.starts.append(starts[t])
                    tl.ends.append(ends[t])
        succs: dict[int, list[int]] = {}
        waiting: dict[int, int] = {}
        rest = [op for op in self.order[cut:] if op < n]
        for v in rest:
            waiting[v] = 0
        for v in rest:
            b = assignment[v]
            for e in p.in_edges[v]:
                u = p.edges[e][0]
                later = position[u] >= cut
                a = assignment[u]
                if a == b:
                    if later:
                        succs.setdefault(u, []).append(v)
                        waiting[v] += 1
                    continue
                if e in sched.arrive:  # its transfer is in the prefix, unchanged
                    continue
                x, r = n + e, n + m + e
                receives = p.recv_work[e][a][b] > 0
                last = r if receives else x
                if e not in sched.xfer:
                    waiting[x] = 1 if later else 0
                    if later:
                        succs.setdefault(u, []).append(x)
                    if receives:
                        succs[x] = [r]
                        waiting[r] = 1
                elif receives:  # only the receiver's work is left
                    waiting[r] = 0
                succs[last] = [v]
                waiting[v] += 1
        starts, transfers = self.task_start, self.transfer_start
        tail = (self.after, set(moved))
        done = _release(
            sched,
            assignment,
            starts,
            transfers,
            self.recv_start,
            succs,
            waiting,
            limit,
            tail=tail,
        )
        return sched if done else None


def loads(
    problem: PlacementProblem,
    assignment: Sequence[int],
    duration: Callable[[float], float] = float,
) -> list[float]:
    """Busy time per request of every resource: device k at `k`, its send port at `K + k` and
    its receive port at `2K + k` (K devices). `duration` maps each compute or transfer time
    before it is summed (CP-SAT passes its floored integer units).

    A device computes its tasks; a port carries its device's outgoing (incoming) transfers; a
    device that pays for its transfers (`PlacementProblem.pays_for_transfers`, a CPU stage
    server copying tensors on its own cores) is also busy for every transfer into and out of
    it. Its port loads are then at most its own, so the ports bind only on the others (GPUs).
    """
    p = problem
    kk = p.num_devices
    busy = [0.0] * (3 * kk)
    for i in range(p.n):
        busy[assignment[i]] += duration(p.compute[i][assignment[i]])
    for e, (i, j) in enumerate(p.edges):
        a, b = assignment[i], assignment[j]
        if a != b:
            d = duration(p.transfer[e][a][b])
            busy[kk + a] += d
            busy[2 * kk + b] += d
            for k in (a, b):
                if p.pays_for_transfers[k]:
                    busy[k] += d
    return busy


def period(problem: PlacementProblem, assignment: Sequence[int]) -> float:
    """Pipelined period of an assignment: the busiest resource per request (`loads`).

    With many requests in flight, every resource does its share of every request once; in
    steady state a new request can enter every `max(loads)` milliseconds, the model's
    throughput being its inverse. Precedence only adds pipeline depth (latency), not period.
    """
    return max(loads(problem, assignment))


def _as_indices(
    problem: PlacementProblem, assignment: Sequence[int] | Mapping[str, str]
) -> list[int]:
    if isinstance(assignment, Mapping):
        missing = [t for t in problem.tasks if t not in assignment]
        if missing:
            raise InvalidScheduleError(f"assignment misses task {missing[0]!r}")
        unknown = [d for d in assignment.values() if d not in problem.device_index]
        if unknown:
            raise InvalidScheduleError(f"assignment names unknown device {unknown[0]!r}")
        return [problem.device_index[assignment[t]] for t in problem.tasks]
    return list(assignment)


# ----------------------------------------------------------------------- check
Span = tuple[float, float]


def hop_spans(x: ScheduledTransfer, costgraph: CostGraph) -> tuple[Span | None, Span | None]:
    """When a plan's transfer `x` has its sender and its receiver do their shares of the hop
    (module docstring: from the transfer's start on the sender, up to its arrival on the
    receiver); None for an end that does no share."""
    device = costgraph.device
    sw, rw = hop_work(
        x.end_ms - x.start_ms,
        device[x.from_device].pays_for_transfers,
        device[x.to_device].pays_for_transfers,
    )
    send = (x.start_ms, x.start_ms + sw) if sw > 0 else None
    receive = (x.arrival_ms - rw, x.arrival_ms) if rw > 0 else None
    return send, receive


def check(
    problem: PlacementProblem | CostGraph,
    placement: Placement,
    *,
    rel_tol: float = 1e-9,
) -> float:
    """Verify `placement` under the execution model; return its recomputed makespan.

    Checks, in order: every task assigned once to a device that can run it (and its pin),
    memory per device, each scheduled task on its assigned device for exactly its compute time,
    exactly one transfer per cross-device edge (and none for same-device edges) lasting its
    transfer time, its receiver's work (if any) done once the data is in, precedence (a
    transfer starts after its source ends; a task starts after each input arrived), no overlap
    on a device (tasks and hop work), on a send port and on a receive port, that
    the reported makespan is the schedule's, and the reported period (when there is one) the
    assignment's (`period`). Raises `InvalidScheduleError` naming the first violation.
    """
    p = problem if isinstance(problem, PlacementProblem) else PlacementProblem(problem)
    cg = p.costgraph
    horizon = max([1.0, *(s.end_ms for s in placement.schedule)])
    tol = rel_tol * horizon + 1e-12

    def fail(msg: str) -> None:
        raise InvalidScheduleError(msg)

    a = placement.assignment
    for t in p.tasks:
        if t not in a:
            fail(f"task {t!r} is not assigned to a device")
    for t, d in a.items():
        if t not in cg.task:
            fail(f"assignment names unknown task {t!r}")
        if d not in cg.device:
            fail(f"task {t!r} is assigned to unknown device {d!r}")
        if d not in cg.task[t].compute_ms:
            fail(f"task {t!r} is assigned to {d!r}, which cannot run it")
        if t in p.pins and p.pins[t] != d:
            fail(f"task {t!r} is pinned to {p.pins[t]!r} but assigned to {d!r}")
    used = dict.fromkeys(p.devices, 0)
    for t, d in a.items():
        used[d] += cg.task[t].memory_bytes
    for k, d in enumerate(p.devices):
        if used[d] > p.cap[k]:
            fail(f"device {d!r} holds {gib(used[d])} of tasks but has {gib(p.cap[k])}")

    start: dict[str, float] = {}
    end: dict[str, float] = {}
    per_device: dict[str, list[tuple[float, float, str]]] = {d: [] for d in p.devices}
    for s in placement.schedule:
        if s.task not in cg.task:
            fail(f"schedule names unknown task {s.task!r}")
        if s.task in start:
            fail(f"task {s.task!r} is scheduled twice")
        if s.device != a[s.task]:
            fail(f"task {s.task!r} is scheduled on {s.device!r} but assigned to {a[s.task]!r}")
        dur = cg.task[s.task].compute_ms[s.device]
        if s.start_ms < -tol or abs(s.end_ms - s.start_ms - dur) > tol:
            fail(
                f"task {s.task!r} runs {s.end_ms - s.start_ms:.6g} ms from {s.start_ms:.6g} on "
                f"{s.device!r}; its compute time there is {dur:.6g} ms"
            )
        start[s.task], end[s.task] = s.start_ms, s.end_ms
        per_device[s.device].append((s.start_ms, s.end_ms, s.task))
    for t in p.tasks:
        if t not in start:
            fail(f"task {t!r} is missing from the schedule")

    xfers: dict[tuple[str, str], ScheduledTransfer] = {}
    sends: dict[str, list[tuple[float, float, str]]] = {d: [] for d in p.devices}
    recvs: dict[str, list[tuple[float, float, str]]] = {d: [] for d in p.devices}
    edge_keys = {(e.src, e.dst) for e in cg.edges}
    for x in placement.transfers:
        key = (x.src, x.dst)
        if key not in edge_keys:
            fail(f"transfer {x.src}->{x.dst} is not an edge of the cost graph")
        if key in xfers:
            fail(f"transfer {x.src}->{x.dst} is scheduled twice")
        xfers[key] = x
        label = f"{x.src}->{x.dst}"
        sends[x.from_device].append((x.start_ms, x.end_ms, label))
        recvs[x.to_device].append((x.start_ms, x.end_ms, label))
    for e in cg.edges:
        da, db = a[e.src], a[e.dst]
        x = xfers.get((e.src, e.dst))
        if da == db:
            if x is not None:
                fail(f"edge {e.src}->{e.dst} stays on {da!r} but has a transfer")
            if start[e.dst] < end[e.src] - tol:
                fail(
                    f"task {e.dst!r} starts at {start[e.dst]:.6g} ms before its predecessor "
                    f"{e.src!r} ends at {end[e.src]:.6g} ms"
                )
            continue
        if x is None:
            fail(f"edge {e.src}->{e.dst} crosses {da!r}->{db!r} but has no transfer")
            raise AssertionError  # unreachable; keeps type checkers quiet
        if (x.from_device, x.to_device) != (da, db):
            fail(
                f"transfer {e.src}->{e.dst} goes {x.from_device!r}->{x.to_device!r}; the tasks "
                f"are on {da!r}->{db!r}"
            )
        dur = cg.transfer_ms(e, da, db)
        if abs(x.end_ms - x.start_ms - dur) > tol:
            fail(
                f"transfer {e.src}->{e.dst} lasts {x.end_ms - x.start_ms:.6g} ms; it takes "
                f"{dur:.6g} ms from {da!r} to {db!r}"
            )
        send, receive = hop_spans(x, cg)
        arrive = x.arrival_ms
        label = f"hop {e.src}->{e.dst}"
        if send is not None:
            per_device[da].append((*send, label))
        if receive is not None:
            if arrive < x.end_ms - tol:
                fail(
                    f"transfer {e.src}->{e.dst} arrives at {arrive:.6g} ms, before its data is "
                    f"in at {x.end_ms:.6g} ms"
                )
            per_device[db].append((*receive, label))
        elif abs(arrive - x.end_ms) > tol:
            fail(
                f"transfer {e.src}->{e.dst} arrives at {arrive:.6g} ms; with no work on "
                f"{db!r} it arrives when it ends at {x.end_ms:.6g} ms"
            )
        if x.start_ms < end[e.src] - tol:
            fail(
                f"transfer {e.src}->{e.dst} starts at {x.start_ms:.6g} ms before {e.src!r} ends "
                f"at {end[e.src]:.6g} ms"
            )
        if start[e.dst] < arrive - tol:
            fail(
                f"task {e.dst!r} starts at {start[e.dst]:.6g} ms before its input from "
                f"{e.src!r} arrives at {arrive:.6g} ms"
            )
    for what, table in (
        ("device", per_device),
        ("send port of", sends),
        ("receive port of", recvs),
    ):
        for d, items in table.items():
            busy = sorted(it for it in items if it[1] - it[0] > tol)
            for (_, e1, n1), (s2, _, n2) in itertools.pairwise(busy):
                if s2 < e1 - tol:
                    fail(f"{what} {d!r}: {n1} and {n2} overlap ({s2:.6g} ms < {e1:.6g} ms)")
    makespan = max(
        [
            *end.values(),
            *(x.arrival_ms for x in xfers.values()),
        ],
        default=0.0,
    )
    if not math.isclose(placement.makespan_ms, makespan, rel_tol=1e-9, abs_tol=tol):
        fail(f"makespan_ms is {placement.makespan_ms:.6g} but the schedule ends at {makespan:.6g}")
    if placement.period_ms is not None:
        cycle = period(p, [p.device_index[a[t]] for t in p.tasks])
        if not math.isclose(placement.period_ms, cycle, rel_tol=1e-9, abs_tol=1e-12):
            fail(f"period_ms is {placement.period_ms:.6g} but the assignment's is {cycle:.6g}")
    return makespan
