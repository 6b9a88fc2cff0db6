"""`milp`: the paper's mixed-integer program, on HiGHS (default) or Gurobi.

Moirai's formulation (Zhang et al., arXiv 2312.04025): assignment, ordering, transfer and
congestion variables and memory, written against our execution model (`costgraph.md`), where
congestion means one transfer at a time per device send port and per receive port. For tasks
i, devices k in `cand[i]`, edges e = (i, j):

- assignment `x[i,k]` binary, `sum_k x[i,k] = 1`; memory `sum_i mem_i x[i,k] <= cap_k`;
- start `S_i >= 0`, compute time `P_i = sum_k p[i,k] x[i,k]`;
- transfer indicator `y[e,a,b] >= x[i,a] + x[j,b] - 1` for a != b (continuous in [0, 1]: at an
  integral x its least value is integral, and a larger one only lengthens transfers, so it is
  never chosen at an optimum and a plan is re-timed from x anyway), at most one pair per edge
  (so the port indicators below stay <= 1); transfer start `T_e`, duration
  `D_e = sum tau[e,a,b] y[e,a,b]`; precedence `T_e >= S_i + P_i`, `S_j >= T_e + D_e`;
- non-overlap on a device: for each pair of tasks that precedence does not already order and
  that share a candidate device, an order binary `o` and, per shared device k,
  `S_j >= S_i + p[i,k] - M(1 - o) - M(2 - x[i,k] - x[j,k])` and the converse;
- congestion: for each pair of transfers not ordered by precedence that may leave the same
  device (or enter the same device), an order binary `q` and, per such port, the same
  disjunction with `send[e,a] = sum_b y[e,a,b]` (`recv[e,b] = sum_a y[e,a,b]`) as indicators
  (pairs with a zero transfer time are left out: a zero-length transfer occupies no port);
- hop work (`problem.hop_work`, on devices that pay for their transfers): the sender's share
  of edge e starts with its transfer (`T_e`, length `sum_b send[e,a,b] y[e,a,b]` on device a),
  the receiver's at `R_e >= T_e + sum (tau - recv) y`, with `S_j >= R_e + sum recv y`; each is
  one more operation on its device, in the same big-M disjunctions against every task and
  every other hop's work there that precedence does not order (a sender's shares on one device
  are already apart: their transfers hold its send port for longer). These pairs grow with
  tasks x edges, so on CPU devices the model is larger; `count_rows` counts them, and a model
  past `MAX_ROWS` returns its warm start as before;
- makespan `C >= S_i + sum_k tail[i,k] x[i,k]` for every task, minimised, and release times
  `S_i >= sum_k head[i,k] x[i,k]` (`bounds.heads_tails`) and `C >=` each device's load
  (redundant, they tighten the LP).

Big-M is the horizon: the makespan of the heuristic warm start, also imposed as an upper bound
on every time (so no constant is ever guessed). The warm start is passed as a MIP start.

`throughput` drops the schedule: minimise the period `Z >= sum_i p[i,k] x[i,k]` (each device,
plus `sum tau[e,a,b] y[e,a,b]` over the transfers into or out of it when it pays for its
transfers, `simulate.loads`), `Z >= sum send times` of each device's send port and `Z >=` its
receive port's; the plan's latency is then that assignment list-scheduled.

The model is built once as a solver-neutral `LinearModel` (columns, rows in compressed form)
and handed to a backend. Gurobi's pip licence stops at 2000 variables and 2000 constraints:
larger models go to HiGHS with a message (checked before, and error 10010 caught after).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from moirai.errors import InfeasibleError, SolverError
from moirai.placement.bounds import heads_tails, lower_bound, serial_horizon, settle
from moirai.placement.contract import (
    SolveOptions,
    fall_back,
    interruptible,
    no_plan,
    stoppable,
)
from moirai.placement.lp import new_highs, run_highs
from moirai.placement.problem import PlacementProblem
from moirai.placement.result import Placement
from moirai.placement.simulate import list_schedule, retime
from moirai.placement.warm import warm_start

GUROBI_SIZE_LIMIT = 2000
MAX_ROWS = 400_000
"""Beyond this the disjunctive model is hopeless within any sensible limit; return the start."""


# ------------------------------------------------------------ neutral model
@dataclass
class LinearModel:
    """min c.x subject to row_lo <= A x <= row_hi, col_lo <= x <= col_hi, some x integer."""

    col_lo: list[float] = field(default_factory=list)
    col_hi: list[float] = field(default_factory=list)
    integer: list[bool] = field(default_factory=list)
    cost: list[float] = field(default_factory=list)
    row_lo: list[float] = field(default_factory=list)
    row_hi: list[float] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    index: list[int] = field(default_factory=list)
    value: list[float] = field(default_factory=list)

    @property
    def num_cols(self) -> int:
        return len(self.col_lo)

    @property
    def num_rows(self) -> int:
        return len(self.row_lo)

    def var(self, lo: float, hi: float, integer: bool = False, cost: float = 0.0) -> int:
        self.col_lo.append(lo)
        self.col_hi.append(hi)
        self.integer.append(integer)
        self.cost.append(cost)
        return len(self.col_lo) - 1

    def row(self, terms: dict[int, float], lo: float, hi: float) -> None:
        self.starts.append(len(self.index))
        for c, v in terms.items():
            if v != 0.0:
                self.index.append(c)
                self.value.append(v)
        self.row_lo.append(lo)
        self.row_hi.append(hi)


def _add(terms: dict[int, float], col: int, coef: float) -> None:
    terms[col] = terms.get(col, 0.0) + coef


@dataclass
class Formulation:
    """The MILP of a problem and where its variables sit (for MIP starts and extraction)."""

    model: LinearModel
    x: list[dict[int, int]]
    y: dict[tuple[int, int, int], int]
    start: list[int]
    tstart: dict[int, int]
    rstart: dict[int, int]
    order: dict[tuple[int, int], int]
    xorder: dict[tuple[int, int], int]
    horder: dict[tuple[Any, Any], int]
    """Order binaries of hop work against a task (`(op, i)`) or other hop work (`(op, op)`):
    1 when the first comes first."""
    objective: int
    horizon: float


def count_rows(problem: PlacementProblem, limit: int = MAX_ROWS) -> int:
    """Rows the latency model will have, counted up to a little past `limit`."""
    p = problem
    rows = 2 * p.n + p.num_devices + 2 * len(p.edges)
    for i in range(p.n):
        ci = set(p.cand[i])
        for j in range(i + 1, p.n):
            if not p.ordered(i, j):
                rows += 2 * len(ci.intersection(p.cand[j]))
        if rows > limit:
            return rows
    if p.has_hop_work:
        ops = _hop_ops(p)
        for k, items in ops.items():
            tasks = [i for i in range(p.n) if k in p.cand[i] and p.compute[i][k] > 0]
            for _, e, _ in items:
                rows += 2 * sum(not _task_hop_ordered(p, i, e) for i in tasks)
                if rows > limit:
                    return rows
            rows += 2 * len(_hop_pairs(p, items))
            if rows > limit:
                return rows
    ne = len(p.edges)
    for e in range(ne):
        rows += len(p.cand[p.edges[e][0]]) * len(p.cand[p.edges[e][1]])
        for f in range(e + 1, ne):
            if not _transfers_ordered(p, e, f):
                rows += 4 * p.num_devices
        if rows > limit:
            return rows
    return rows


def _transfers_ordered(p: PlacementProblem, e: int, f: int) -> bool:
    """Whether precedence orders transfers e and f (one's destination reaches the other's
    source)."""
    (a, b), (c, d) = p.edges[e], p.edges[f]
    return (
        b == c or d == a or bool((p.descendants[b] >> c) & 1) or bool((p.descendants[d] >> a) & 1)
    )


HopOp = tuple[str, int, int]
"""Hop work on a device: (`send` or `recv`, edge, device)."""


def _hop_ops(p: PlacementProblem) -> dict[int, list[HopOp]]:
    """Per device, the hop work that may land on it (some candidate pair gives it a share)."""
    out: dict[int, list[HopOp]] = {}
    for e, (i, j) in enumerate(p.edges):
        for k in range(p.num_devices):
            if any(p.send_work[e][k][b] > 0 for b in p.cand[j] if k in p.cand[i]):
                out.setdefault(k, []).append(("send", e, k))
            if any(p.recv_work[e][a][k] > 0 for a in p.cand[i] if k in p.cand[j]):
                out.setdefault(k, []).append(("recv", e, k))
    return out


def _task_hop_ordered(p: PlacementProblem, i: int, e: int) -> bool:
    """Whether precedence orders task i and the hop work of edge e = (u, v), which lies
    between u's end and v's start."""
    u, v = p.edges[e]
    return i in (u, v) or bool((p.descendants[i] >> u) & 1) or bool((p.descendants[v] >> i) & 1)


def _hop_pairs(p: PlacementProblem, items: list[HopOp]) -> list[tuple[HopOp, HopOp]]:
    """Pairs of hop work on one device that need a disjunction: not ordered by precedence, and
    not two senders' shares (their transfers already hold the send port apart)."""
    return [
        (h, g)
        for n1, h in enumerate(items)
        for g in items[n1 + 1 :]
        if h[1] != g[1] and not (h[0] == g[0] == "send") and not _transfers_ordered(p, h[1], g[1])
    ]


def build(problem: PlacementProblem, horizon: float) -> Formulation:
    p = problem
    m = LinearModel()
    big = horizon
    x = [{k: m.var(0.0, 1.0, integer=True) for k in p.cand[i]} for i in range(p.n)]
    for i in range(p.n):
        m.row(dict.fromkeys(x[i].values(), 1.0), 1.0, 1.0)
    for k in range(p.num_devices):
        terms = {x[i][k]: float(p.mem[i]) for i in range(p.n) if k in x[i]}
        if terms and sum(terms.values()) > p.cap[k]:
            m.row(terms, -math.inf, float(p.cap[k]))
    y: dict[tuple[int, int, int], int] = {}
    for e, (i, j) in enumerate(p.edges):
        ys = []
        for a in p.cand[i]:
            for b in p.cand[j]:
                if a != b:
                    y[e, a, b] = col = m.var(0.0, 1.0)
                    ys.append(col)
                    m.row({col: 1.0, x[i][a]: -1.0, x[j][b]: -1.0}, -1.0, math.inf)
        if len(ys) > 1:  # at most one pair, so indicators below stay <= 1
            m.row(dict.fromkeys(ys, 1.0), -math.inf, 1.0)

    if p.objective == "throughput":
        z = m.var(0.0, math.inf, cost=1.0)
        for k in range(p.num_devices):
            device = {z: 1.0, **{x[i][k]: -p.compute[i][k] for i in range(p.n) if k in x[i]}}
            send: dict[int, float] = {z: 1.0}
            recv: dict[int, float] = {z: 1.0}
            for (e, a, b), col in y.items():
                if a == k:
                    _add(send, col, -p.transfer[e][a][b])
                if b == k:
                    _add(recv, col, -p.transfer[e][a][b])
                if k in (a, b) and p.pays_for_transfers[k]:
                    _add(device, col, -p.transfer[e][a][b])
            m.row(device, 0.0, math.inf)
            m.row(send, 0.0, math.inf)
            m.row(recv, 0.0, math.inf)
        return Formulation(m, x, y, [], {}, {}, {}, {}, {}, z, horizon)

    start = [m.var(0.0, horizon) for _ in range(p.n)]

    def finish(i: int) -> dict[int, float]:  # S_i + P_i as terms
        terms = {start[i]: 1.0}
        for k, col in x[i].items():
            terms[col] = p.compute[i][k]
        return terms

    def duration(e: int, scale: float) -> dict[int, float]:
        i, j = p.edges[e]
        return {
            y[e, a, b]: scale * p.transfer[e][a][b] for a in p.cand[i] for b in p.cand[j] if a != b
        }

    cmax = m.var(0.0, horizon, cost=1.0)
    tstart: dict[int, int] = {}
    for e, (i, j) in enumerate(p.edges):
        can_cross = any(a != b for a in p.cand[i] for b in p.cand[j])
        if can_cross:
            t = tstart[e] = m.var(0.0, horizon)
            m.row({t: 1.0, **{c: -v for c, v in finish(i).items()}}, 0.0, math.inf)
            m.row({start[j]: 1.0, t: -1.0, **duration(e, -1.0)}, 0.0, math.inf)
        else:
            m.row({start[j]: 1.0, **{c: -v for c, v in finish(i).items()}}, 0.0, math.inf)
    for k in range(p.num_devices):  # C >= each device's load (redundant, tightens the LP)
        load = {x[i][k]: -p.compute[i][k] for i in range(p.n) if k in x[i]}
        if load:
            m.row({cmax: 1.0, **load}, 0.0, math.inf)
    head, tail = heads_tails(p)  # tail includes the task: this also gives C >= S_i + P_i
    for i in range(p.n):
        m.row({start[i]: 1.0, **{x[i][k]: -head[i][k] for k in x[i]}}, 0.0, math.inf)
        m.row({cmax: 1.0, start[i]: -1.0, **{x[i][k]: -tail[i][k] for k in x[i]}}, 0.0, math.inf)

    order: dict[tuple[int, int], int] = {}
    for i in range(p.n):
        for j in range(i + 1, p.n):
            shared = [k for k in p.cand[i] if k in x[j]]
            if not shared or p.ordered(i, j):
                continue
            shared = [k for k in shared if p.compute[i][k] > 0 and p.compute[j][k] > 0]
            if not shared:
                continue
            o = order[i, j] = m.var(0.0, 1.0, integer=True)
            for k in shared:
                # i before j (o = 1): S_j >= S_i + p_ik - M(1-o) - M(2 - x_ik - x_jk)
                terms = {start[j]: 1.0, start[i]: -1.0, o: -big, x[i][k]: -big, x[j][k]: -big}
                m.row(terms, p.compute[i][k] - 3 * big, math.inf)
                terms = {start[i]: 1.0, start[j]: -1.0, o: big, x[i][k]: -big, x[j][k]: -big}
                m.row(terms, p.compute[j][k] - 2 * big, math.inf)

    rstart: dict[int, int] = {}
    horder: dict[tuple[Any, Any], int] = {}
    if p.has_hop_work:
        _hop_rows(p, m, x, y, start, tstart, rstart, horder, big)

    xorder: dict[tuple[int, int], int] = {}
    edges = sorted(tstart)
    for n1, e in enumerate(edges):
        for f in edges[n1 + 1 :]:
            if _transfers_ordered(p, e, f):
                continue
            (ie, je), (if_, jf) = p.edges[e], p.edges[f]
            ports: list[tuple[list[int], list[int]]] = []
            for k in range(p.num_devices):
                # indicators of "e (f) occupies k's send (receive) port for a positive time"
                se = [y[e, k, b] for b in p.cand[je] if (e, k, b) in y and p.transfer[e][k][b] > 0]
                sf = [y[f, k, b] for b in p.cand[jf] if (f, k, b) in y and p.transfer[f][k][b] > 0]
                if se and sf:
                    ports.append((se, sf))
                re = [y[e, a, k] for a in p.cand[ie] if (e, a, k) in y and p.transfer[e][a][k] > 0]
                rf = [y[f, a, k] for a in p.cand[if_] if (f, a, k) in y and p.transfer[f][a][k] > 0]
                if re and rf:
                    ports.append((re, rf))
            if not ports:
                continue
            q = xorder[e, f] = m.var(0.0, 1.0, integer=True)
            for ind_e, ind_f in ports:
                # e before f (q = 1): T_f >= T_e + D_e - M(1-q) - M(2 - ind_e - ind_f)
                terms = {tstart[f]: 1.0, tstart[e]: -1.0, q: -big}
                for c, v in duration(e, -1.0).items():
                    _add(terms, c, v)
                for c in (*ind_e, *ind_f):
                    _add(terms, c, -big)
                m.row(terms, -3 * big, math.inf)
                terms = {tstart[e]: 1.0, tstart[f]: -1.0, q: big}
                for c, v in duration(f, -1.0).items():
                    _add(terms, c, v)
                for c in (*ind_e, *ind_f):
                    _add(terms, c, -big)
                m.row(terms, -2 * big, math.inf)
    return Formulation(m, x, y, start, tstart, rstart, order, xorder, horder, cmax, horizon)


def _hop_rows(
    p: PlacementProblem,
    m: LinearModel,
    x: list[dict[int, int]],
    y: dict[tuple[int, int, int], int],
    start: list[int],
    tstart: dict[int, int],
    rstart: dict[int, int],
    horder: dict[tuple[Any, Any], int],
    big: float,
) -> None:
    """The hop work's start times, precedence and disjunctions (module docstring)."""
    horizon = big
    for e, (i, j) in enumerate(p.edges):
        keys = [(e, a, b) for a in p.cand[i] for b in p.cand[j] if (e, a, b) in y]
        if e not in tstart or not any(p.recv_work[e][a][b] > 0 for _, a, b in keys):
            continue
        r = rstart[e] = m.var(0.0, horizon)
        terms = {r: 1.0, tstart[e]: -1.0}
        for key in keys:
            _add(terms, y[key], -(p.transfer[e][key[1]][key[2]] - p.recv_work[e][key[1]][key[2]]))
        m.row(terms, 0.0, math.inf)
        terms = {start[j]: 1.0, r: -1.0}
        for key in keys:
            _add(terms, y[key], -p.recv_work[e][key[1]][key[2]])
        m.row(terms, 0.0, math.inf)

    def shape(op: HopOp) -> tuple[int, dict[int, float], list[int]]:
        """Start column, length terms and presence indicators of hop work on its device."""
        kind, e, k = op
        i, j = p.edges[e]
        if kind == "send":
            pairs = [(k, b) for b in p.cand[j] if (e, k, b) in y and p.send_work[e][k][b] > 0]
            work = p.send_work
            col = tstart[e]
        else:
            pairs = [(a, k) for a in p.cand[i] if (e, a, k) in y and p.recv_work[e][a][k] > 0]
            work = p.recv_work
            col = rstart[e]
        length = {y[e, a, b]: work[e][a][b] for a, b in pairs}
        return col, length, [y[e, a, b] for a, b in pairs]

    def disjunction(
        first: tuple[int, dict[int, float]],
        second: tuple[int, dict[int, float]],
        indicators: list[int],
        o: int,
    ) -> None:
        """first before second when o = 1, second before first when o = 0, if both present."""
        (s1, len1), (s2, len2) = first, second
        terms = {s2: 1.0, s1: -1.0, o: -big}
        for c, v in len1.items():
            _add(terms, c, -v)
        for c in indicators:
            _add(terms, c, -big)
        m.row(terms, -3 * big, math.inf)
        terms = {s1: 1.0, s2: -1.0, o: big}
        for c, v in len2.items():
            _add(terms, c, -v)
        for c in indicators:
            _add(terms, c, -big)
        m.row(terms, -2 * big, math.inf)

    for k, items in _hop_ops(p).items():
        tasks = [i for i in range(p.n) if k in p.cand[i] and p.compute[i][k] > 0]
        shapes = {op: shape(op) for op in items}
        for op in items:
            col, length, ind = shapes[op]
            for i in tasks:
                if _task_hop_ordered(p, i, op[1]):
                    continue
                o = horder[op, i] = m.var(0.0, 1.0, integer=True)
                task = (start[i], {x[i][k]: p.compute[i][k]})
                disjunction((col, length), task, [*ind, x[i][k]], o)
        for h, g in _hop_pairs(p, items):
            o = horder[h, g] = m.var(0.0, 1.0, integer=True)
            (c1, l1, i1), (c2, l2, i2) = shapes[h], shapes[g]
            disjunction((c1, l1), (c2, l2), [*i1, *i2], o)


def mip_start(form: Formulation, problem: PlacementProblem, plan: Placement) -> list[float]:
    """Column values of a plan (a valid schedule) for the MIP start."""
    p = problem
    vals = [0.0] * form.model.num_cols
    assign = [p.device_index[plan.assignment[t]] for t in p.tasks]
    for i in range(p.n):
        vals[form.x[i][assign[i]]] = 1.0
    for (e, a, b), col in form.y.items():
        i, j = p.edges[e]
        vals[col] = 1.0 if assign[i] == a and assign[j] == b else 0.0
    if p.objective == "throughput":
        vals[form.objective] = plan.period_ms or 0.0
        return vals
    s = {st.task: st.start_ms for st in plan.schedule}
    for i, t in enumerate(p.tasks):
        vals[form.start[i]] = s[t]
    xs = {(x.src, x.dst): x.start_ms for x in plan.transfers}
    for e, col in form.tstart.items():
        i, j = p.edges[e]
        # same-device edges: any time between the source's end and the destination's start
        vals[col] = xs.get((p.tasks[i], p.tasks[j]), s[p.tasks[j]])
    for (i, j), col in form.order.items():
        vals[col] = 1.0 if (s[p.tasks[i]], i) <= (s[p.tasks[j]], j) else 0.0
    for (e, f), col in form.xorder.items():
        vals[col] = 1.0 if (vals[form.tstart[e]], e) <= (vals[form.tstart[f]], f) else 0.0
    arrive = {(x.src, x.dst): x.arrival_ms for x in plan.transfers}
    for e, col in form.rstart.items():
        i, j = p.edges[e]
        key = (p.tasks[i], p.tasks[j])
        rw = p.recv_work[e][assign[i]][assign[j]]
        vals[col] = arrive[key] - rw if key in arrive else s[p.tasks[j]]

    def begin(op: Any) -> float:
        if isinstance(op, int):
            return s[p.tasks[op]]
        return vals[form.tstart[op[1]] if op[0] == "send" else form.rstart[op[1]]]

    for (first, second), col in form.horder.items():
        vals[col] = 1.0 if begin(first) <= begin(second) else 0.0
    vals[form.objective] = plan.makespan_ms
    return vals


# ---------------------------------------------------------------- backends
@dataclass
class MipResult:
    values: list[float] | None
    bound: float
    optimal: bool
    note: str = ""


def _solve_highs(
    model: LinearModel,
    options: SolveOptions,
    start: list[float] | None,
    name: str,
) -> MipResult:
    import highspy
    import numpy as np

    h = new_highs(options.threads)
    h.setOptionValue("time_limit", max(0.01, options.remaining()))
    h.setOptionValue("random_seed", options.seed)
    h.setOptionValue("mip_rel_gap", 1e-6)
    h.setOptionValue("mip_abs_gap", 1e-9)
    inf = highspy.kHighsInf
    n = model.num_cols
    h.addVars(
        n,
        np.array([max(v, -inf) for v in model.col_lo]),
        np.array([min(v, inf) for v in model.col_hi]),
    )
    h.changeColsCost(n, np.arange(n, dtype=np.int32), np.array(model.cost))
    ints = np.array([c for c in range(n) if model.integer[c]], dtype=np.int32)
    if len(ints):
        h.changeColsIntegrality(
            len(ints), ints, np.full(len(ints), highspy.HighsVarType.kInteger, dtype=np.uint8)
        )
    h.addRows(
        model.num_rows,
        np.array([max(v, -inf) for v in model.row_lo]),
        np.array([min(v, inf) for v in model.row_hi]),
        len(model.index),
        np.array(model.starts, dtype=np.int32),
        np.array(model.index, dtype=np.int32),
        np.array(model.value, dtype=np.float64),
    )
    if start is not None:
        h.setSolution(n, np.arange(n, dtype=np.int32), np.array(start))
    if options.progress is not None:

        def improving(event: Any) -> None:
            out = event.data_out
            options.report(name, out.objective_function_value, out.mip_dual_bound)

        h.cbMipImprovingSolution.subscribe(improving)
    run_highs(h)
    status = h.getModelStatus()
    info = h.getInfo()
    if status == highspy.HighsModelStatus.kInfeasible:
        return MipResult(None, math.inf, True, "infeasible")
    has = info.primal_solution_status == 2  # kSolutionStatusFeasible
    values = list(h.getSolution().col_value) if has else None
    bound = info.mip_dual_bound if math.isfinite(info.mip_dual_bound) else 0.0
    return MipResult(values, bound, status == highspy.HighsModelStatus.kOptimal)


def gurobi_available() -> tuple[bool, str]:
    try:
        import gurobipy as gp
    except ImportError:
        return False, "gurobipy is not installed"
    try:
        env = gp.Env(empty=True)
        env.setParam("OutputFlag", 0)
        env.start()
        env.dispose()
    except gp.GurobiError as e:
        return False, f"no usable Gurobi licence ({e})"
    return True, ""


class GurobiSizeLimit(Exception):
    """The model is beyond the pip licence's size limit."""


def _solve_gurobi(
    model: LinearModel,
    options: SolveOptions,
    start: list[float] | None,
    name: str,
) -> MipResult:
    import gurobipy as gp

    env = gp.Env(empty=True)
    env.setParam("OutputFlag", 0)
    env.start()
    try:
        g = gp.Model(env=env)
        g.Params.TimeLimit = max(0.01, options.remaining())
        g.Params.Threads = options.threads
        g.Params.Seed = options.seed
        g.Params.MIPGap = 1e-6
        cols = [
            g.addVar(
                lb=model.col_lo[c],
                ub=min(model.col_hi[c], gp.GRB.INFINITY),
                obj=model.cost[c],
                vtype=gp.GRB.BINARY if model.integer[c] else gp.GRB.CONTINUOUS,
            )
            for c in range(model.num_cols)
        ]
        ends = [*model.starts[1:], len(model.index)]
        for r in range(model.num_rows):
            lo, hi = model.row_lo[r], model.row_hi[r]
            idx = model.index[model.starts[r] : ends[r]]
            expr = gp.LinExpr(model.value[model.starts[r] : ends[r]], [cols[c] for c in idx])
            if lo == hi:
                g.addLConstr(expr, gp.GRB.EQUAL, lo)
                continue
            if math.isfinite(lo):
                g.addLConstr(expr, gp.GRB.GREATER_EQUAL, lo)
            if math.isfinite(hi):
                g.addLConstr(expr, gp.GRB.LESS_EQUAL, hi)
        if start is not None:
            for col, value in zip(cols, start, strict=True):
                col.Start = value

        def callback(model_: Any, where: int) -> None:
            if where == gp.GRB.Callback.MIPSOL:
                obj = model_.cbGet(gp.GRB.Callback.MIPSOL_OBJ)
                bnd = model_.cbGet(gp.GRB.Callback.MIPSOL_OBJBND)
                options.report(name, obj, bnd)

        try:
            # interruptible: Ctrl-C and the stop end it (`terminate` may be called from
            # another thread)
            interruptible(
                lambda: g.optimize(callback if options.progress is not None else None),
                g.terminate,
            )
        except gp.GurobiError as e:
            if e.errno == gp.GRB.Error.SIZE_LIMIT_EXCEEDED:
                raise GurobiSizeLimit(str(e)) from None
            raise SolverError(f"gurobi failed: {e}") from None
        if g.Status == gp.GRB.INFEASIBLE:
            return MipResult(None, math.inf, True, "infeasible")
        values = [c.X for c in cols] if g.SolCount > 0 else None
        bound = g.ObjBound if math.isfinite(g.ObjBound) else 0.0
        return MipResult(values, bound, g.Status == gp.GRB.OPTIMAL)
    finally:
        env.dispose()


# ----------------------------------------------------------------- solver
@dataclass(frozen=True)
class MilpSolver:
    name: str
    backend: str
    """`highs` or `gurobi`."""
    description: str

    def available(self) -> tuple[bool, str]:
        if self.backend == "gurobi":
            return gurobi_available()
        try:
            import highspy  # noqa: F401
        except ImportError:
            return False, "highspy is not installed"
        return True, ""

    @stoppable
    def solve(self, problem: PlacementProblem, options: SolveOptions) -> Placement:
        started = time.monotonic()
        p = problem
        lb = lower_bound(p)
        warm = options.hint or warm_start(p, options.deadline)
        label = f"milp-{self.backend}"
        if warm is not None and p.objective == "latency" and count_rows(p) > MAX_ROWS:
            note = f"model too large (> {MAX_ROWS} rows): returned the warm start"
            return fall_back(warm, label, lb, started, note, options)
        if warm is not None and options.stopped:  # building the model looks at no deadline
            return fall_back(warm, label, lb, started, "stopped before the search", options)
        horizon = warm.objective_ms if warm is not None else serial_horizon(p)
        form = build(p, horizon=horizon * (1 + 1e-6) + 1e-9)
        start = mip_start(form, p, warm) if warm is not None else None
        notes: dict[str, Any] = {}
        result: MipResult | None = None
        if self.backend == "gurobi":
            size = max(form.model.num_cols, form.model.num_rows)
            try:
                if size > GUROBI_SIZE_LIMIT and not gurobi_unrestricted():
                    raise GurobiSizeLimit(f"{size} variables or constraints")
                result = _solve_gurobi(form.model, options, start, label)
            except GurobiSizeLimit as e:
                notes["note"] = f"model exceeds Gurobi's size-limited licence ({e}): used HiGHS"
                options.report(label, None, None, notes["note"])
                label = "milp-highs"
        if result is None:
            result = _solve_highs(form.model, options, start, label)
        if result.note == "infeasible":
            raise InfeasibleError(f"{label}: no placement fits the device memories (proven)")
        bound = max(lb, result.bound)
        values = result.values
        if values is None:
            if warm is None:
                raise no_plan(label, options)
            note = notes.get("note", "no solution within the time limit")
            return fall_back(warm, label, bound, started, note, options)
        assign = [max(xs, key=lambda k: values[xs[k]]) for xs in form.x]
        schedules = [list_schedule(p, assign)]
        if p.objective == "latency":
            starts = [values[c] for c in form.start]
            tstarts = {e: values[c] for e, c in form.tstart.items()}
            rstarts = {e: values[c] for e, c in form.rstart.items()}
            schedules.append(retime(p, assign, starts, tstarts, rstarts))
        sched = min(schedules, key=lambda s: s.makespan)
        plan = sched.to_placement(label, "feasible", bound, time.monotonic() - started, notes)
        if warm is not None and warm.objective_ms < plan.objective_ms:  # stopped above it
            plan = fall_back(warm, label, bound, started, notes.get("note", ""), options)
        if result.optimal:
            plan.status = "optimal"
        settle(plan, bound)
        options.report(label, plan.objective_ms, plan.lower_bound_ms)
        return plan


def gurobi_unrestricted() -> bool:
    """Whether the Gurobi licence is a full one (a size-limited one reports its limit)."""
    import gurobipy as gp

    env = gp.Env(empty=True)
    env.setParam("OutputFlag", 0)
    env.start()
    try:
        m = gp.Model(env=env)
        m.addVars(GUROBI_SIZE_LIMIT + 1)
        m.Params.TimeLimit = 1.0
        try:
            m.optimize()
        except gp.GurobiError as e:
            if e.errno == gp.GRB.Error.SIZE_LIMIT_EXCEEDED:
                return False
            raise
        return True
    finally:
        env.dispose()


SOLVERS = (
    MilpSolver("milp", "highs", "the paper's MILP on HiGHS"),
    MilpSolver("milp-highs", "highs", "the paper's MILP on HiGHS"),
    MilpSolver("milp-gurobi", "gurobi", "the paper's MILP on Gurobi (falls back to HiGHS)"),
)
