"""Builders of raw Node and PlacedModel bodies and of a small model, for the operator's unit tests
and its control-plane tests (`tests/kube/test_operator_harness.py` imports this module), so both
build a PlacedModel one way; and the CRD's schema, which both check against. Only the standard
library, onnx, numpy and yaml: importing it is cheap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from moirai_operator.resources import API_VERSION, KIND

GIB = 1 << 30
CRD = Path(__file__).resolve().parents[2] / "crds" / "placedmodels.moirai.dev.yaml"


def schema() -> dict[str, Any]:
    """The CRD's one version: its name, schema, printer columns."""
    crd = yaml.safe_load(CRD.read_text())
    (version,) = crd["spec"]["versions"]
    return version


COMMON_VALUES = [
    *("--set", "image.repository=registry.example.com/team/moirai"),
    *("--set-string", "image.tag=20240101"),
    *("--set", "image.pullPolicy=Always"),
    *("--set", "watchNamespaces={ml,ml-staging}"),
    *(
        "--set",
        "resources.requests.cpu=2,resources.requests.memory=4Gi,resources.limits.memory=8Gi",
    ),
    *("--set", "serving.authTokenSecret=clients,serving.tlsSecret=endpoint-tls"),
    *("--set", "solver.name=cpsat,solver.timeLimitSeconds=30,solver.workers=4"),
    *("--set", "batching.maxBatchSize=8,batching.preferredBatchSizes={4,8}"),
    *("--set-json", 'imagePullSecrets=[{"name":"regcred"}]'),
    *("--set-json", 'tolerations=[{"key":"dedicated","operator":"Exists"}]'),
    *("--set-json", 'extraVolumes=[{"name":"models","persistentVolumeClaim":{"claimName":"m"}}]'),
    *("--set-json", 'extraVolumeMounts=[{"name":"models","mountPath":"/models"}]'),
    *("--set", "podAnnotations.team=ml,nodeSelector.pool=system"),
    *("--set", "sharedEndpoint.enabled=true,sharedEndpoint.serviceType=LoadBalancer"),
]
"""Values users commonly set of the chart: test_helm_chart.py renders them,
tests/kube/test_chart_install.py dry-runs them on a server."""


def make_node(
    name: str,
    pool: str | None = None,
    *,
    pool_label: str = "moirai.dev/pool",
    cpu: str = "8",
    memory: str = "32Gi",
    gpus: int = 0,
    product: str | None = None,
    ready: bool = True,
    cordoned: bool = False,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    all_labels = dict(labels or {})
    if pool:
        all_labels[pool_label] = pool
    if product:
        all_labels["nvidia.com/gpu.product"] = product
    allocatable = {"cpu": cpu, "memory": memory, "pods": "110"}
    if gpus:
        allocatable["nvidia.com/gpu"] = str(gpus)
    return {
        "metadata": {"name": name, "labels": all_labels},
        "spec": {"unschedulable": True} if cordoned else {},
        "status": {
            "allocatable": allocatable,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def make_spec(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"uri": "https://models.example/m.onnx"},
        "pools": [
            {"name": "gpu", "kind": "gpu", "maxDevices": 2},
            {"name": "cpu", "kind": "cpu", "threadsPerDevice": 4},
        ],
    }
    spec.update(overrides)
    return spec


def placed_model(name: str, spec: dict[str, Any], **metadata: Any) -> dict[str, Any]:
    """A PlacedModel body as the API server takes it (`metadata`: namespace, uid, ...)."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, **metadata},
        "spec": spec,
    }


def make_body(spec: dict[str, Any] | None = None, **status: Any) -> dict[str, Any]:
    """A PlacedModel as kopf hands it to the operator: created, with a uid and a generation."""
    body = placed_model("resnet", spec or make_spec(), namespace="ml", uid="uid-1", generation=1)
    if status:
        body["status"] = status
    return body


def make_plan(devices: tuple[tuple[str, str], ...] = (("gpu-0", "gpu"), ("cpu-0", "cpu"))):
    """A Plan over `(device, kind)` pairs, as the planner would return it."""
    from moirai_operator.catalogue import DeviceEntry
    from moirai_operator.plan import Plan, PlannedDevice

    planned = tuple(
        PlannedDevice(
            entry=DeviceEntry(
                name=name,
                kind=kind,
                pool=name.rsplit("-", 1)[0],
                provider="CUDAExecutionProvider" if kind == "gpu" else "CPUExecutionProvider",
                threads=4,
                peak_flops=1e12,
                memory_bandwidth_bytes_per_s=1e11,
                memory_bytes=16 * GIB,
            ),
            node_selector={"moirai.dev/pool": name.rsplit("-", 1)[0]},
            gpus=1 if kind == "gpu" else 0,
            memory_request=None if kind == "gpu" else "8Gi",
            tasks=3,
        )
        for name, kind in devices
    )
    # A chain x -> t1 -> ... -> y with one stage per device.
    names = ["x", *(f"t{i}" for i in range(1, len(planned))), "y"]
    tensor = {"datatype": "FP32", "shape": [1, 4]}
    stage_plan = {
        "format": "moirai.stageplan/v1",
        "model": {"name": "m", "path": "", "sha256": "", "input_shapes": {}},
        "devices": [{"name": d.entry.name, "kind": d.entry.kind} for d in planned],
        "inputs": [{"name": "x", **tensor}],
        "outputs": [{"name": "y", **tensor}],
        "tensors": {n: tensor for n in names[1:-1]},
        "stages": [
            {
                "id": f"s{i}",
                "device": d.entry.name,
                "nodes": [],
                "inputs": [names[i]],
                "outputs": [names[i + 1]],
            }
            for i, d in enumerate(planned)
        ],
        "routing": {
            **{names[i]: [f"s{i}"] for i in range(len(planned))},
            "y": ["gateway"],
        },
        "endpoints": {},
    }
    return Plan(
        devices=planned,
        stages=len(planned),
        stage_plan=stage_plan,
        placement={"format": "moirai.placement/v1", "makespan_ms": 12.5},
        solver="cpsat",
        solver_status="optimal",
        objective="latency",
        latency_ms=12.5,
        lower_bound_ms=12.5,
        gap=0.0,
        profiling="analytic",
    )


def write_mlp(path, hidden: int = 64, layers: int = 4, seed: int = 0, batch: int | str = 1):
    """A small MLP (MatMul/Add/Relu chain) as an ONNX file; returns the path. `batch` a name:
    a symbolic batch dimension."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev = "x"
    for i in range(layers):
        w = numpy_helper.from_array(
            (rng.standard_normal((hidden, hidden)) * 0.1).astype(np.float32), f"w{i}"
        )
        b = numpy_helper.from_array(np.zeros(hidden, np.float32), f"b{i}")
        inits += [w, b]
        nodes += [
            helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"], name=f"MatMul_{i}"),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"Add_{i}"),
            helper.make_node("Relu", [f"a{i}"], [f"h{i}"], name=f"Relu_{i}"),
        ]
        prev = f"h{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"], name="Out"))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, hidden])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path
