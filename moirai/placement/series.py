"""Series decomposition: solve a graph piece by piece between its cut vertices, exactly.

A *cut vertex* is a task that every other task reaches or is reached from (a concat that closes
an Inception module, the layer norm after a residual add, every layer of a chain); with the
edges that jump over it left out (they are transitively implied; leaving them out is a
relaxation, see `segments`), every path from a source to a sink passes through it. Between two
consecutive cut vertices u and v lies a *segment*: the tasks that descend from u and lead to v
(plus a prefix before the first cut vertex and a suffix after the last). Under the execution
model the segments are separated in time: every operation of a segment (its tasks and their
transfers, those out of u and into v included) ends before v starts, and every operation of the
next one starts after v ends. So, given the devices of the cut vertices, a plan's makespan is
the sum of the cut vertices' compute times and of each segment's *span* (from u's end to v's
start), and each span depends only on that segment's own schedule and on the devices of u and
v.

Hence, with `span_m(a, b)` the least span of segment m when its entry runs on a and its exit on
b, the optimum is the cheapest path through a layered graph of (cut vertex, device) nodes —
exactly, when memory does not bind (device memory is shared by all segments, the only coupling
between them). This module keeps, for every segment and device pair, a lower bound and an
upper bound with a schedule that attains it:

- bounds start from the device-aware critical path inside the segment with its ends fixed
  (heads as in `bounds.heads_tails`), upper bounds from running the segment on one device, one
  task after another (a valid schedule whatever the other segments do);
- the cheapest path through the lower bounds is a lower bound of the whole problem (each
  segment's sub-problem, memory included, is a relaxation of the part of any plan it covers);
- that path is then refined where it is not exact: each of its segments is solved by CP-SAT
  with its entry and exit pinned (`cpsat.solve_cpsat` on a small sub-problem, one segment per
  thread), which raises its bound and lowers its upper bound, and the path is recomputed,
  until the path is exact (proven optimal, when memory allows the plan) or the time is up.
  Only segments on the current best path are ever solved, so a graph with hundreds of
  segments takes few solves;
- the cheapest path through the upper bounds, its segment schedules laid end to end, is a plan
  (re-timed by the simulator), kept when it fits the device memories;
- interchangeable devices (`PlacementProblem.twins`: a node's identical GPUs, a CPU split into
  equal parts) make many pairs of end devices equivalent; one of each is solved (`Twins`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from moirai.costgraph import CostGraph, Edge, Task
from moirai.errors import InfeasibleError
from moirai.placement.contract import SolveOptions, side_by_side
from moirai.placement.cpsat import solve_cpsat
from moirai.placement.problem import PlacementProblem
from moirai.placement.simulate import Schedule, retime

FIRST_SOLVE_WORK = 0.1
"""CP-SAT deterministic time of a segment's first exact solve; an unfinished one gets twice as
much the next time it is on the cheapest path. A work limit, not a time limit, so that the
decomposition reaches the same plan on an idle and on a loaded machine (the phase's deadline
only stops it when the machine is far slower than expected). Proving an Inception module of 13
to 22 tasks on 4 devices takes 0.01 to 0.03."""
MAX_TRIES = 8
"""Exact solves of one span before it keeps its bound (the last gets 128x the first's work).
The phase's deadline ends the solves before that on most graphs that need so many; at 4 (8x)
a 602-task Inception-style graph kept a bound 0.05% under its plan for the whole minute, where
its fifth to eighth solves prove the plan optimal within 6 s."""
MAX_SEGMENT_TASKS = 60
"""Larger segments keep their cheap bounds and one-device plans: CP-SAT would spend the time
on them without a proof, and the rest of `auto` searches the whole graph anyway."""
SEGMENT_PARAMETERS = {"linearization_level": 0}
"""Segments are small: CP-SAT proves them by propagation and search several times faster
without its linear relaxation (0.02 against 0.15 deterministic seconds on Inception modules)."""
NONE = -1
"""The device of a missing end (the prefix has no entry, the suffix no exit)."""


def cut_vertices(problem: PlacementProblem) -> list[int]:
    """Tasks every other task reaches or is reached from, in topological order.

    Such a task lies on every source-to-sink path once the edges that jump over it are left
    out; those edges are transitively implied (their source reaches their destination through
    it), and `segments` drops them: see there.
    """
    p = problem
    full = p.n - 1
    return [
        i for i in range(p.n) if p.descendants[i].bit_count() + p.ancestors[i].bit_count() == full
    ]


@dataclass
class Span:
    """What is known of one segment's span for one pair of end devices."""

    bound: float
    value: float
    """The span of `starts` (math.inf when no schedule is known)."""
    assign: dict[int, int] = field(default_factory=dict)
    """Device of each inner task."""
    starts: dict[int, float] = field(default_factory=dict)
    """Start of each inner task, from the entry's end."""
    transfers: dict[int, float] = field(default_factory=dict)
    """Start of each cross-device transfer (by edge index), from the entry's end."""
    exact: bool = False
    tries: int = 0
    """Exact solves so far."""


@dataclass
class Segment:
    entry: int
    """Cut vertex before the segment (`NONE` for the prefix)."""
    exit: int
    """Cut vertex after it (`NONE` for the suffix)."""
    inner: list[int]
    edges: list[int]
    """Edges whose both ends are in the segment or its ends (transfers that happen in it)."""
    spans: dict[tuple[int, int], Span] = field(default_factory=dict)
    sub: CostGraph | None = None


def segments(problem: PlacementProblem, cuts: Sequence[int]) -> tuple[list[Segment], int]:
    """The segments between consecutive cut vertices, with a prefix and a suffix, and how many
    edges jump over a cut vertex.

    Such an edge (u before a cut vertex, v after it; u reaches v through it anyway) belongs to
    no segment: its transfer may overlap the cut vertex, which would couple the segments. The
    decomposition solves the problem without those edges, a relaxation, so its bound stays
    valid; its plan is re-timed on the whole problem (jumping transfers included).
    """
    p = problem
    ends = [NONE, *cuts, NONE]
    where = {c: m for m, c in enumerate(cuts)}
    out = [Segment(ends[m], ends[m + 1], [], []) for m in range(len(cuts) + 1)]
    position = {}
    m = 0
    for i in range(p.n):  # topological: a task lies between the cut vertices around it
        if i in where:
            m = where[i] + 1
            continue
        position[i] = m
        out[m].inner.append(i)
    jumps = 0
    for e, (i, j) in enumerate(p.edges):
        m = where[j] if j in where else position[j]
        if position.get(i) == m or i == out[m].entry:
            out[m].edges.append(e)
        else:
            jumps += 1
    return out, jumps


class Twins:
    """Pairs of end devices up to swaps of interchangeable devices (`PlacementProblem.twins`):
    a segment's span is the same for (a, b) and its image, so one of them is solved."""

    def __init__(self, problem: PlacementProblem) -> None:
        self.problem = problem
        self.classes: dict[int, list[int]] = {}
        for k, r in enumerate(problem.twins):
            self.classes.setdefault(r, []).append(k)
        self._cache: dict[tuple[int, int], tuple[tuple[int, int], list[int]]] = {}

    def _resolve(self, a: int, b: int) -> tuple[tuple[int, int], list[int]]:
        hit = self._cache.get((a, b))
        if hit is not None:
            return hit
        back = list(range(self.problem.num_devices))  # canonical label -> actual device
        for members in self.classes.values():
            first = [k for k in dict.fromkeys((a, b)) if k in members]
            order = first + [k for k in members if k not in first]
            for canon, actual in zip(members, order, strict=True):
                back[canon] = actual
        forward = {actual: canon for canon, actual in enumerate(back)}
        key = (forward.get(a, NONE), forward.get(b, NONE))
        self._cache[a, b] = (key, back)
        return key, back

    def canonical(self, a: int, b: int) -> tuple[int, int]:
        return self._resolve(a, b)[0]

    def back(self, a: int, b: int) -> list[int]:
        """Maps the devices of `canonical(a, b)`'s schedules to those of (a, b)."""
        return self._resolve(a, b)[1]


# --------------------------------------------------------------- cheap spans
def _cheap_spans(problem: PlacementProblem, seg: Segment, twins: Twins) -> None:
    """Bounds and one-device schedules for every pair of end devices (no solver)."""
    p = problem
    entries = p.cand[seg.entry] if seg.entry != NONE else (NONE,)
    exits = p.cand[seg.exit] if seg.exit != NONE else (NONE,)
    into_exit = [e for e in seg.edges if p.edges[e][1] == seg.exit]
    pairs = sorted({twins.canonical(a, b) for a in entries for b in exits})
    heads = {a: _heads(p, seg, a) for a in sorted({a for a, _ in pairs})}
    for a, b in pairs:
        span = seg.spans[a, b] = Span(_cheap_bound(p, seg, heads[a], into_exit, a, b), math.inf)
        for k in range(p.num_devices):
            _one_device(p, seg, a, b, k)
        if span.value <= span.bound * (1 + 1e-12):  # e.g. consecutive cut vertices
            span.exact = True


def _cheap_bound(
    p: PlacementProblem,
    seg: Segment,
    head: dict[int, dict[int, float]],
    into_exit: Sequence[int],
    a: int,
    b: int,
) -> float:
    """The device-aware critical path through the segment with its ends on a and b."""
    if b == NONE:  # the suffix: the end of its last task
        return max(
            (min(head[i][k] + p.compute[i][k] for k in p.cand[i]) for i in seg.inner),
            default=0.0,
        )
    bound = 0.0
    for e in into_exit:
        j = p.edges[e][0]
        if j == seg.entry:
            bound = max(bound, p.transfer[e][a][b])
            continue
        arrive = min(head[j][k] + p.compute[j][k] + p.transfer[e][k][b] for k in p.cand[j])
        bound = max(bound, arrive)
    return bound


def _heads(p: PlacementProblem, seg: Segment, a: int) -> dict[int, dict[int, float]]:
    """Earliest start of each inner task on each device, from the entry's end on device a."""
    head: dict[int, dict[int, float]] = {}
    into: dict[int, list[int]] = {}
    for e in seg.edges:
        into.setdefault(p.edges[e][1], []).append(e)
    for i in seg.inner:
        head[i] = {}
        for k in p.cand[i]:
            h = 0.0
            for e in into.get(i, ()):
                j = p.edges[e][0]
                if j == seg.entry:
                    h = max(h, p.transfer[e][a][k])
                else:
                    h = max(
                        h,
                        min(head[j][c] + p.compute[j][c] + p.transfer[e][c][k] for c in p.cand[j]),
                    )
            head[i][k] = h
    return head


def _one_device(p: PlacementProblem, seg: Segment, a: int, b: int, k: int) -> None:
    """Run every inner task on device k one after another, then the transfers into the exit:
    a valid schedule of the segment (entry on a, exit on b) whatever happens around it."""
    if any(k not in p.cand[i] for i in seg.inner):
        return
    t = 0.0
    transfers: dict[int, float] = {}
    for e in seg.edges:  # transfers out of the entry first, one at a time
        i, j = p.edges[e]
        if i == seg.entry and a != k and j != seg.exit:
            transfers[e] = t
            t += p.transfer[e][a][k]
    starts = {}
    for i in seg.inner:
        starts[i] = t
        t += p.compute[i][k]
    for e in seg.edges:
        i, j = p.edges[e]
        if j == seg.exit and b != NONE:
            src = a if i == seg.entry else k
            if src != b:
                transfers[e] = t
                t += p.transfer[e][src][b]
    span = seg.spans[a, b]
    if t < span.value:
        span.value = t
        span.assign = dict.fromkeys(seg.inner, k)
        span.starts = starts
        span.transfers = transfers


# --------------------------------------------------------------- exact spans
def _subgraph(problem: PlacementProblem, seg: Segment) -> CostGraph:
    """The segment as a cost graph of its own: its ends take no time, every edge carries its
    transfer matrix, devices have the problem's (limited) memories."""
    p = problem
    cg = p.costgraph
    names = p.devices

    def task(i: int, free: bool) -> Task:
        t = cg.task[p.tasks[i]]
        times = {names[k]: 0.0 if free else p.compute[i][k] for k in p.cand[i]}
        return Task(t.id, times, p.mem[i])

    tasks = [task(i, False) for i in seg.inner]
    tasks += [task(i, True) for i in (seg.entry, seg.exit) if i != NONE]
    edges = []
    for e in seg.edges:
        i, j = p.edges[e]
        matrix = {
            names[a]: {names[b]: p.transfer[e][a][b] for b in p.cand[j] if b != a}
            for a in p.cand[i]
        }
        edges.append(Edge(p.tasks[i], p.tasks[j], 0, matrix))
    devices = tuple(dataclasses.replace(d, memory_bytes=p.cap[k]) for k, d in enumerate(cg.devices))
    return CostGraph(f"{cg.name}-segment", devices, tuple(tasks), tuple(edges))


def _solve_exact(
    problem: PlacementProblem, seg: Segment, a: int, b: int, options: SolveOptions
) -> None:
    """Solve the segment with its ends on a and b by CP-SAT; tighten that pair's span."""
    p = problem
    span = seg.spans[a, b]
    span.tries += 1
    limit = options.remaining()
    if limit <= 0.05:
        return
    if seg.sub is None:
        seg.sub = _subgraph(p, seg)
    pins = {p.tasks[c]: p.devices[k] for c, k in ((seg.entry, a), (seg.exit, b)) if c != NONE}
    try:
        sub = PlacementProblem(seg.sub, pins=pins)
        work = FIRST_SOLVE_WORK * 2 ** (span.tries - 1)
        plan = solve_cpsat(
            sub,
            dataclasses.replace(
                options,
                time_limit=limit,
                deadline=0.0,
                origin=0.0,
                threads=1,
                progress=None,
                hint=None,
                work_limit=work,
            ),
            parameters=SEGMENT_PARAMETERS,
        )
    except InfeasibleError:  # these end devices leave no room for the segment's tasks
        span.bound = span.value = math.inf
        span.exact = True
        return
    origin = 0.0
    if seg.entry != NONE:
        origin = next(s.end_ms for s in plan.schedule if s.task == p.tasks[seg.entry])
    value = plan.makespan_ms - origin
    if seg.exit != NONE:
        value = next(s.start_ms for s in plan.schedule if s.task == p.tasks[seg.exit]) - origin
    span.bound = max(span.bound, plan.lower_bound_ms - origin)
    if value < span.value:
        span.value = value
        index = p.task_index
        span.assign = {
            index[t]: p.device_index[d]
            for t, d in plan.assignment.items()
            if index[t] not in (seg.entry, seg.exit)
        }
        span.starts = {
            index[s.task]: s.start_ms - origin
            for s in plan.schedule
            if index[s.task] not in (seg.entry, seg.exit)
        }
        edge_of = {(p.tasks[p.edges[e][0]], p.tasks[p.edges[e][1]]): e for e in seg.edges}
        span.transfers = {edge_of[x.src, x.dst]: x.start_ms - origin for x in plan.transfers}
    span.exact = plan.status == "optimal"
    if span.exact:
        span.bound = span.value


# ------------------------------------------------------------------------ path
def _cheapest_path(
    problem: PlacementProblem,
    cuts: Sequence[int],
    segs: Sequence[Segment],
    twins: Twins,
    upper: bool,
) -> tuple[float, list[int]]:
    """Least total through the cut vertices' devices, by bounds or by upper bounds (values);
    the value and the device of each cut vertex."""
    p = problem

    def cost(seg: Segment, a: int, b: int) -> float:
        span = seg.spans[twins.canonical(a, b)]
        return span.value if upper else span.bound

    best = {k: cost(segs[0], NONE, k) for k in p.cand[cuts[0]]}
    back: list[dict[int, int]] = []
    for m, c in enumerate(cuts):
        for k in best:
            best[k] += p.compute[c][k]
        if m + 1 == len(cuts):
            break
        nxt: dict[int, float] = {}
        came: dict[int, int] = {}
        for b in p.cand[cuts[m + 1]]:
            a = min(best, key=lambda a: (best[a] + cost(segs[m + 1], a, b), a))
            nxt[b] = best[a] + cost(segs[m + 1], a, b)
            came[b] = a
        back.append(came)
        best = nxt
    final = {k: v + cost(segs[-1], k, NONE) for k, v in best.items()}
    k = min(final, key=lambda k: (final[k], k))
    path = [k]
    for came in reversed(back):
        path.append(came[path[-1]])
    path.reverse()
    return final[k], path


def _pairs(cuts: Sequence[int], path: Sequence[int]) -> list[tuple[int, int]]:
    ends = [NONE, *path, NONE]
    return [(ends[m], ends[m + 1]) for m in range(len(cuts) + 1)]


@dataclass
class Decomposition:
    bound: float
    plan: Schedule | None
    segments: int
    solves: int
    exact: bool
    """Whether the bound is the optimum of the problem without memory coupling (and without
    the edges that jump over a cut vertex, when there are any)."""
    jumps: int
    largest: int = 0
    """Tasks in the largest segment: a graph whose segments are all small is one the series
    bound sees nearly whole."""


def decompose(problem: PlacementProblem, options: SolveOptions) -> Decomposition | None:
    """The series bound and plan, refined until exact or `options`' deadline; None for the
    throughput objective (no schedule to split) or a graph without a cut vertex."""
    p = problem
    if p.objective != "latency":
        return None
    cuts = cut_vertices(p)
    if not cuts:
        return None
    segs, jumps = segments(p, cuts)
    twins = Twins(p)
    for seg in segs:
        _cheap_spans(p, seg, twins)
    solves = 0
    while True:
        bound, path = _cheapest_path(p, cuts, segs, twins, upper=False)
        unproven = [
            (seg, *twins.canonical(a, b))
            for seg, (a, b) in zip(segs, _pairs(cuts, path), strict=True)
            if not seg.spans[twins.canonical(a, b)].exact
        ]
        todo = [
            (seg, a, b)
            for seg, a, b in unproven
            if len(seg.inner) <= MAX_SEGMENT_TASKS and seg.spans[a, b].tries < MAX_TRIES
        ]
        if not todo or options.remaining() <= 0.05:
            break
        # a segment per thread: the path holds each segment once, and each solve is
        # single-threaded, limited by work and touches only its own segment, so the spans are
        # the same whatever the threads or the order the solves end in
        jobs = [functools.partial(_solve_exact, p, seg, a, b, options) for seg, a, b in todo]
        side_by_side(jobs, options.threads)
        solves += len(todo)
    exact = not unproven
    value, path = _cheapest_path(p, cuts, segs, twins, upper=True)
    plan = _plan(p, cuts, segs, twins, path) if math.isfinite(value) else None
    largest = max(len(seg.inner) for seg in segs)
    return Decomposition(bound, plan, len(segs), solves, exact, jumps, largest)


def _plan(
    problem: PlacementProblem,
    cuts: Sequence[int],
    segs: Sequence[Segment],
    twins: Twins,
    path: Sequence[int],
) -> Schedule | None:
    """The segments' schedules laid end to end (None when they overfill a device's memory)."""
    p = problem
    assign = [NONE] * p.n
    starts = [0.0] * p.n
    transfers: dict[int, float] = {}
    clock = 0.0
    for m, (seg, (a, b)) in enumerate(zip(segs, _pairs(cuts, path), strict=True)):
        span = seg.spans[twins.canonical(a, b)]
        back = twins.back(a, b)
        for i, k in span.assign.items():
            assign[i] = back[k]
            starts[i] = clock + span.starts[i]
        for e, s in span.transfers.items():
            transfers[e] = clock + s
        clock += span.value
        if m < len(cuts):
            assign[cuts[m]] = path[m]
            starts[cuts[m]] = clock
            clock += p.compute[cuts[m]][path[m]]
    used = [0] * p.num_devices
    for i, k in enumerate(assign):
        used[k] += p.mem[i]
    if any(u > c for u, c in zip(used, p.cap, strict=True)):
        return None
    return retime(p, assign, starts, transfers)
