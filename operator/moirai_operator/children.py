"""The objects a PlacedModel owns, built as pure functions of the PlacedModel and its plan.

For a plan over devices d1..dn the operator writes:

    ConfigMap    <pm>-plan            plan.json (stage plan) + placement.json
    Deployment   <pm>-<device>        one stage server per device and lane: the pool's node
    Service      <pm>-<device>        selector, GPU/CPU/memory requests, the plan mounted, the
                                      model fetched and verified by an init container (lane k
                                      of spec.serving.replicas names device d `d-l<k>`)
    Deployment   <pm>-gateway         the Open Inference Protocol gateway ...
    Service      <pm>-gateway         ... and its Service: the PlacedModel's endpoint
    Service      <pm>-gateway-chain   the gateway's internal chain port, where the last stages
                                      push the model's outputs
    NetworkPolicy <pm>-stages         stage servers admit traffic only from their peer stages
                                      and their gateway (when enabled)
    NetworkPolicy <pm>-gateway        the gateway admits clients on its public ports, pods of
                                      the cluster on its metrics port, and only its stage
                                      servers on its chain port (when enabled)
    HorizontalPodAutoscaler <pm>-lanes   the lanes scaled on requests in flight (when asked)
    Secret       <pm>-chain-token the chain token the stage servers and the gateway share
                                      (`chain_secret`: made once, never by `build_children`)

Every object carries the same labels (so the operator can list and prune what it owns), an
ownerReference to the PlacedModel (so deleting it deletes them), and names derived only from the
PlacedModel and the device (so applying twice, or after a restart, converges to one object). Pod
templates carry the plan's digest: a new plan rolls the stage servers; an unchanged one does not.
They also carry a digest of the Secrets their pods read (`secrets_digest`, from digests that the
reconciler computes and that reveal no token): a Secret made again or changed rolls the pods
that read it — a new chain token rolls every pod, a new endpoint token or certificate only the
gateway — since a pod reads its Secrets once, when it starts.

The stage-server and gateway command lines are written here and nowhere else: tests run them
as local processes and, in tests/container, as containers of the image, to prove that the
manifests really serve. Internal (chain) traffic has ports of its own, never the public ones.
Stage servers listen on their pod's IP (the downward API's `status.podIP`), not on every
address: they are reached only through their Services, and pods that share a network namespace
(host networking, the container tests) can then all use the one chain port. Every push is gRPC
(`--grpc-only`): no two pods share a loopback, so the same-host fast path never applies.

Tokens reach the pods by reference only (`env.valueFrom.secretKeyRef`): the chain token from the
PlacedModel's chain Secret, which the reconciler creates once with a random token and then keeps
(a new token would split running pods from new ones), and the endpoint's bearer token from the
Secret that `spec.serving.authTokenSecret` names. No token is ever an argument of a builder but
`chain_secret`'s, so none can land in a pod spec, a label or an annotation.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from moirai.errors import MoiraiError
from moirai.stageplan import GATEWAY, StagePlan
from moirai_operator.lanes import lane_name, with_lanes
from moirai_operator.plan import Plan, PlannedDevice
from moirai_operator.pools import PoolMatch
from moirai_operator.resources import (
    ANNOTATION_PLAN_DIGEST,
    ANNOTATION_SECRETS_DIGEST,
    API_VERSION,
    COMPONENT_CHAIN,
    COMPONENT_GATEWAY,
    COMPONENT_PLAN,
    COMPONENT_PROFILER,
    COMPONENT_STAGE,
    GATEWAY_CHAIN_PORT,
    GPU_RESOURCE,
    KIND,
    LABEL_COMPONENT,
    LABEL_DEVICE,
    LABEL_INSTANCE,
    LABEL_LANE,
    LABEL_MANAGED_BY,
    LABEL_NAME,
    LABEL_PLACEDMODEL,
    LABEL_POOL,
    MANAGED_BY,
    METRICS_PORT,
    Manifest,
)
from moirai_operator.spec import PlacedModelSpec
from stage_server.auth import AUTH_TOKEN_ENV, CHAIN_TOKEN_ENV

STAGE_PORT = 50051
"""Chain port of stage servers (internal)."""
POD_IP_ENV = "POD_IP"
PLAN_DIR = "/etc/moirai/plan"
MODEL_DIR = "/var/lib/moirai/model"
MODEL_FILE = "model.onnx"
PROFILE_DIR = "/var/lib/moirai/profile"
PROFILE_DEADLINE_S = 1800
"""A profiling Job that has not finished after this long is stopped by Kubernetes."""
CONFIGMAP_LIMIT = 1_000_000
"""Bytes: the API server rejects ConfigMaps over 1 MiB; keep a margin for metadata."""
RUN_AS_USER = 10001
"""The non-root user of the image (see the Dockerfile)."""
TOKEN_KEY = "token"
"""The key of a token in its Secret: the chain Secret's and `spec.serving.authTokenSecret`'s."""
TLS_DIR = "/etc/moirai/tls"
TLS_CERT_KEY, TLS_KEY_KEY = "tls.crt", "tls.key"
"""The keys of a `kubernetes.io/tls` Secret (`spec.serving.tlsSecret`), mounted in `TLS_DIR`."""
TLS_CA_KEY = "ca.crt"
"""The issuer's certificate in a TLS Secret, where there is one (cert-manager writes it): the
trust root the operator publishes for the shared endpoint (`status.gatewayCA`)."""


class PlanTooLargeError(MoiraiError):
    """The plan does not fit in a ConfigMap."""


@dataclass(frozen=True)
class Owner:
    """The PlacedModel that owns the children."""

    name: str
    namespace: str
    uid: str


@dataclass(frozen=True)
class BuildOptions:
    """Operator-wide settings that shape the children (from the Helm values)."""

    network_policy: bool = True
    image_pull_policy: str = "IfNotPresent"


def child_name(owner: str, suffix: str) -> str:
    """`<owner>-<suffix>`, shortened with a digest to fit a DNS-1035 label (Service names)."""
    name = f"{owner}-{suffix}"
    if not name[0].isalpha():
        name = f"pm-{name}"
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(owner.encode()).hexdigest()[:8]
    head = owner[: 63 - len(suffix) - len(digest) - 2].rstrip("-")
    return f"{head}-{digest}-{suffix}"


def labels(owner: Owner, component: str) -> dict[str, str]:
    return {
        LABEL_NAME: "moirai",
        LABEL_INSTANCE: owner.name,
        LABEL_COMPONENT: component,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_PLACEDMODEL: owner.name,
    }


def selector(owner: Owner) -> dict[str, str]:
    """Selects every child of `owner` (used to list and prune)."""
    return {LABEL_MANAGED_BY: MANAGED_BY, LABEL_PLACEDMODEL: owner.name}


def _metadata(owner: Owner, name: str, component: str, **extra: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": {**labels(owner, component), **extra},
        "ownerReferences": [
            {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": owner.name,
                "uid": owner.uid,
                "controller": True,
            }
        ],
    }


def plan_configmap_name(owner: Owner) -> str:
    return child_name(owner.name, "plan")


def stage_name(owner: Owner, device: str) -> str:
    return child_name(owner.name, device)


def gateway_name(owner: Owner) -> str:
    return child_name(owner.name, "gateway")


def gateway_chain_name(owner: Owner) -> str:
    return child_name(owner.name, "gateway-chain")


def chain_secret_name(owner: Owner) -> str:
    return child_name(owner.name, "chain-token")


def chain_secret(owner: Owner, token: str) -> Manifest:
    """The Secret holding the chain token of `owner`'s stage servers and gateway, owned by the
    PlacedModel (deleting it deletes the Secret). Created once: see the module docstring."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(owner, chain_secret_name(owner), COMPONENT_CHAIN),
        "type": "Opaque",
        "stringData": {TOKEN_KEY: token},
    }


def stage_secrets(owner: Owner) -> list[str]:
    """The Secrets a stage server reads: the chain token's."""
    return [chain_secret_name(owner)]


def gateway_secrets(owner: Owner, spec: PlacedModelSpec) -> list[str]:
    """The Secrets the gateway reads: the chain token's, and the endpoint token's and the TLS
    Secret when the spec names them. Every Secret a pod of `owner` reads is one of these."""
    named = (spec.serving.auth_token_secret, spec.serving.tls_secret)
    return [chain_secret_name(owner), *(name for name in named if name)]


def secrets_digest(digests: Mapping[str, str], names: list[str]) -> str:
    """The pod-template annotation of pods that read the Secrets `names`, from each one's
    digest (by name; the reconciler's, which reveal no token)."""
    text = "\n".join(f"{name}={digests.get(name, '')}" for name in names)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


SECRET_VOLUME_KEYS = {"tls": (TLS_CERT_KEY, TLS_KEY_KEY)}
"""The keys that the pods read from each Secret volume they mount, by volume name."""


def pod_secrets(pod: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """The Secrets a pod spec as built here reads (an environment `secretKeyRef`, a Secret
    volume), by name, each with the keys it reads, in the order of `stage_secrets` and
    `gateway_secrets`: what a running Deployment's pods read, told from its template alone
    (its spec may have been edited since, and may no longer parse)."""
    out: dict[str, tuple[str, ...]] = {}
    for container in [*pod.get("initContainers", []), *pod.get("containers", [])]:
        for env in container.get("env") or []:
            ref = (env.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                out[ref["name"]] = (*out.get(ref["name"], ()), ref["key"])
    for volume in pod.get("volumes") or []:
        if "secret" in volume:
            name = volume["secret"]["secretName"]
            out[name] = (*out.get(name, ()), *SECRET_VOLUME_KEYS.get(volume["name"], ()))
    return out


def secrets_patch(digest: str) -> dict[str, Any]:
    """A merge patch of a Deployment that sets its pods' Secrets digest (`secrets_digest`):
    rolls them, and nothing else of the Deployment changes."""
    annotations = {ANNOTATION_SECRETS_DIGEST: digest}
    return {"spec": {"template": {"metadata": {"annotations": annotations}}}}


def _secret_env(env: str, secret: str) -> dict[str, Any]:
    return {"name": env, "valueFrom": {"secretKeyRef": {"name": secret, "key": TOKEN_KEY}}}


def chain_token_env(owner: Owner) -> dict[str, Any]:
    """`MOIRAI_CHAIN_TOKEN` of every stage server and the gateway, from the chain Secret."""
    return _secret_env(CHAIN_TOKEN_ENV, chain_secret_name(owner))


def gateway_host(owner: Owner) -> str:
    """The gateway Service's DNS name in the cluster: the name its certificate must carry
    (`spec.serving.tlsSecret`) for the shared endpoint, which verifies it, to reach it."""
    return f"{gateway_name(owner)}.{owner.namespace}.svc"


def endpoint(owner: Owner, spec: PlacedModelSpec) -> str:
    """The in-cluster URL of the gateway (Open Inference Protocol over HTTP, or HTTPS with
    `spec.serving.tlsSecret`)."""
    scheme = "https" if spec.serving.tls_secret else "http"
    return f"{scheme}://{gateway_host(owner)}:{spec.serving.port}"


def lanes(spec: PlacedModelSpec) -> range:
    """The lanes served: `spec.serving.replicas` copies of the chain (`lanes.py`)."""
    return range(spec.serving.replicas)


def endpoints(owner: Owner, plan: Plan, spec: PlacedModelSpec) -> dict[str, str]:
    """gRPC address (host:port) of every lane's stage servers and of the gateway's chain port,
    by Service name."""
    out = {}
    for k in lanes(spec):
        for d in plan.devices:
            name = lane_name(d.entry.name, k)
            out[name] = f"{stage_name(owner, name)}.{owner.namespace}.svc:{STAGE_PORT}"
    out[GATEWAY] = f"{gateway_chain_name(owner)}.{owner.namespace}.svc:{GATEWAY_CHAIN_PORT}"
    return out


def plan_files(owner: Owner, spec: PlacedModelSpec, plan: Plan) -> dict[str, str]:
    """The files of the plan ConfigMap: the stage plan as the pods must read it, and the
    placement. The stage plan gets its lanes, the in-pod model path and the Services as
    endpoints."""
    solved = StagePlan.from_dict(dict(plan.stage_plan), "the solved plan")
    stage_plan = with_lanes(solved, spec.serving.replicas).to_dict()
    # Served as /v2/models/<PlacedModel name>, at the path where the pods find the model.
    stage_plan["model"] = {
        **stage_plan.get("model", {}),
        "name": owner.name,
        "path": model_path(spec),
    }
    stage_plan["endpoints"] = endpoints(owner, plan, spec)
    return {
        "plan.json": json.dumps(stage_plan, indent=1, sort_keys=True) + "\n",
        "placement.json": json.dumps(plan.placement, indent=1, sort_keys=True) + "\n",
    }


def plan_configmap(owner: Owner, spec: PlacedModelSpec, plan: Plan) -> Manifest:
    files = plan_files(owner, spec, plan)
    size = sum(len(v.encode()) for v in files.values())
    if size > CONFIGMAP_LIMIT:
        raise PlanTooLargeError(
            f"the plan is {size} bytes, over the {CONFIGMAP_LIMIT}-byte ConfigMap limit: "
            "coarsen the model or use fewer devices"
        )
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(owner, plan_configmap_name(owner), COMPONENT_PLAN),
        "data": files,
    }


def model_path(spec: PlacedModelSpec) -> str:
    """Where the model file is inside a pod."""
    return f"{MODEL_DIR}/{MODEL_FILE}" if spec.model.is_remote else spec.model.local_path


def stage_command(device: str, spec: PlacedModelSpec) -> list[str]:
    return [
        "moirai",
        "stage",
        "--plan",
        f"{PLAN_DIR}/plan.json",
        "--model",
        model_path(spec),
        "--device",
        device,
        "--host",
        f"$({POD_IP_ENV})",
        "--port",
        str(STAGE_PORT),
        "--grpc-only",
    ]


def gateway_command(spec: PlacedModelSpec) -> list[str]:
    """The gateway needs only the plan (stage servers hold the model)."""
    tls = (
        [
            "--tls-cert-file",
            f"{TLS_DIR}/{TLS_CERT_KEY}",
            "--tls-key-file",
            f"{TLS_DIR}/{TLS_KEY_KEY}",
        ]
        if spec.serving.tls_secret
        else []
    )
    return [
        "moirai",
        "gateway",
        "--plan",
        f"{PLAN_DIR}/plan.json",
        "--host",
        "0.0.0.0",
        "--http-port",
        str(spec.serving.port),
        "--grpc-port",
        str(spec.serving.grpc_port),
        "--chain-port",
        str(GATEWAY_CHAIN_PORT),
        "--metrics-port",
        str(METRICS_PORT),
        "--grpc-only",
        *spec.serving.batching.to_args(),
        *tls,
    ]


def fetch_command(spec: PlacedModelSpec) -> list[str]:
    cmd = ["python", "-m", "moirai_operator.fetch", spec.model.uri, f"{MODEL_DIR}/{MODEL_FILE}"]
    if spec.model.sha256:
        cmd += ["--sha256", spec.model.sha256]
    return cmd


_CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


def _pod_spec(
    owner: Owner,
    spec: PlacedModelSpec,
    options: BuildOptions,
    container: dict[str, Any],
    image: str,
    with_model: bool,
    with_plan: bool = True,
) -> dict[str, Any]:
    """A pod with the plan mounted (`with_plan`) and the model fetched and verified first
    (`with_model`)."""
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    mounts = [{"name": "tmp", "mountPath": "/tmp"}]
    if with_plan:
        volumes.append({"name": "plan", "configMap": {"name": plan_configmap_name(owner)}})
        mounts.append({"name": "plan", "mountPath": PLAN_DIR, "readOnly": True})
    pod: dict[str, Any] = {
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
    }
    if with_model:
        if spec.model.volume is None:
            volumes.append({"name": "model", "emptyDir": {}})
            mounts.append({"name": "model", "mountPath": MODEL_DIR})
        else:
            claim = {"claimName": spec.model.volume.claim_name, "readOnly": True}
            volumes.append({"name": "model", "persistentVolumeClaim": claim})
            mounts.append(
                {"name": "model", "mountPath": spec.model.volume.mount_path, "readOnly": True}
            )
        pod["initContainers"] = [
            {
                "name": "fetch-model",
                "image": image,
                "imagePullPolicy": options.image_pull_policy,
                "command": fetch_command(spec),
                "volumeMounts": mounts,
                "securityContext": _CONTAINER_SECURITY,
            }
        ]
    pod["containers"] = [
        {
            **container,
            "image": image,
            "imagePullPolicy": options.image_pull_policy,
            "volumeMounts": mounts,
            "securityContext": _CONTAINER_SECURITY,
        }
    ]
    pod["volumes"] = volumes
    return pod


def _deployment(
    owner: Owner,
    name: str,
    component: str,
    replicas: int,
    pod_labels: Mapping[str, str],
    pod_spec: dict[str, Any],
    digest: str,
    secrets: str | None = None,
) -> Manifest:
    """`digest`: the plan's, `secrets`: the Secrets' (`secrets_digest`; None: not annotated)."""
    match = {**selector(owner), LABEL_COMPONENT: component, "moirai.dev/child": name}
    annotations = {ANNOTATION_PLAN_DIGEST: digest}
    if secrets is not None:
        annotations[ANNOTATION_SECRETS_DIGEST] = secrets
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(owner, name, component, **pod_labels),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": match},
            "template": {
                "metadata": {
                    "labels": {**labels(owner, component), **pod_labels, **match},
                    "annotations": annotations,
                },
                "spec": pod_spec,
            },
        },
    }


POD_IP = {"name": POD_IP_ENV, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}


def _grpc_probe(port: int) -> dict[str, Any]:
    return {"grpc": {"port": port}, "periodSeconds": 10, "failureThreshold": 3}


def stage_deployment(
    owner: Owner,
    spec: PlacedModelSpec,
    plan: Plan,
    device: PlannedDevice,
    options: BuildOptions,
    lane: int = 0,
    secrets: Mapping[str, str] | None = None,
) -> Manifest:
    """`secrets`: each Secret's digest by name (see `secrets_digest`); None: not annotated."""
    requests: dict[str, str] = {"cpu": str(device.entry.threads)}
    limits: dict[str, str] = {}
    if device.gpus:
        limits[GPU_RESOURCE] = requests[GPU_RESOURCE] = str(device.gpus)
    if device.memory_bytes:
        # What the plan says this server peaks at, within the device's memory as planned.
        requests["memory"] = str(device.memory_bytes)
        limits["memory"] = str(max(device.memory_bytes, device.entry.memory_bytes))
    elif device.memory_request:
        limits["memory"] = requests["memory"] = device.memory_request
    container = {
        "name": "stage-server",
        "command": stage_command(lane_name(device.entry.name, lane), spec),
        "env": [POD_IP, chain_token_env(owner)],
        "ports": [{"name": "chain", "containerPort": STAGE_PORT}],
        "resources": {"requests": requests, **({"limits": limits} if limits else {})},
        "readinessProbe": _grpc_probe(STAGE_PORT),
        "livenessProbe": {**_grpc_probe(STAGE_PORT), "initialDelaySeconds": 30},
    }
    image = spec.gpu_image if device.gpus else spec.image
    pod = _pod_spec(owner, spec, options, container, image, with_model=True)
    pod["nodeSelector"] = dict(device.node_selector)
    if device.gpus:
        pod["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    device_name = lane_name(device.entry.name, lane)
    extra = {LABEL_DEVICE: device_name, LABEL_POOL: device.entry.pool, LABEL_LANE: str(lane)}
    # The solved plan's digest, not the lanes': a lane added or removed rolls no other lane.
    name = stage_name(owner, device_name)
    rolls = None if secrets is None else secrets_digest(secrets, stage_secrets(owner))
    return _deployment(owner, name, COMPONENT_STAGE, 1, extra, pod, plan.digest, rolls)


def stage_service(owner: Owner, device: PlannedDevice, lane: int = 0) -> Manifest:
    device_name = lane_name(device.entry.name, lane)
    name = stage_name(owner, device_name)
    labels = {LABEL_DEVICE: device_name, LABEL_LANE: str(lane)}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, name, COMPONENT_STAGE, **labels),
        "spec": {
            "type": "ClusterIP",
            "selector": {**selector(owner), "moirai.dev/child": name},
            "ports": [{"name": "chain", "port": STAGE_PORT, "targetPort": "chain"}],
        },
    }


def _health(spec: PlacedModelSpec, which: str) -> dict[str, Any]:
    """The kubelet's HTTP probe of the gateway, over HTTPS when it serves TLS (the kubelet
    does not check the certificate)."""
    probe: dict[str, Any] = {"path": f"/v2/health/{which}", "port": "http"}
    if spec.serving.tls_secret:
        probe["scheme"] = "HTTPS"
    return probe


def gateway_deployment(
    owner: Owner,
    spec: PlacedModelSpec,
    plan: Plan,
    options: BuildOptions,
    secrets: Mapping[str, str] | None = None,
) -> Manifest:
    """`secrets`: each Secret's digest by name (see `secrets_digest`); None: not annotated."""
    env = [chain_token_env(owner)]
    if spec.serving.auth_token_secret:
        env.append(_secret_env(AUTH_TOKEN_ENV, spec.serving.auth_token_secret))
    container = {
        "name": "gateway",
        "command": gateway_command(spec),
        "env": env,
        "ports": [
            {"name": "http", "containerPort": spec.serving.port},
            {"name": "grpc", "containerPort": spec.serving.grpc_port},
            {"name": "chain", "containerPort": GATEWAY_CHAIN_PORT},
            {"name": "metrics", "containerPort": METRICS_PORT},
        ],
        "resources": {"requests": {"cpu": "500m", "memory": "256Mi"}},
        "readinessProbe": {"httpGet": _health(spec, "ready"), "periodSeconds": 5},
        "livenessProbe": {
            "httpGet": _health(spec, "live"),
            "initialDelaySeconds": 30,
            "periodSeconds": 10,
        },
    }
    pod = _pod_spec(owner, spec, options, container, spec.image, with_model=False)
    if spec.serving.tls_secret:
        pod["volumes"].append({"name": "tls", "secret": {"secretName": spec.serving.tls_secret}})
        gateway = pod["containers"][0]
        tls = {"name": "tls", "mountPath": TLS_DIR, "readOnly": True}
        gateway["volumeMounts"] = [*gateway["volumeMounts"], tls]
    name = gateway_name(owner)
    # One gateway: stage servers push each output to the gateway's one address, so two (as in a
    # rolling update) would receive each other's outputs; Recreate stops the old one first. It
    # reads every lane, so it restarts when their number changes.
    digest = f"{plan.digest}-{spec.serving.replicas}"
    rolls = None if secrets is None else secrets_digest(secrets, gateway_secrets(owner, spec))
    deployment = _deployment(owner, name, COMPONENT_GATEWAY, 1, {}, pod, digest, rolls)
    deployment["spec"]["strategy"] = {"type": "Recreate"}
    return deployment


def gateway_service(owner: Owner, spec: PlacedModelSpec) -> Manifest:
    name = gateway_name(owner)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, name, COMPONENT_GATEWAY),
        "spec": {
            "type": "ClusterIP",
            "selector": {**selector(owner), "moirai.dev/child": name},
            "ports": [
                {"name": "http", "port": spec.serving.port, "targetPort": "http"},
                {"name": "grpc", "port": spec.serving.grpc_port, "targetPort": "grpc"},
            ],
        },
    }


def gateway_chain_service(owner: Owner) -> Manifest:
    """The gateway's chain port, apart from the endpoint's Service, so that exposing the
    endpoint (a LoadBalancer, an Ingress) never exposes it."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, gateway_chain_name(owner), COMPONENT_GATEWAY),
        "spec": {
            "type": "ClusterIP",
            "selector": {**selector(owner), "moirai.dev/child": gateway_name(owner)},
            "ports": [{"name": "chain", "port": GATEWAY_CHAIN_PORT, "targetPort": "chain"}],
        },
    }


def _peers(owner: Owner, *components: str) -> dict[str, Any]:
    """A NetworkPolicy peer: this PlacedModel's pods of `components`."""
    return {
        "podSelector": {
            "matchLabels": selector(owner),
            "matchExpressions": [
                {"key": LABEL_COMPONENT, "operator": "In", "values": list(components)}
            ],
        }
    }


def _ingress_policy(
    owner: Owner, name: str, component: str, rules: list[dict[str, Any]]
) -> Manifest:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(owner, child_name(owner.name, name), component),
        "spec": {
            "podSelector": {"matchLabels": {**selector(owner), LABEL_COMPONENT: component}},
            "policyTypes": ["Ingress"],
            "ingress": rules,
        },
    }


def _tcp(*ports: int) -> list[dict[str, Any]]:
    return [{"protocol": "TCP", "port": p} for p in ports]


def network_policies(owner: Owner, spec: PlacedModelSpec) -> list[Manifest]:
    """Stage servers admit traffic only from their own PlacedModel's stages and gateway; the
    gateway admits anyone on its public ports, the cluster's pods (a Prometheus in any
    namespace) on its metrics port, and only those stages on its chain port."""
    stages = _ingress_policy(
        owner,
        "stages",
        COMPONENT_STAGE,
        [
            {
                "from": [_peers(owner, COMPONENT_STAGE, COMPONENT_GATEWAY)],
                "ports": _tcp(STAGE_PORT),
            }
        ],
    )
    gateway = _ingress_policy(
        owner,
        "gateway",
        COMPONENT_GATEWAY,
        [
            {"ports": _tcp(spec.serving.port, spec.serving.grpc_port)},
            {"from": [{"namespaceSelector": {}}], "ports": _tcp(METRICS_PORT)},
            {"from": [_peers(owner, COMPONENT_STAGE)], "ports": _tcp(GATEWAY_CHAIN_PORT)},
        ],
    )
    return [stages, gateway]


IN_FLIGHT_METRIC = "moirai_requests_in_flight"
"""The gateway's gauge of requests in flight, which the autoscaler reads per gateway Service."""


def autoscaler(owner: Owner, spec: PlacedModelSpec) -> Manifest:
    """A HorizontalPodAutoscaler of the PlacedModel's lanes (its scale subresource): lanes =
    requests in flight at the gateway / target per lane, within min and max. An Object metric
    with an AverageValue target divides by the lanes, so the gauge is read as it is; it comes
    from the custom metrics API, which needs a metrics adapter (e.g. prometheus-adapter) that
    maps `moirai_requests_in_flight` to Services."""
    scaling = spec.serving.autoscaling
    assert scaling is not None
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(owner, child_name(owner.name, "lanes"), COMPONENT_GATEWAY),
        "spec": {
            "scaleTargetRef": {"apiVersion": API_VERSION, "kind": KIND, "name": owner.name},
            "minReplicas": scaling.min_replicas,
            "maxReplicas": scaling.max_replicas,
            "metrics": [
                {
                    "type": "Object",
                    "object": {
                        "describedObject": {
                            "apiVersion": "v1",
                            "kind": "Service",
                            "name": gateway_name(owner),
                        },
                        "metric": {"name": IN_FLIGHT_METRIC},
                        "target": {
                            "type": "AverageValue",
                            "averageValue": str(scaling.target_requests_in_flight),
                        },
                    },
                }
            ],
        },
    }


def scale_selector(owner: Owner) -> str:
    """The scale subresource's selector (`status.selector`): the stage servers of every lane."""
    labels = {**selector(owner), LABEL_COMPONENT: COMPONENT_STAGE}
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def profile_target(match: PoolMatch) -> str:
    """`moirai profile`'s device target for one device of the pool."""
    if match.spec.kind == "gpu":
        return "cuda:0"
    return f"cpu:threads={match.spec.threads_per_device}"


def profile_command(spec: PlacedModelSpec, match: PoolMatch) -> list[str]:
    cmd = [
        "moirai",
        "profile",
        model_path(spec),
        "--device",
        f"{match.spec.name}={profile_target(match)}",
        "--no-links",
        "--no-cache",
        "-o",
        f"{PROFILE_DIR}/profile.json",
    ]
    for name, dims in spec.model.input_shapes.items():
        cmd += ["--input-shape", f"{name}={'x'.join(str(d) for d in dims)}"]
    return cmd


def upload_command() -> list[str]:
    return ["python", "-m", "moirai_operator.upload", f"{PROFILE_DIR}/profile.json"]


PROFILE_URL_KEY = "url"
"""The key of the profiling Secret that holds the inbox URL with its one-time token."""


def profile_name(owner: Owner, pool: str, attempt: str) -> str:
    """The name of the profiling Job of `pool` and of its Secret. `attempt` is random and new
    for each Job (a Job being deleted may still hold the previous name); never the token."""
    return child_name(owner.name, f"profile-{pool}-{attempt}")


def profile_secret(
    owner: Owner, match: PoolMatch, attempt: str, inbox_url: str, job_uid: str
) -> Manifest:
    """The Secret that hands the profiling Job its inbox URL (which carries the one-time token):
    owned by the Job, so it goes when the Job goes."""
    name = profile_name(owner, match.spec.name, attempt)
    metadata = _metadata(owner, name, COMPONENT_PROFILER, **{LABEL_POOL: match.spec.name})
    metadata["ownerReferences"] = [
        {"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": job_uid}
    ]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata,
        "type": "Opaque",
        "stringData": {PROFILE_URL_KEY: inbox_url},
    }


def profile_job(
    owner: Owner,
    spec: PlacedModelSpec,
    match: PoolMatch,
    attempt: str,
    options: BuildOptions,
) -> Manifest:
    """A Job that measures one device of `match` with `moirai profile` on a node of the pool and
    POSTs the profile to the operator's inbox, at the URL in its Secret (`profile_secret`)."""
    gpu = match.spec.kind == "gpu"
    image = spec.gpu_image if gpu else spec.image
    name = profile_name(owner, match.spec.name, attempt)
    requests: dict[str, str] = {"cpu": str(match.spec.threads_per_device)}
    limits: dict[str, str] = {}
    if gpu:
        limits[GPU_RESOURCE] = requests[GPU_RESOURCE] = str(match.spec.gpus_per_device)
    if match.spec.memory_per_device:
        limits["memory"] = requests["memory"] = match.spec.memory_per_device
    profiler = {
        "name": "profile",
        "image": image,
        "imagePullPolicy": options.image_pull_policy,
        "command": profile_command(spec, match),
        "resources": {"requests": requests, **({"limits": limits} if limits else {})},
        "securityContext": _CONTAINER_SECURITY,
    }
    upload = {
        "name": "upload",
        "command": upload_command(),
        "env": [
            {
                "name": "MOIRAI_PROFILE_URL",
                "valueFrom": {"secretKeyRef": {"name": name, "key": PROFILE_URL_KEY}},
            }
        ],
        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
    }
    pod = _pod_spec(owner, spec, options, upload, image, with_model=True, with_plan=False)
    pod["volumes"].append({"name": "profile", "emptyDir": {}})
    mounts = [*pod["containers"][0]["volumeMounts"], {"name": "profile", "mountPath": PROFILE_DIR}]
    for c in (*pod["initContainers"], profiler, *pod["containers"]):
        c["volumeMounts"] = list(mounts)
    pod["initContainers"].append(profiler)
    pod["restartPolicy"] = "Never"
    pod["nodeSelector"] = dict(match.node_selector)
    if gpu:
        pod["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    pod_labels = {**labels(owner, COMPONENT_PROFILER), LABEL_POOL: match.spec.name}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(owner, name, COMPONENT_PROFILER, **{LABEL_POOL: match.spec.name}),
        "spec": {
            "backoffLimit": 1,
            "activeDeadlineSeconds": PROFILE_DEADLINE_S,
            "ttlSecondsAfterFinished": 600,
            "template": {"metadata": {"labels": pod_labels}, "spec": pod},
        },
    }


def build_children(
    owner: Owner,
    spec: PlacedModelSpec,
    plan: Plan,
    options: BuildOptions,
    secrets: Mapping[str, str] | None = None,
) -> list[Manifest]:
    """Every object the PlacedModel should own, in the order to apply them. `secrets`: the
    digest of each Secret its pods read, by name (the pod templates carry them)."""
    out: list[Manifest] = [plan_configmap(owner, spec, plan)]
    if options.network_policy:
        out.extend(network_policies(owner, spec))
    for lane in lanes(spec):
        for device in plan.devices:
            out.append(stage_service(owner, device, lane))
            out.append(stage_deployment(owner, spec, plan, device, options, lane, secrets))
    out.append(gateway_service(owner, spec))
    out.append(gateway_chain_service(owner))
    out.append(gateway_deployment(owner, spec, plan, options, secrets))
    if spec.serving.autoscaling is not None:
        out.append(autoscaler(owner, spec))
    return out
