"""Names and raw shapes of the Kubernetes objects the operator reads and writes.

Everything the operator exchanges with the API server is a plain JSON-like dict, as kopf hands it
over and as server-side apply takes it. The TypedDicts below document the parts of those bodies
the operator actually reads, so the type checker can follow a field from the API to its use;
they are views, never validated copies (validation is `spec.py`'s job). The constants are the
one place where the API group, the labels and the field manager are spelled.
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict

GROUP = "moirai.dev"
VERSION = "v1alpha1"
PLURAL = "placedmodels"
KIND = "PlacedModel"
API_VERSION = f"{GROUP}/{VERSION}"

FIELD_MANAGER = "moirai-operator"
"""Server-side apply field manager: owns every field the operator writes on its children."""

# Labels on every child (selectors, pruning, the NetworkPolicy and `kubectl get -l`).
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_PLACEDMODEL = "moirai.dev/placedmodel"
LABEL_DEVICE = "moirai.dev/device"
LABEL_POOL = "moirai.dev/pool"
LABEL_LANE = "moirai.dev/lane"
MANAGED_BY = "moirai-operator"
COMPONENT_STAGE = "stage-server"
COMPONENT_GATEWAY = "gateway"
COMPONENT_PLAN = "plan"
COMPONENT_PROFILER = "profiler"
COMPONENT_CHAIN = "chain"
ANNOTATION_PLAN_DIGEST = "moirai.dev/plan-digest"
ANNOTATION_SECRETS_DIGEST = "moirai.dev/secrets-digest"
"""On a pod template: a digest of the Secrets its pods read, so that a Secret changed or made
again rolls them (`children.secrets_digest`)."""

# The gateway's own ports, beside the two public ones a PlacedModel chooses (spec.serving).
GATEWAY_CHAIN_PORT = 50052
"""The gateway's chain port (internal), where the last stages push the model's outputs."""
METRICS_PORT = 9090
"""The gateway's Prometheus `/metrics` (no token; reached only from inside the cluster)."""

# Node labels naming the node pool, in order of preference: Moirai's own, then the clouds'.
POOL_LABELS = (
    "moirai.dev/pool",
    "cloud.google.com/gke-nodepool",
    "eks.amazonaws.com/nodegroup",
    "kubernetes.azure.com/agentpool",
    "karpenter.sh/nodepool",
)
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"
"""MiB of memory per GPU, set by NVIDIA GPU feature discovery; preferred over the catalogue."""


class ObjectMeta(TypedDict, total=False):
    name: str
    namespace: str
    uid: str
    generation: int
    labels: dict[str, str]
    annotations: dict[str, str]
    ownerReferences: list[dict[str, Any]]


class Condition(TypedDict):
    type: str
    status: str
    reason: str
    message: str
    lastTransitionTime: str
    observedGeneration: NotRequired[int]


class PlacedModelStatus(TypedDict, total=False):
    phase: str
    observedGeneration: int
    endpoint: str
    message: str
    poolsFingerprint: str
    placement: dict[str, Any]
    replicas: int
    selector: str
    secrets: list[dict[str, str]]
    conditions: list[Condition]


class PlacedModelBody(TypedDict):
    apiVersion: str
    kind: str
    metadata: ObjectMeta
    spec: dict[str, Any]
    status: NotRequired[PlacedModelStatus]


class NodeBody(TypedDict):
    metadata: ObjectMeta
    spec: NotRequired[dict[str, Any]]
    status: NotRequired[dict[str, Any]]


Manifest = dict[str, Any]
"""A complete object to server-side apply: apiVersion, kind, metadata (name, namespace), ..."""
