"""The test control plane does what the operator's tests rely on: real CRDs with schema
validation, helm against the API server, scheduling by node selector and nvidia.com/gpu onto
kwok's fake nodes with pods going Running, and garbage collection of owned objects.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import yaml
from controlplane import GPU_RESOURCE, POOL_LABEL, ControlPlane, NodePools, wait_for
from kubernetes import client
from kubernetes.client.exceptions import ApiException

WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.test.moirai.dev"},
    "spec": {
        "group": "test.moirai.dev",
        "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
        "scope": "Namespaced",
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["size"],
                                "properties": {"size": {"type": "integer", "minimum": 1}},
                            }
                        },
                    }
                },
            }
        ],
    },
}
WIDGETS = {"group": "test.moirai.dev", "version": "v1", "plural": "widgets"}
SCHEDULING_TIMEOUT_S = 60.0
GC_TIMEOUT_S = 60.0


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def test_crd_custom_resource_round_trip(
    control_plane: ControlPlane, kube_api: client.ApiClient, namespace: str
) -> None:
    control_plane.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(WIDGET_CRD))
    control_plane.kubectl(
        "wait", "--for=condition=Established", "--timeout=30s", "crd/widgets.test.moirai.dev"
    )
    custom = client.CustomObjectsApi(kube_api)
    body = {"apiVersion": "test.moirai.dev/v1", "kind": "Widget", "metadata": {"name": "w"}}
    custom.create_namespaced_custom_object(
        **WIDGETS, namespace=namespace, body={**body, "spec": {"size": 3}}
    )

    read = custom.get_namespaced_custom_object(**WIDGETS, namespace=namespace, name="w")

    assert read["spec"] == {"size": 3}
    with pytest.raises(ApiException) as rejected:
        custom.create_namespaced_custom_object(
            **WIDGETS, namespace=namespace, body={**body, "spec": {"size": 0}}
        )
    assert rejected.value.status == 422


def test_helm_installs_a_chart(
    control_plane: ControlPlane, kube_api: client.ApiClient, namespace: str, tmp_path: Path
) -> None:
    chart = tmp_path / "probe"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: probe\nversion: 0.1.0\n")
    (chart / "templates" / "configmap.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: probe\ndata:\n"
        "  greeting: {{ .Values.greeting | quote }}\n"
    )

    control_plane.helm("install", "probe", str(chart), "-n", namespace, "--set", "greeting=hi")

    config_map = client.CoreV1Api(kube_api).read_namespaced_config_map("probe", namespace)
    assert config_map.data == {"greeting": "hi"}


def gpu_deployment(name: str, pool: str, gpus: int) -> dict[str, object]:
    labels = {"app": name}
    container = {
        "name": "main",
        "image": "moirai.invalid/never-pulled:0",  # kwok runs no containers
        "resources": {"limits": {GPU_RESOURCE: str(gpus)}},
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"nodeSelector": {POOL_LABEL: pool}, "containers": [container]},
            },
        },
    }


def running_pod(core: client.CoreV1Api, namespace: str, app: str) -> client.V1Pod | None:
    pods = core.list_namespaced_pod(namespace, label_selector=f"app={app}").items
    return next((pod for pod in pods if pod.status.phase == "Running"), None)


def unschedulable(core: client.CoreV1Api, namespace: str, app: str) -> bool:
    pods = core.list_namespaced_pod(namespace, label_selector=f"app={app}").items
    return any(
        condition.type == "PodScheduled" and condition.reason == "Unschedulable"
        for pod in pods
        for condition in pod.status.conditions or []
    )


def test_gpu_deployment_runs_on_the_selected_fake_node(
    kube_api: client.ApiClient, namespace: str, make_node_pool: NodePools
) -> None:
    gpu_pool, cpu_pool = unique("gpu"), unique("cpu")
    gpu_nodes = make_node_pool(gpu_pool, count=2, gpus=1, labels={"accelerator": "test-gpu"})
    make_node_pool(cpu_pool, count=2, cpu="16", memory="64Gi")
    apps, core = client.AppsV1Api(kube_api), client.CoreV1Api(kube_api)

    apps.create_namespaced_deployment(namespace, gpu_deployment("fits", gpu_pool, gpus=1))
    apps.create_namespaced_deployment(namespace, gpu_deployment("too-big", gpu_pool, gpus=2))

    pod = wait_for(
        lambda: running_pod(core, namespace, "fits"), SCHEDULING_TIMEOUT_S, "a Running pod"
    )
    assert pod.spec.node_name in gpu_nodes
    assert wait_for(
        lambda: unschedulable(core, namespace, "too-big"),
        SCHEDULING_TIMEOUT_S,
        "the scheduler to refuse a pod that asks for more GPUs than any node has",
    )


def test_deleting_an_owner_garbage_collects_its_children(
    scheduling_control_plane: ControlPlane, kube_api: client.ApiClient, namespace: str
) -> None:
    core, apps = client.CoreV1Api(kube_api), client.AppsV1Api(kube_api)
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    reference = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "name": "owner",
        "uid": owner.metadata.uid,
    }
    child = gpu_deployment("child", unique("nowhere"), gpus=1)
    child["metadata"] = {"name": "child", "ownerReferences": [reference]}
    apps.create_namespaced_deployment(namespace, child)
    wait_for(
        lambda: apps.list_namespaced_replica_set(namespace).items,
        GC_TIMEOUT_S,
        "the Deployment's ReplicaSet",
    )

    core.delete_namespaced_config_map("owner", namespace)

    def collected() -> bool:
        deployments = apps.list_namespaced_deployment(namespace).items
        replica_sets = apps.list_namespaced_replica_set(namespace).items
        pods = core.list_namespaced_pod(namespace).items
        return not (deployments or replica_sets or pods)

    assert wait_for(collected, GC_TIMEOUT_S, "the Deployment, ReplicaSet and Pod to be collected")
