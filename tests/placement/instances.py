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


def _transfer_matrix(
    rng: random.Random, nbytes: int, bandwidth: list[list[float]], latency: list[list[float]]
) -> dict[str, dict[str, float]]:
    """Per-edge times `[from][to]` (ms) as the paper's instances give them: bytes over the
    pair's bandwidth plus its latency, each with a little per-edge noise."""
    k = len(bandwidth)
    return {
        f"d{a}": {
            f"d{b}": round(
                (latency[a][b] + nbytes / bandwidth[a][b] * 1000) * rng.uniform(0.9, 1.1), 5
            )
            for b in range(k)
            if b != a
        }
        for a in range(k)
    }


def _links(rng: random.Random, devices: int) -> tuple[list[list[float]], list[list[float]]]:
    """Asymmetric bandwidths (bytes/s) and latencies (ms) between device pairs: a fast island
    (say GPUs on one node) and slower links to and between the rest."""
    island = set(range(max(2, devices // 2)))
    bw = [[0.0] * devices for _ in range(devices)]
    lat = [[0.0] * devices for _ in range(devices)]
    for a in range(devices):
        for b in range(devices):
            if a != b:
                fast = a in island and b in island
                bw[a][b] = rng.uniform(8e9, 25e9) if fast else rng.uniform(0.8e9, 3e9)
                lat[a][b] = rng.uniform(0.005, 0.02) if fast else rng.uniform(0.02, 0.08)
    return bw, lat


def inception_costgraph(
    seed: int, modules: int, devices: int = 4, stem: int = 8, memory_tight: bool = False
) -> CostGraph:
    """A graph in the style of the paper's published instances: an Inception-like network.

    A stem chain, then `modules` blocks of four branches (1x1; 1x1 then 3x3; 1x1 then 5x5;
    pool then 1x1) joined by a concat, a head chain; about 8 tasks per module. Each task type
    has its own cost, and each device its own speed per type (unrelated machines: a GPU runs
    convolutions far faster than pooling, a CPU less so). Every edge carries its transfer
    matrix, from asymmetric pair links with per-edge noise. With `memory_tight`, the fastest
    device cannot hold every task.
    """
    rng = random.Random(seed)
    names = [f"d{k}" for k in range(devices)]
    conv_speed = [1.0, *sorted((rng.uniform(0.1, 0.7) for _ in names[1:]), reverse=True)]
    other_speed = [s * rng.uniform(0.5, 2.5) for s in conv_speed]
    bw, lat = _links(rng, devices)
    tasks: list[Task] = []
    edges: list[Edge] = []

    def task(kind: str, flops: float) -> str:
        t = f"t{len(tasks)}"
        speed = conv_speed if kind == "conv" else other_speed
        compute = {
            d: round(flops / speed[k] * rng.uniform(0.85, 1.15), 5) for k, d in enumerate(names)
        }
        tasks.append(
            Task(t, compute, memory_bytes=rng.randint(1, 30) * 10**6, extra={"kind": kind})
        )
        return t

    def edge(src: str, dst: str, nbytes: int) -> None:
        edges.append(Edge(src, dst, nbytes, _transfer_matrix(rng, nbytes, bw, lat)))

    act = 800_000
    prev = task("conv", 0.08)
    for _ in range(stem - 1):
        t = task(rng.choice(("conv", "pool")), rng.uniform(0.01, 0.08))
        edge(prev, t, act)
        prev = t
    for m in range(modules):
        act = max(100_000, int(act * rng.uniform(0.85, 1.0)))
        ends = []
        for shape in (("conv",), ("conv", "conv"), ("conv", "conv"), ("pool", "conv")):
            src = prev
            for kind in shape:
                t = task(
                    kind, rng.uniform(0.005, 0.06) if kind == "conv" else rng.uniform(0.002, 0.01)
                )
                edge(src, t, act if src == prev else act // 2)
                src = t
            ends.append(src)
        join = task("concat", 0.002)
        for t in ends:
            edge(t, join, act // 4)
        prev = join
        if m % 3 == 2:  # a reduction between stages
            t = task("pool", 0.004)
            edge(prev, t, act)
            prev = t
    for kind in ("pool", "conv", "softmax"):
        t = task(kind, 0.005)
        edge(prev, t, 50_000)
        prev = t
    total = sum(t.memory_bytes for t in tasks)
    caps = [10**12] * devices
    if memory_tight:
        caps[0] = int(total * rng.uniform(0.55, 0.8))
    return CostGraph(
        name=f"inception-{seed}-{len(tasks)}",
        devices=tuple(
            Device(name=d, memory_bytes=caps[k], kind="gpu" if k < devices - 1 else "cpu")
            for k, d in enumerate(names)
        ),
        tasks=tuple(tasks),
        edges=tuple(edges),
        default_link=Link(1e9, 0.05),
    )


def random_dag(
    seed: int, tasks: int, devices: int, ccr: float = 0.5, max_width: int = 8
) -> CostGraph:
    """A random model-like DAG on unrelated heterogeneous devices, with a transfer matrix per
    edge (after the random graphs of Topcuoglu et al. 2002: layers, fan-in, a
    communication-to-computation ratio).

    Layers of 1 to `max_width` tasks, each task fed by one to three tasks of the last three
    layers (branches fork, run side by side and join, with skips). Device 0 is the fastest, the
    others 0.15 to 1 times as fast, each task's time varying by up to 50% around that
    (unrelated machines). An edge's transfer takes `ccr` times the mean compute time on average
    between the first half of the devices (one node), four times that to or from the others.
    """
    rng = random.Random(seed)
    names = [f"d{k}" for k in range(devices)]
    speed = [1.0, *sorted((rng.uniform(0.15, 1.0) for _ in names[1:]), reverse=True)]
    island = max(2, devices // 2)
    mean = 0.055
    task_list: list[Task] = []
    edges: list[Edge] = []
    layers: list[list[str]] = []
    while len(task_list) < tasks:
        layer = []
        for _ in range(min(rng.randint(1, max_width), tasks - len(task_list))):
            t = f"t{len(task_list)}"
            base = rng.uniform(0.01, 0.1)
            compute = {
                d: round(base / speed[k] * rng.uniform(0.5, 1.5), 5) for k, d in enumerate(names)
            }
            task_list.append(Task(t, compute, memory_bytes=rng.randint(1, 30) * 10**6))
            recent = [u for lay in layers[-3:] for u in lay]
            for src in rng.sample(recent, min(len(recent), rng.randint(1, 3))):
                cost = ccr * mean * rng.uniform(0.5, 1.5)
                matrix = {
                    a: {
                        b: round(cost * (1 if ka < island and kb < island else 4), 5)
                        for kb, b in enumerate(names)
                        if b != a
                    }
                    for ka, a in enumerate(names)
                }
                edges.append(Edge(src, t, int(cost * 1e6), matrix))
            layer.append(t)
        layers.append(layer)
    return CostGraph(
        name=f"random-{seed}-{tasks}x{devices}",
        devices=tuple(Device(name=d, memory_bytes=10**12) for d in names),
        tasks=tuple(task_list),
        edges=tuple(edges),
        default_link=Link(1e9, 0.05),
    )


def series_costgraph(
    seed: int,
    blocks: tuple[int, ...] = (2, 2),
    devices: int = 3,
    jumps: int = 0,
    twins: bool = False,
    memory_tight: bool = False,
) -> CostGraph:
    """A tiny graph with cut vertices, for checking the series decomposition by brute force.

    A source, then per block that many parallel branches of one or two tasks joined by a cut
    vertex (the last block's branches are sinks, a suffix without a cut vertex). `jumps` adds
    edges from a task to one two blocks later (over a cut vertex). With `twins`, the last device
    is an exact copy of the one before it (same times, memory and links). With `memory_tight`,
    the devices can just hold every task between them.
    """
    rng = random.Random(seed)
    names = [f"d{k}" for k in range(devices)]
    speed = [rng.uniform(0.5, 2.0) for _ in names]
    if twins:
        speed[-1] = speed[-2]
    tasks: list[Task] = []
    edges: list[Edge] = []

    def task() -> str:
        base = rng.uniform(0.5, 3.0)
        noise = [rng.uniform(0.7, 1.4) for _ in names]
        if twins:
            noise[-1] = noise[-2]
        t = f"t{len(tasks)}"
        compute = {d: round(base / speed[k] * noise[k], 3) for k, d in enumerate(names)}
        tasks.append(Task(t, compute, memory_bytes=rng.randint(1, 10) * 1_000_000))
        return t

    layers: list[list[str]] = [[task()]]
    for n, width in enumerate(blocks):
        ends = []
        for _ in range(width):
            src = layers[-1][-1]
            for _ in range(rng.randint(1, 2) if n + 1 < len(blocks) else 1):
                t = task()
                edges.append(Edge(src, t, rng.randint(1, 30) * 100_000))
                src = t
            ends.append(src)
        if n + 1 < len(blocks):
            join = task()
            for t in ends:
                edges.append(Edge(t, join, rng.randint(1, 30) * 100_000))
            layers.append([*ends, join])
        else:
            layers.append(ends)
    for _ in range(jumps):
        if len(layers) < 3:
            break
        m = rng.randrange(len(layers) - 2)
        src = rng.choice(layers[m])
        dst = rng.choice(layers[m + 2][:-1] or layers[m + 2])
        if all((e.src, e.dst) != (src, dst) for e in edges):
            edges.append(Edge(src, dst, rng.randint(1, 30) * 100_000))
    total = sum(t.memory_bytes for t in tasks)
    cap = total // devices + 2_000_000 if memory_tight else 10**12
    links = {}
    for a in range(devices):
        for b in range(devices):
            if a != b:
                links[a, b] = Link(rng.uniform(0.5e9, 4e9), rng.uniform(0, 0.2))
    if twins:  # the last device mirrors the one before it, links included
        x, y = devices - 2, devices - 1
        for c in range(devices - 2):
            links[y, c] = links[x, c]
            links[c, y] = links[c, x]
        links[y, x] = links[x, y]
    return CostGraph(
        name=f"series-{seed}",
        devices=tuple(Device(name=d, memory_bytes=cap) for d in names),
        tasks=tuple(tasks),
        edges=tuple(edges),
        default_link=Link(1e9, 0.05),
        pair_links={(names[a], names[b]): link for (a, b), link in links.items()},
    )


def fork(kind: str = "gpu") -> CostGraph:
    """a feeds b and c; b and c both feed d. Transfers take 2 ms (1 MB at 0.5 GB/s). On GPUs
    hops are waits on the ports only; on CPUs they are also work on both ends (hop work)."""
    return CostGraph(
        name="fork",
        devices=(Device("x", 10**9, kind), Device("y", 10**9, kind)),
        tasks=(
            Task("a", {"x": 1.0, "y": 1.0}),
            Task("b", {"x": 3.0, "y": 3.0}),
            Task("c", {"x": 3.0, "y": 3.0}),
            Task("d", {"x": 1.0, "y": 1.0}),
        ),
        edges=(
            Edge("a", "b", 1_000_000),
            Edge("a", "c", 1_000_000),
            Edge("b", "d", 1_000_000),
            Edge("c", "d", 1_000_000),
        ),
        default_link=Link(0.5e9, 0.0),
    )
