"""Topological orders with a priority, shared by the cost graph, the fusion groups and the stage
plan: each wants Kahn's algorithm that always takes the ready node with the smallest key (model
order, schedule order), so that its orders are deterministic and follow the model."""

from __future__ import annotations

import heapq
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any, TypeVar

N = TypeVar("N", bound=Hashable)


def topological_order(
    nodes: Iterable[N], successors: Mapping[N, Iterable[N]], key: Callable[[N], Any]
) -> list[N] | None:
    """`nodes` in a topological order taking the ready node with the smallest `key` first (ties
    by the order of `nodes`), or None when `successors` hold a cycle."""
    nodes = list(nodes)
    indegree = dict.fromkeys(nodes, 0)
    for u in nodes:
        for v in successors[u]:
            indegree[v] += 1
    seq = {u: n for n, u in enumerate(nodes)}
    ready = [(key(u), seq[u], u) for u in nodes if indegree[u] == 0]
    heapq.heapify(ready)
    order: list[N] = []
    while ready:
        *_, u = heapq.heappop(ready)
        order.append(u)
        for v in successors[u]:
            indegree[v] -= 1
            if indegree[v] == 0:
                heapq.heappush(ready, (key(v), seq[v], v))
    return order if len(order) == len(nodes) else None
