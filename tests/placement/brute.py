"""Brute force for tiny instances: the exact optimum, independent of every solver.

What brute force means with congestion: the optimum is attained by a semi-active schedule —
every operation (task or cross-device transfer) starts as soon as its inputs are ready and
its resources (device; send and receive port) have finished the operations ordered before it
there. So enumerate every memory-feasible, pin-respecting assignment, and for each, every
order in which operations can be appended to their resources, computing start times directly
(no insertion, no shared code with the simulator's builder). Listing the operations of any
semi-active schedule by start time is such an order, so restricting the search to sequences
with non-decreasing start times loses nothing and removes most permutations; a branch stops
as soon as it cannot beat the best makespan found.

The pipelined period needs no schedule: every assignment, and the busiest device or port per
request, with the transfers into and out of a device that pays for them (a CPU by default)
added to its compute.
"""

from __future__ import annotations

import itertools

from moirai.placement import PlacementProblem


def brute_force_makespan(problem: PlacementProblem) -> float:
    p = problem
    best = [float("inf")]
    for assign in itertools.product(*p.cand):
        used = [0] * p.num_devices
        for i, k in enumerate(assign):
            used[k] += p.mem[i]
        if any(u > c for u, c in zip(used, p.cap, strict=True)):
            continue
        _search(p, list(assign), best)
    return best[0]


def brute_force_period(problem: PlacementProblem) -> float:
    p = problem
    kk = p.num_devices
    pays = [
        d.kind == "cpu" if d.transfers_occupy_device is None else d.transfers_occupy_device
        for d in p.costgraph.devices
    ]
    best = float("inf")
    for assign in itertools.product(*p.cand):
        used = [0] * kk
        device = [0.0] * kk
        send = [0.0] * kk
        recv = [0.0] * kk
        for i, k in enumerate(assign):
            used[k] += p.mem[i]
            device[k] += p.compute[i][k]
        if any(u > c for u, c in zip(used, p.cap, strict=True)):
            continue
        for e, (i, j) in enumerate(p.edges):
            a, b = assign[i], assign[j]
            if a != b:
                d = p.transfer[e][a][b]
                send[a] += d
                recv[b] += d
                device[a] += d if pays[a] else 0.0
                device[b] += d if pays[b] else 0.0
        best = min(best, max(device + send + recv))
    return best


def _search(p: PlacementProblem, assign: list[int], best: list[float]) -> None:
    kk = p.num_devices
    # operations: ("t", i) tasks and ("x", e) cross-device transfers
    ops: list[tuple[str, int]] = [("t", i) for i in range(p.n)]
    ops += [("x", e) for e, (i, j) in enumerate(p.edges) if assign[i] != assign[j]]
    dur = {}
    res: dict[tuple[str, int], tuple[int, ...]] = {}
    preds: dict[tuple[str, int], list[tuple[str, int]]] = {op: [] for op in ops}
    for i in range(p.n):
        dur["t", i] = p.compute[i][assign[i]]
        res["t", i] = (assign[i],)
    for e, (i, j) in enumerate(p.edges):
        if assign[i] != assign[j]:
            dur["x", e] = p.transfer[e][assign[i]][assign[j]]
            res["x", e] = (kk + assign[i], 2 * kk + assign[j])  # send port, receive port
            preds["x", e].append(("t", i))
            preds["t", j].append(("x", e))
        else:
            preds["t", j].append(("t", i))
    succs: dict[tuple[str, int], list[tuple[str, int]]] = {op: [] for op in ops}
    for op, ps in preds.items():
        for q in ps:
            succs[q].append(op)
    tail: dict[tuple[str, int], float] = {}  # op's duration plus its longest chain after it
    for op in reversed(_topological(ops, preds)):
        tail[op] = dur[op] + max((tail[s] for s in succs[op]), default=0.0)
    left = [0.0] * (3 * kk)  # work not yet scheduled per resource
    for op in ops:
        if dur[op] > 0:
            for r in res[op]:
                left[r] += dur[op]
    free = [0.0] * (3 * kk)
    end: dict[tuple[str, int], float] = {}

    def rec(last_start: float, makespan: float) -> None:
        # every remaining operation starts at or after last_start (starts never decrease)
        bound = max(makespan, last_start + max(left))
        for op in ops:
            if op not in end:
                ready = max((end[q] for q in preds[op] if q in end), default=0.0)
                bound = max(bound, max(ready, last_start) + tail[op])
        if bound >= best[0] - 1e-12:
            return
        if len(end) == len(ops):
            best[0] = makespan
            return
        for op in ops:
            if op in end or any(q not in end for q in preds[op]):
                continue
            ready = max((end[q] for q in preds[op]), default=0.0)
            d = dur[op]
            start = ready if d <= 0 else max(ready, *(free[r] for r in res[op]))
            if start < last_start - 1e-12:
                continue
            saved = [free[r] for r in res[op]]
            if d > 0:
                for r in res[op]:
                    free[r] = start + d
                    left[r] -= d
            end[op] = start + d
            rec(start, max(makespan, start + d))
            del end[op]
            for r, v in zip(res[op], saved, strict=True):
                free[r] = v
                if d > 0:
                    left[r] += d

    rec(0.0, 0.0)


def _topological(ops: list[tuple[str, int]], preds: dict) -> list[tuple[str, int]]:
    done: set[tuple[str, int]] = set()
    out: list[tuple[str, int]] = []
    while len(out) < len(ops):
        for op in ops:
            if op not in done and all(q in done for q in preds[op]):
                done.add(op)
                out.append(op)
    return out
