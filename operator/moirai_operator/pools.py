"""Node pools, discovered from Node objects and matched against a PlacedModel's `spec.pools`.

A pool is a set of nodes that share a pool label (Moirai's `moirai.dev/pool` or a cloud's
node-group label) or match a PlacedModel's node selector. Only nodes that can take new pods
count: a cordoned or NotReady node is skipped, so cordoning a node re-plans onto the rest.

Each matched pool offers device slots: one slot per `threadsPerDevice` allocatable cores, and
per `gpusPerDevice` allocatable GPUs on gpu pools (whose pods request those cores too), also
bounded by memory when `memoryPerDevice` is set, capped by `maxDevices`. A Deployment's pods
may land on any node of the pool, so a pool's device figures (GPU product, memory) are those of
its weakest node.

Everything here is a pure function of Node bodies, so the kopf index and the unit tests feed it
the same dicts. `fingerprint` digests exactly the facts a plan depends on; the operator compares
it with the one stored in status to decide whether the pools changed enough to re-plan (a kwok or
kubelet heartbeat changes a Node but not its fingerprint).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

from kubernetes.utils.quantity import parse_quantity

from moirai.errors import MoiraiError
from moirai_operator.resources import (
    GPU_MEMORY_LABEL,
    GPU_PRODUCT_LABEL,
    GPU_RESOURCE,
    POOL_LABELS,
    NodeBody,
)
from moirai_operator.spec import PoolSpec


class PoolError(MoiraiError):
    """No node pool can host what the spec asks for (the message says what is missing)."""


@dataclass(frozen=True)
class NodeFacts:
    """What placement needs to know about one Node."""

    name: str
    labels: Mapping[str, str]
    schedulable: bool
    cpu: float
    memory_bytes: int
    gpus: int
    gpu_product: str | None
    gpu_memory_bytes: int | None

    @property
    def pool_label(self) -> tuple[str, str] | None:
        """The (key, value) of the node's pool label, Moirai's own first."""
        for key in POOL_LABELS:
            if key in self.labels:
                return key, self.labels[key]
        return None


def node_facts(node: NodeBody) -> NodeFacts:
    meta = node["metadata"]
    labels = dict(meta.get("labels") or {})
    status = node.get("status") or {}
    alloc = status.get("allocatable") or {}
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    cordoned = bool((node.get("spec") or {}).get("unschedulable"))
    gpu_mib = labels.get(GPU_MEMORY_LABEL)
    return NodeFacts(
        name=meta["name"],
        labels=labels,
        schedulable=ready and not cordoned,
        cpu=float(parse_quantity(alloc.get("cpu", "0"))),
        memory_bytes=int(parse_quantity(alloc.get("memory", "0"))),
        gpus=int(parse_quantity(alloc.get(GPU_RESOURCE, "0"))),
        gpu_product=labels.get(GPU_PRODUCT_LABEL),
        gpu_memory_bytes=int(gpu_mib) << 20 if gpu_mib and gpu_mib.isdigit() else None,
    )


@dataclass(frozen=True)
class PoolMatch:
    """A spec pool and the schedulable nodes it matched."""

    spec: PoolSpec
    nodes: tuple[NodeFacts, ...]
    node_selector: Mapping[str, str]
    """What the pool's Deployments select: the spec's selector, or the matched pool label."""
    devices: int
    """Device slots offered, already capped by `maxDevices`."""

    @property
    def weakest(self) -> NodeFacts:
        """The node whose figures every device of the pool is planned with."""
        if self.spec.kind == "gpu":
            return min(self.nodes, key=lambda n: (n.gpu_memory_bytes or 0, n.name))
        return min(self.nodes, key=lambda n: (self.slot_memory(n), n.name))

    def slots_on(self, node: NodeFacts) -> int:
        """Devices that fit on `node`: each requests `threadsPerDevice` cores and, when set,
        `memoryPerDevice` (a gpu device too: its pod asks for them), and `gpusPerDevice` GPUs."""
        slots = int(node.cpu // self.spec.threads_per_device)
        if self.spec.kind == "gpu":
            slots = min(slots, node.gpus // self.spec.gpus_per_device)
        per_device = self.spec.memory_per_device_bytes
        if per_device:
            slots = min(slots, node.memory_bytes // per_device)
        return slots

    def slot_memory(self, node: NodeFacts) -> int:
        """Memory one cpu device may use on `node`."""
        per_device = self.spec.memory_per_device_bytes
        if per_device:
            return per_device
        return node.memory_bytes // max(1, self.slots_on(node))


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _describe(req: PoolSpec) -> str:
    need = f"{req.threads_per_device} cpu"
    if req.memory_per_device:
        need += f" and {req.memory_per_device} memory"
    if req.kind == "gpu":
        return f"{req.gpus_per_device} {GPU_RESOURCE} per device, with {need}"
    return need + " per device"


def match_pool(req: PoolSpec, nodes: Iterable[NodeFacts]) -> PoolMatch:
    """The schedulable nodes of one spec pool and the device slots they offer."""
    nodes = sorted(nodes, key=lambda n: n.name)
    if req.node_selector:
        candidates = [n for n in nodes if _selects(req.node_selector, n.labels)]
        how = f"nodeSelector {dict(req.node_selector)}"
    else:
        candidates = [n for n in nodes if n.pool_label and n.pool_label[1] == req.name]
        how = f"a pool label ({', '.join(POOL_LABELS)}) equal to {req.name!r}"
    usable = [n for n in candidates if n.schedulable]
    if not usable:
        skipped = len(candidates) - len(usable)
        extra = f" ({skipped} matching node(s) cordoned or NotReady)" if skipped else ""
        raise PoolError(f"no schedulable node matches pool {req.name!r} by {how}{extra}")
    if req.node_selector:
        selector = dict(req.node_selector)
    else:
        key, value = usable[0].pool_label or ("", "")
        selector = {key: value}
    probe = PoolMatch(spec=req, nodes=tuple(usable), node_selector=selector, devices=0)
    slots = sum(probe.slots_on(n) for n in usable)
    if slots == 0:
        raise PoolError(
            f"pool {req.name!r} has {len(usable)} node(s) but none can host a device: it needs "
            f"{_describe(req)}"
        )
    return PoolMatch(
        spec=req, nodes=tuple(usable), node_selector=selector, devices=min(slots, req.max_devices)
    )


def match_pools(reqs: Iterable[PoolSpec], nodes: Iterable[NodeFacts]) -> tuple[PoolMatch, ...]:
    nodes = list(nodes)
    return tuple(match_pool(r, nodes) for r in reqs)


def fingerprint(reqs: Iterable[PoolSpec], nodes: Iterable[NodeFacts]) -> str:
    """Digest of everything a plan depends on in the pools (or of why they do not match)."""
    nodes = list(nodes)
    facts: list[object] = []
    for req in reqs:
        try:
            m = match_pool(req, nodes)
        except PoolError as e:
            facts.append({"pool": req.name, "error": str(e)})
            continue
        facts.append(
            {
                "pool": req.name,
                "devices": m.devices,
                "selector": dict(m.node_selector),
                "nodes": [{k: v for k, v in asdict(n).items() if k != "labels"} for n in m.nodes],
            }
        )
    text = json.dumps(facts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
