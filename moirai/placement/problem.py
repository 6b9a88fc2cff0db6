"""The placement problem, built once and handed to every solver.

`PlacementProblem` wraps a validated `CostGraph` with what the user asks for: the objective
(`latency`, the makespan of one request, or `throughput`, the pipelined period), pins
(`{task: device}`) and memory limits that override device memories (to keep headroom, say). On
construction it checks what can be checked cheaply and raises `InfeasibleError` with a one-line
reason: a pin naming an unknown task or device, a task that fits on no device that can run it,
more task memory than device memory in total.

It also precomputes, once, the dense integer-indexed view that every solver and the simulator
work on, so no solver re-derives it and all agree on it: tasks in topological order, the
candidate devices of each task (runnable, allowed by its pin, with enough memory), compute times,
transfer times of every edge for every ordered device pair, which devices pay for their
transfers with their own time, the hop work that follows from it, and reachability between
tasks (which orderings are already implied by precedence; the exact models skip those pairs).

Hop work (Moirai's execution model, `moirai.placement.simulate`): a hop between two devices is
work on the cores of each end that pays for its transfers (a CPU: its stage server encodes and
writes the tensor, the receiver wakes, reads and files it), so a device pushing one branch's
outputs does not compute meanwhile. When edge e crosses from device a to device b, a spends
half of the hop's time (`send_work[e][a][b]`) on a at the transfer's start and b spends half
(`recv_work[e][a][b]`) on b once the data is in, before the consumer starts; the transfer still
takes its whole time (`transfer`) on both ports, so a hop costs a path its time once, as before,
and the work only adds to what a device does. `hop_work` is the one place this split is
computed: the solvers, the simulator and the served prediction (`moirai.planning.prediction`)
all read it here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

from moirai.costgraph import CostGraph
from moirai.errors import InfeasibleError

Objective = Literal["latency", "throughput"]
OBJECTIVES: tuple[Objective, ...] = ("latency", "throughput")

GIB = float(1 << 30)


def gib(nbytes: float) -> str:
    """Bytes as a short human string: GiB with one decimal from 1 GiB, MiB below (a stage
    server's overhead and small models read as MiB, not as 0.1 GiB), and bytes where that would
    read as 0.0 MiB but is not none (cost graphs from elsewhere may count in small units)."""
    if nbytes >= GIB:
        return f"{nbytes / GIB:.1f} GiB"
    if nbytes >= 0.05 * (1 << 20) or nbytes <= 0:
        return f"{nbytes / (1 << 20):.1f} MiB"
    return f"{nbytes:g} B"


def hop_work(transfer_ms: float, sender_pays: bool, receiver_pays: bool) -> tuple[float, float]:
    """The work a hop of `transfer_ms` puts on its sender and on its receiver: half of its time
    to each end that pays for its transfers (module docstring), none to one that does not."""
    half = transfer_ms / 2
    return (half if sender_pays else 0.0, half if receiver_pays else 0.0)


@dataclass(frozen=True)
class PlacementProblem:
    """A cost graph plus the objective, pins and memory limits; validated on construction.

    Index view (all lists are indexed by task position `i` in `tasks`, a topological order, and
    device position `k` in `devices`; edge position `e` in `edges`):
    `cand[i]` candidate devices, `compute[i][k]` time (only for candidates), `mem[i]`, `cap[k]`,
    `edge_src[e]`, `edge_dst[e]`, `transfer[e][a][b]` (0 when `a == b`), `send_work[e][a][b]`
    and `recv_work[e][a][b]` (the hop work on a and on b, 0 when `a == b`), `in_edges[i]`,
    `out_edges[i]`, `pays_for_transfers[k]`.
    """

    costgraph: CostGraph
    objective: Objective = "latency"
    pins: Mapping[str, str] = field(default_factory=dict)
    memory_limits: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        cg = self.costgraph
        if self.objective not in OBJECTIVES:
            raise InfeasibleError(
                f"unknown objective {self.objective!r}: use one of {', '.join(OBJECTIVES)}"
            )
        for task, dev in self.pins.items():
            if task not in cg.task:
                raise InfeasibleError(f"pin {task}={dev} names unknown task {task!r}")
            if dev not in cg.device:
                raise InfeasibleError(
                    f"pin {task}={dev} names unknown device {dev!r}; devices are "
                    f"{', '.join(cg.device_names)}"
                )
            if dev not in cg.task[task].compute_ms:
                raise InfeasibleError(
                    f"pin {task}={dev}: device {dev!r} cannot run task {task!r} (no compute_ms)"
                )
        for dev, limit in self.memory_limits.items():
            if dev not in cg.device:
                raise InfeasibleError(f"memory limit names unknown device {dev!r}")
            if limit < 0:
                raise InfeasibleError(f"memory limit of device {dev!r} is negative")
        for i, cands in enumerate(self.cand):
            if not cands:
                self._explain_no_candidate(self.tasks[i])
        total_mem = sum(self.mem)
        total_cap = sum(self.cap)
        if total_mem > total_cap:
            raise InfeasibleError(
                f"no placement fits: total task memory {gib(total_mem)} exceeds total device "
                f"memory {gib(total_cap)}"
            )
        for task, dev in self.pins.items():
            k = self.device_index[dev]
            pinned = sum(self.mem[self.task_index[t]] for t, d in self.pins.items() if d == dev)
            if pinned > self.cap[k]:
                raise InfeasibleError(
                    f"pins put {gib(pinned)} of task memory on {dev!r}, which has "
                    f"{gib(self.cap[k])} (first pin: {task}={dev})"
                )

    def _explain_no_candidate(self, task: str) -> None:
        t = self.costgraph.task[task]
        pinned = self.pins.get(task)
        devices = [pinned] if pinned else list(t.compute_ms)
        caps = ", ".join(f"{d} {gib(self.cap[self.device_index[d]])}" for d in devices)
        raise InfeasibleError(
            f"no placement fits: task {task!r} needs {gib(t.memory_bytes)} but the devices "
            f"that can run it have {caps}"
        )

    # ------------------------------------------------------------------ names
    @cached_property
    def tasks(self) -> tuple[str, ...]:
        return self.costgraph.topological_order

    @cached_property
    def devices(self) -> tuple[str, ...]:
        return self.costgraph.device_names

    @cached_property
    def task_index(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tasks)}

    @cached_property
    def device_index(self) -> dict[str, int]:
        return {d: k for k, d in enumerate(self.devices)}

    @property
    def n(self) -> int:
        return len(self.tasks)

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    # ------------------------------------------------------------- dense view
    @cached_property
    def cap(self) -> list[int]:
        return [
            min(d.memory_bytes, self.memory_limits.get(d.name, d.memory_bytes))
            for d in self.costgraph.devices
        ]

    @cached_property
    def pays_for_transfers(self) -> list[bool]:
        """Whether transfers into and out of device k take its own time: hop work, and in the
        throughput objective its load."""
        return [d.pays_for_transfers for d in self.costgraph.devices]

    @cached_property
    def mem(self) -> list[int]:
        return [self.costgraph.task[t].memory_bytes for t in self.tasks]

    @cached_property
    def compute(self) -> list[dict[int, float]]:
        out = []
        for t in self.tasks:
            times = self.costgraph.task[t].compute_ms
            out.append({self.device_index[d]: float(ms) for d, ms in times.items()})
        return out

    @cached_property
    def cand(self) -> list[tuple[int, ...]]:
        """Devices each task may go to: runnable there, allowed by its pin, fits in memory."""
        out = []
        for i, t in enumerate(self.tasks):
            pinned = self.pins.get(t)
            out.append(
                tuple(
                    k
                    for k in range(self.num_devices)
                    if k in self.compute[i]
                    and (pinned is None or self.devices[k] == pinned)
                    and self.mem[i] <= self.cap[k]
                )
            )
        return out

    @cached_property
    def edges(self) -> tuple[tuple[int, int], ...]:
        idx = self.task_index
        return tuple((idx[e.src], idx[e.dst]) for e in self.costgraph.edges)

    @cached_property
    def transfer(self) -> list[list[list[float]]]:
        """`transfer[e][a][b]`: time to move edge `e`'s tensor from device a to b."""
        cg = self.costgraph
        names = self.devices
        return [[[cg.transfer_ms(edge, a, b) for b in names] for a in names] for edge in cg.edges]

    @cached_property
    def send_work(self) -> list[list[list[float]]]:
        """`send_work[e][a][b]`: the sender's share of edge e's hop from a to b (`hop_work`)."""
        return self._hop_shares(0)

    @cached_property
    def recv_work(self) -> list[list[list[float]]]:
        """`recv_work[e][a][b]`: the receiver's share of edge e's hop from a to b (`hop_work`)."""
        return self._hop_shares(1)

    def _hop_shares(self, end: int) -> list[list[list[float]]]:
        pays = self.pays_for_transfers
        return [
            [
                [hop_work(t, pa, pb)[end] for t, pb in zip(row, pays, strict=True)]
                for row, pa in zip(times, pays, strict=True)
            ]
            for times in self.transfer
        ]

    @cached_property
    def has_hop_work(self) -> bool:
        """Whether any hop may put work on a device (some device pays for its transfers)."""
        return any(self.pays_for_transfers) and self.num_devices > 1

    def ports_only(self) -> PlacementProblem:
        """The same problem with no device paying for its transfers: no hop work, transfers
        on the ports only (a relaxation of the makespan: any schedule of this problem's
        assignment under hop work takes at least as long). Greedy placers choose devices better
        on it (`auto`): they place a consumer after its producer's device has moved on, where
        the sender's share of the hop no longer fits."""
        cg = self.costgraph
        devices = tuple(dataclasses.replace(d, transfers_occupy_device=False) for d in cg.devices)
        return PlacementProblem(
            dataclasses.replace(cg, devices=devices),
            self.objective,
            self.pins,
            self.memory_limits,
        )

    @cached_property
    def in_edges(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in self.tasks]
        for e, (_, j) in enumerate(self.edges):
            out[j].append(e)
        return out

    @cached_property
    def out_edges(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in self.tasks]
        for e, (i, _) in enumerate(self.edges):
            out[i].append(e)
        return out

    @cached_property
    def min_compute(self) -> list[float]:
        """Fastest time of each task over its candidate devices."""
        return [min(self.compute[i][k] for k in self.cand[i]) for i in range(self.n)]

    @cached_property
    def descendants(self) -> list[int]:
        """Bitset (Python int) of the tasks reachable from each task by a non-empty path."""
        desc = [0] * self.n
        for i in reversed(range(self.n)):
            bits = 0
            for e in self.out_edges[i]:
                j = self.edges[e][1]
                bits |= (1 << j) | desc[j]
            desc[i] = bits
        return desc

    @cached_property
    def twins(self) -> list[int]:
        """For each device, the first device it is interchangeable with (itself if none):
        same memory, same tasks at the same times, same transfer times to and from every
        other device, so swapping the two in any plan changes nothing. Solvers may then look
        at one of each set (a node's identical GPUs, say)."""
        rep = list(range(self.num_devices))
        for k in range(self.num_devices):
            for r in sorted(set(rep[:k])):
                if self._swappable(r, k):
                    rep[k] = r
                    break
        return rep

    def _swappable(self, a: int, b: int) -> bool:
        if self.cap[a] != self.cap[b] or self.pays_for_transfers[a] != self.pays_for_transfers[b]:
            return False
        for i in range(self.n):
            if self.compute[i].get(a) != self.compute[i].get(b) or (a in self.cand[i]) != (
                b in self.cand[i]
            ):
                return False
        others = [c for c in range(self.num_devices) if c not in (a, b)]
        for t in self.transfer:
            if t[a][b] != t[b][a]:
                return False
            for c in others:
                if t[a][c] != t[b][c] or t[c][a] != t[c][b]:
                    return False
        return True

    @cached_property
    def ancestors(self) -> list[int]:
        """Bitset (Python int) of the tasks that reach each task by a non-empty path."""
        anc = [0] * self.n
        for i in range(self.n):
            bits = 0
            for e in self.in_edges[i]:
                j = self.edges[e][0]
                bits |= (1 << j) | anc[j]
            anc[i] = bits
        return anc

    def ordered(self, i: int, j: int) -> bool:
        """Whether precedence already orders tasks i and j (one reaches the other)."""
        return bool((self.descendants[i] >> j) & 1 or (self.descendants[j] >> i) & 1)
