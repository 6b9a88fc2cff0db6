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

Hop work (a device that pays for its transfers, a CPU): a transfer also holds its sender's
device for the sender's share from its start, and the receiver's share is an operation of its
own on the receiving device, before the consumer, that may start once the transfer has no more
than that share left (it overlaps the transfer's end at the earliest).

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
    pays = [d.pays_for_transfers for d in p.costgraph.devices]
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
    # operations: ("t", i) tasks, ("x", e) cross-device transfers, ("r", e) receivers' work
    ops: list[tuple[str, int]] = [("t", i) for i in range(p.n)]
    ops += [("x", e) for e, (i, j) in enumerate(p.edges) if assign[i] != assign[j]]
    ops += [
        ("r", e)
        for e, (i, j) in enumerate(p.edges)
        if assign[i] != assign[j] and p.recv_work[e][assign[i]][assign[j]] > 0
    ]
    dur = {}
    res: dict[tuple[str, int], tuple[int, ...]] = {}
    hold: dict[tuple[str, int], tuple[float, ...]] = {}  # how long it holds each resource
    preds: dict[tuple[str, int], list[tuple[str, int]]] = {op: [] for op in ops}
    for i in range(p.n):
        dur["t", i] = p.compute[i][assign[i]]
        res["t", i] = (assign[i],)
    for e, (i, j) in enumerate(p.edges):
        a, b = assign[i], assign[j]
        if a != b:
            d = dur["x", e] = p.transfer[e][a][b]
            res["x", e] = (kk + a, 2 * kk + b)  # send port, receive port
            hold["x", e] = (d, d)
            if p.send_work[e][a][b] > 0:
                res["x", e] += (a,)
                hold["x", e] += (p.send_work[e][a][b],)
            preds["x", e].append(("t", i))
            if ("r", e) in preds:
                dur["r", e] = p.recv_work[e][a][b]
                res["r", e] = (b,)
                preds["r", e].append(("x", e))
                preds["t", j].append(("r", e))
            else:
                preds["t", j].append(("x", e))
        else:
            preds["t", j].append(("t", i))
    for op in ops:
        hold.setdefault(op, tuple(dur[op] for _ in res[op]))
    succs: dict[tuple[str, int], list[tuple[str, int]]] = {op: [] for op in ops}
    for op, ps in preds.items():
        for q in ps:
            succs[q].append(op)

    def lag(q: tuple[str, int], op: tuple[str, int]) -> float:
        """How long before q's end op may start (a receiver's work overlaps its transfer)."""
        return dur[op] if op[0] == "r" else 0.0

    tail: dict[tuple[str, int], float] = {}  # op's duration plus its longest chain after it
    for op in reversed(_topological(ops, preds)):
        tail[op] = dur[op] + max((tail[s] - lag(op, s) for s in succs[op]), default=0.0)
    left = [0.0] * (3 * kk)  # work not yet scheduled per resource
    for op in ops:
        if dur[op] > 0:
            for r, h in zip(res[op], hold[op], strict=True):
                left[r] += h
    free = [0.0] * (3 * kk)
    end: dict[tuple[str, int], float] = {}

    def rec(last_start: float, makespan: float) -> None:
        # every remaining operation starts at or after last_start (starts never decrease)
        bound = max(makespan, last_start + max(left))
        for op in ops:
            if op not in end:
                ready = max((end[q] - lag(q, op) for q in preds[op] if q in end), default=0.0)
                bound = max(bound, max(ready, last_start) + tail[op])
        if bound >= best[0] - 1e-12:
            return
        if len(end) == len(ops):
            best[0] = makespan
            return
        for op in ops:
            if op in end or any(q not in end for q in preds[op]):
                continue
            ready = max((end[q] - lag(q, op) for q in preds[op]), default=0.0)
            d = dur[op]
            start = ready if d <= 0 else max(ready, *(free[r] for r in res[op]))
            if start < last_start - 1e-12:
                continue
            saved = [free[r] for r in res[op]]
            if d > 0:
                for r, h in zip(res[op], hold[op], strict=True):
                    free[r] = start + h
                    left[r] -= h
            end[op] = start + d
            rec(start, max(makespan, start + d))
            del end[op]
            for r, v, h in zip(res[op], saved, hold[op], strict=True):
                free[r] = v
                if d > 0:
                    left[r] += h

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
