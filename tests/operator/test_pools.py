"""Pool discovery from Node bodies: labels, capacity, cordoned and NotReady nodes, fingerprints."""

from __future__ import annotations

from typing import Any

import pytest
from moirai_operator.pools import PoolError, fingerprint, match_pool, node_facts
from moirai_operator.spec import PoolSpec
from operator_bodies import GIB, make_node


def facts(nodes: list[dict[str, Any]]) -> list:
    return [node_facts(n) for n in nodes]


def test_node_facts_reads_allocatable_and_labels() -> None:
    n = node_facts(
        make_node(
            "g",
            "gpu",
            cpu="3800m",
            memory="16Gi",
            gpus=2,
            product="Tesla-T4",
            labels={"nvidia.com/gpu.memory": "15360"},
        )
    )
    assert n.cpu == pytest.approx(3.8)
    assert n.memory_bytes == 16 * GIB
    assert n.gpus == 2 and n.gpu_product == "Tesla-T4"
    assert n.gpu_memory_bytes == 15360 << 20
    assert n.schedulable and n.pool_label == ("moirai.dev/pool", "gpu")


@pytest.mark.parametrize(
    "label",
    [
        "cloud.google.com/gke-nodepool",
        "eks.amazonaws.com/nodegroup",
        "kubernetes.azure.com/agentpool",
        "karpenter.sh/nodepool",
    ],
)
def test_cloud_pool_labels_match_by_name_and_become_the_selector(label: str) -> None:
    m = match_pool(PoolSpec("big", "cpu"), facts([make_node("n", "big", pool_label=label)]))
    assert m.node_selector == {label: "big"}


def test_gpu_slots_count_gpus_per_device_and_cap_at_max_devices(nodes) -> None:
    m = match_pool(PoolSpec("gpu", "gpu", max_devices=8), facts(nodes))
    assert m.devices == 3  # 1 + 2 GPUs
    m = match_pool(PoolSpec("gpu", "gpu", max_devices=8, gpus_per_device=2), facts(nodes))
    assert m.devices == 1  # only gpu-b has two
    m = match_pool(PoolSpec("gpu", "gpu", max_devices=2), facts(nodes))
    assert m.devices == 2
    assert m.weakest.name == "gpu-a" or m.weakest.gpu_memory_bytes is None


def test_cpu_slots_are_bounded_by_threads_and_memory() -> None:
    nodes = facts([make_node("c", "cpu", cpu="16", memory="20Gi")])
    assert (
        match_pool(PoolSpec("cpu", "cpu", max_devices=64, threads_per_device=4), nodes).devices == 4
    )
    m = match_pool(
        PoolSpec("cpu", "cpu", max_devices=64, threads_per_device=4, memory_per_device="8Gi"), nodes
    )
    assert m.devices == 2
    assert m.slot_memory(m.nodes[0]) == 8 * GIB


def test_node_selector_overrides_pool_labels() -> None:
    nodes = facts([make_node("a", labels={"tier": "fast"}), make_node("b", "fast")])
    m = match_pool(PoolSpec("fast", "cpu", node_selector={"tier": "fast"}), nodes)
    assert [n.name for n in m.nodes] == ["a"]
    assert m.node_selector == {"tier": "fast"}


def test_cordoned_and_not_ready_nodes_do_not_count() -> None:
    nodes = facts(
        [make_node("a", "p", cordoned=True), make_node("b", "p", ready=False), make_node("c", "p")]
    )
    assert [n.name for n in match_pool(PoolSpec("p", "cpu", max_devices=9), nodes).nodes] == ["c"]
    with pytest.raises(PoolError, match=r"2 matching node\(s\) cordoned or NotReady"):
        match_pool(PoolSpec("p", "cpu"), nodes[:2])


def test_errors_say_what_is_missing() -> None:
    with pytest.raises(PoolError, match="no schedulable node matches pool 'tpu'"):
        match_pool(PoolSpec("tpu", "gpu"), facts([make_node("a", "cpu")]))
    with pytest.raises(PoolError, match=r"needs 1 nvidia.com/gpu per device"):
        match_pool(PoolSpec("cpu", "gpu"), facts([make_node("a", "cpu")]))
    with pytest.raises(PoolError, match=r"needs 4 cpu and 64Gi memory per device"):
        match_pool(
            PoolSpec("cpu", "cpu", threads_per_device=4, memory_per_device="64Gi"),
            facts([make_node("a", "cpu")]),
        )


def test_fingerprint_moves_with_the_pools_not_with_heartbeats(nodes) -> None:
    reqs = [PoolSpec("gpu", "gpu", max_devices=4), PoolSpec("cpu", "cpu")]
    base = fingerprint(reqs, facts(nodes))
    again = [dict(n) for n in nodes]
    again[0] = {**nodes[0], "status": {**nodes[0]["status"], "heartbeat": "later"}}
    assert fingerprint(reqs, facts(again)) == base
    assert fingerprint(reqs, facts([*nodes, make_node("gpu-c", "gpu", gpus=1)])) != base
    cordoned = [make_node("gpu-a", "gpu", gpus=1, cordoned=True), *nodes[1:]]
    assert fingerprint(reqs, facts(cordoned)) != base
    assert fingerprint(reqs, facts(nodes[2:])) != base  # gpu pool gone: an error, digested
    assert fingerprint(reqs, facts(list(reversed(nodes)))) == base


def test_gpu_slots_count_the_cores_and_memory_their_pods_request_too() -> None:
    """A gpu device's pod requests threadsPerDevice cores and memoryPerDevice: a slot counted
    from the GPUs alone left pods Pending for ever ('Deploying', no reason)."""
    node = facts([make_node("g", "gpu", gpus=4, cpu="4", memory="16Gi")])
    assert match_pool(PoolSpec("gpu", "gpu", max_devices=8), node).devices == 2  # 2 cores each
    m = match_pool(PoolSpec("gpu", "gpu", max_devices=8, threads_per_device=1), node)
    assert m.devices == 4
    roomy = PoolSpec("gpu", "gpu", max_devices=8, threads_per_device=1, memory_per_device="8Gi")
    assert match_pool(roomy, node).devices == 2
    with pytest.raises(PoolError) as error:
        match_pool(PoolSpec("gpu", "gpu", memory_per_device="32Gi"), node)
    assert str(error.value) == (
        "pool 'gpu' has 1 node(s) but none can host a device: it needs 1 nvidia.com/gpu per "
        "device, with 2 cpu and 32Gi memory"
    )
