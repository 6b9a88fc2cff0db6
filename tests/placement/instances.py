"""Random cost graphs for the placement tests: small DAGs on heterogeneous devices."""

from __future__ import annotations

import random

from moirai.costgraph import CostGraph, Device, Edge, Link, Task


def random_costgraph(
    seed: int,
    tasks: int = 8,
    devices: int = 3,
    edge_prob: float = 0.3,
    unrunnable_prob: float = 0.0,
    memory_tight: bool = False,
    zero_prob: float = 0.0,
    cpus: int = 1,
) -> CostGraph:
    """A random DAG with per-device compute times, memory and per-pair links.

    Device speeds differ per device and per task (unrelated machines); some tasks may be
    unrunnable on some devices; with `memory_tight`, device memory only just holds the tasks.
    The first `cpus` devices are CPUs (they pay for their transfers in the period), the rest
    GPUs.
    """
    rng = random.Random(seed)
    names = [f"d{k}" for k in range(devices)]
    speed = [rng.uniform(0.5, 3.0) for _ in names]
    task_list = []
    mem_total = 0
    for i in range(tasks):
        base = rng.uniform(0.5, 5.0)
        compute = {}
        for k, d in enumerate(names):
            if k > 0 and rng.random() < unrunnable_prob:
                continue
            compute[d] = (
                0.0
                if rng.random() < zero_prob
                else round(base / speed[k] * rng.uniform(0.7, 1.4), 3)
            )
        mem = rng.randint(1, 10) * 1_000_000
        mem_total += mem
        task_list.append(Task(id=f"t{i}", compute_ms=compute, memory_bytes=mem))
    edges = []
    for j in range(tasks):
        for i in range(j):
            if rng.random() < edge_prob:
                nbytes = 0 if rng.random() < zero_prob else rng.randint(1, 40) * 100_000
                edges.append(Edge(src=f"t{i}", dst=f"t{j}", bytes=nbytes))
    cap = (mem_total // devices + 10_000_000) if memory_tight else 10**12
    device_list = tuple(
        Device(name=d, memory_bytes=cap, kind="cpu" if k < cpus else "gpu")
        for k, d in enumerate(names)
    )
    pairs = {}
    for a in names:
        for b in names:
            if a != b and rng.random() < 0.5:
                pairs[(a, b)] = Link(
                    bandwidth_bytes_per_s=rng.uniform(0.5e9, 4e9), latency_ms=rng.uniform(0, 0.2)
                )
    return CostGraph(
        name=f"random-{seed}",
        devices=device_list,
        tasks=tuple(task_list),
        edges=tuple(edges),
        default_link=Link(1e9, 0.05),
        pair_links=pairs,
    )


def layered_costgraph(seed: int, tasks: int, devices: int = 4, width: int = 4) -> CostGraph:
    """A large model-like DAG: `width` parallel branches per layer that merge and fork again,
    like stacked inception or attention blocks, on devices of different speeds."""
    rng = random.Random(seed)
    names = [f"d{k}" for k in range(devices)]
    speed = [1.0, *(rng.uniform(0.2, 0.8) for _ in names[1:])]
    task_list = []
    edges = []
    prev: list[str] = []
    i = 0
    while i < tasks:
        layer = [f"t{i + w}" for w in range(min(width if (i // width) % 2 else 1, tasks - i))]
        for t in layer:
            base = rng.uniform(0.01, 0.2)
            compute = {d: round(base / speed[k], 5) for k, d in enumerate(names)}
            task_list.append(
                Task(id=t, compute_ms=compute, memory_bytes=rng.randint(1, 50) * 10**6)
            )
            for p in prev:
                edges.append(Edge(src=p, dst=t, bytes=rng.randint(1, 20) * 50_000))
        i += len(layer)
        prev = layer
    return CostGraph(
        name=f"layered-{seed}-{tasks}",
        devices=tuple(Device(name=d, memory_bytes=64 * 10**9) for d in names),
        tasks=tuple(task_list),
        edges=tuple(edges),
        default_link=Link(12e9, 0.01),
    )


def tight_costgraph(
    seed: int,
    tasks: int = 12,
    devices: int = 3,
    slack: float = 1.05,
    edge_prob: float = 0.3,
    unrunnable_prob: float = 0.0,
) -> CostGraph:
    """A random DAG whose devices have uneven memories summing to `slack` times the tasks'.

    With a slack near 1 first-fit packings often fail and a greedy placer can strand a task
    with no device left that holds it (m-SCT used to crash so); some instances have no
    placement at all.
    """
    rng = random.Random(seed)
    names = [f"d{k}" for k in range(devices)]
    task_list = []
    total = 0
    for i in range(tasks):
        base = rng.uniform(0.5, 5.0)
        compute = {
            d: round(base * rng.uniform(0.3, 2.0), 3)
            for k, d in enumerate(names)
            if k == 0 or rng.random() >= unrunnable_prob
        }
        mem = rng.randint(1, 20) * 1_000_000
        total += mem
        task_list.append(Task(id=f"t{i}", compute_ms=compute, memory_bytes=mem))
    edges = [
        Edge(src=f"t{i}", dst=f"t{j}", bytes=rng.randint(1, 40) * 100_000)
        for j in range(tasks)
        for i in range(j)
        if rng.random() < edge_prob
    ]
    shares = [rng.uniform(0.4, 1.6) for _ in names]
    caps = [int(total * slack * s / sum(shares)) for s in shares]
    return CostGraph(
        name=f"tight-{seed}",
        devices=tuple(Device(name=d, memory_bytes=c) for d, c in zip(names, caps, strict=True)),
        tasks=tuple(task_list),
        edges=tuple(edges),
        default_link=Link(1e9, 0.05),
    )
