"""An operator stopped mid-reconcile, and a new one: the PlacedModel converges, once.

In its own module so that no other operator (test_operator.py's runs one per module) serves the
PlacedModel meanwhile: only the two operators started here ever touch it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from test_operator_harness import Cluster, install_crd, models_for, running_operator, wait_until


@pytest.fixture
def models(tmp_path) -> Iterator[dict[str, Any]]:
    with models_for(tmp_path / "models") as served:
        yield served


@pytest.fixture
def cluster(kube_api, scheduling_control_plane, namespace) -> Cluster:
    install_crd(scheduling_control_plane)
    return Cluster(kube_api, scheduling_control_plane, namespace)


def test_restart_mid_reconcile_converges_without_duplicates(
    scheduling_control_plane, cluster, make_node_pool, models, tmp_path
):
    cpu = f"{cluster.ns}-cpu"
    make_node_pool(cpu, count=2, cpu="8")
    spec = {
        # A slow model store: the first operator is stopped while it fetches the model.
        "model": {"uri": f"{models['url']}/slow/mlp.onnx"},
        "pools": [{"name": cpu, "kind": "cpu", "threadsPerDevice": 2, "maxDevices": 4}],
    }
    with running_operator(scheduling_control_plane, tmp_path / "cache"):
        cluster.apply("mlp", spec)
        wait_until("the fetch to start", lambda: cluster.status("mlp").get("phase") == "Profiling")
    assert cluster.status("mlp").get("phase") == "Profiling"
    with running_operator(scheduling_control_plane, tmp_path / "cache"):
        status = cluster.wait_phase("mlp", "Ready", timeout=90)
    devices = {a["deployment"] for a in status["placement"]["assignment"]}
    assert set(cluster.deployments("mlp")) == devices | {"mlp-gateway"}
    replicasets = cluster.apps.list_namespaced_replica_set(cluster.ns).items
    assert len(replicasets) == len(devices) + 1
