"""A PlacedModel's spec, parsed once into frozen dataclasses with every default applied.

The CRD's structural schema already rejects wrong types, unknown enum values and out-of-range
numbers at admission, so parsing here only fills defaults (the operator's solver defaults come
from the Helm values, not the schema, so that changing them needs no CRD upgrade) and checks
what a schema cannot express: a path URI must lie under the mounted volume, input shapes must be
positive. A violation raises `SpecError`, which `status.py` turns into a Failed condition; the
rest of the operator works only on these dataclasses, never on the raw dict.
"""

from __future__ import annotations

import fnmatch
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from urllib.parse import urlparse

from kubernetes.utils.quantity import parse_quantity

from moirai.devices import DEVICE_KINDS
from moirai.errors import MoiraiError
from moirai.placement import OBJECTIVES, solvers
from moirai_operator.resources import GATEWAY_CHAIN_PORT, METRICS_PORT
from stage_server.batchconfig import BatchingConfig

# The placement registry's names, which the CRD's enum repeats (a test checks that they agree).
SOLVERS = tuple(s.name for s in solvers())
PROFILING_MODES = ("analytic", "measured")


class SpecError(MoiraiError):
    """The spec is well-typed but cannot be acted on (the message names the field)."""


@dataclass(frozen=True)
class Defaults:
    """Operator-wide defaults for what a PlacedModel leaves out (from the Helm values)."""

    solver: str = "auto"
    objective: str = "latency"
    time_limit_seconds: float = 60.0
    image: str = "moirai:latest"
    """Image of the gateway and of cpu stage servers."""
    gpu_image: str = "moirai:latest-gpu"
    """Image of gpu stage servers (onnxruntime-gpu on a CUDA base)."""
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    """Dynamic batching of a PlacedModel whose spec.serving.batching leaves fields out."""
    allowed_images: tuple[str, ...] = ()
    """Shell-style patterns of the images `spec.image` may name, beside the two above (the
    chart's `allowedImages`): a PlacedModel's pods run whatever image it names, so by default
    it may name none but the operator's own."""
    auth_token_secret: str | None = None
    """The endpoint token Secret of a PlacedModel that names none in spec.serving (the chart's
    `serving.authTokenSecret`): a Secret of that name in each PlacedModel's namespace."""
    tls_secret: str | None = None
    """The TLS Secret of a PlacedModel that names none (the chart's `serving.tlsSecret`)."""

    def check_image(self, image: str) -> None:
        if image in (self.image, self.gpu_image):
            return
        if any(fnmatch.fnmatchcase(image, pattern) for pattern in self.allowed_images):
            return
        allowed = ", ".join(self.allowed_images) or "none beside the operator's own"
        raise SpecError(
            f"spec.image {image!r} is not allowed by this operator (allowed: {allowed}): "
            "leave spec.image out, or have the operator's chart value allowedImages list it"
        )


@dataclass(frozen=True)
class ModelVolume:
    claim_name: str
    mount_path: str


@dataclass(frozen=True)
class ModelSpec:
    uri: str
    sha256: str | None = None
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    volume: ModelVolume | None = None

    @property
    def is_remote(self) -> bool:
        return urlparse(self.uri).scheme in ("http", "https")

    @property
    def local_path(self) -> str:
        """The filesystem path of a path URI (`file:///x` or `/x`)."""
        return urlparse(self.uri).path if self.uri.startswith("file://") else self.uri


@dataclass(frozen=True)
class PoolSpec:
    name: str
    kind: str
    node_selector: Mapping[str, str] | None = None
    max_devices: int = 1
    gpus_per_device: int = 1
    threads_per_device: int = 2
    memory_per_device: str | None = None

    @property
    def memory_per_device_bytes(self) -> int | None:
        if self.memory_per_device is None:
            return None
        return int(parse_quantity(self.memory_per_device))


@dataclass(frozen=True)
class PlacementSpec:
    solver: str
    objective: str
    time_limit_seconds: float


@dataclass(frozen=True)
class AutoscalingSpec:
    """A HorizontalPodAutoscaler of the lanes, on requests in flight at the gateway."""

    max_replicas: int
    min_replicas: int = 1
    target_requests_in_flight: int = 4


@dataclass(frozen=True)
class ServingSpec:
    port: int = 8000
    grpc_port: int = 8001
    replicas: int = 1
    """Lanes: copies of the whole chain behind the gateway (`lanes.py`)."""
    autoscaling: AutoscalingSpec | None = None
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    """Dynamic batching at the endpoint (`stage_server.batching`); off by default."""
    auth_token_secret: str | None = None
    """The Secret (in the PlacedModel's namespace, key `token`) whose token clients must send
    as `Authorization: Bearer <token>`; None: the endpoint is open."""
    tls_secret: str | None = None
    """The `kubernetes.io/tls` Secret (keys `tls.crt`, `tls.key`) the endpoint serves TLS with;
    None: plaintext."""
    defaulted: frozenset[str] = frozenset()
    """Which of `authTokenSecret` and `tlsSecret` are the operator's defaults (`Defaults`), not
    the PlacedModel's own: errors about them name the chart value."""


@dataclass(frozen=True)
class PlacedModelSpec:
    model: ModelSpec
    pools: tuple[PoolSpec, ...]
    placement: PlacementSpec
    profiling: str
    serving: ServingSpec
    image: str
    gpu_image: str
    """`spec.image` when given (for every pod), else the operator's gpu image."""


def _choice(value: Any, allowed: tuple[str, ...], where: str, default: str | None) -> str:
    if value is None:
        if default is None:
            raise SpecError(f"{where} is missing: use one of {', '.join(allowed)}")
        return default
    if value not in allowed:
        raise SpecError(f"{where} is {value!r}: use one of {', '.join(allowed)}")
    return str(value)


def _int(value: Any, where: str, default: int, minimum: int = 1) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SpecError(f"{where} is {value!r}: use a whole number >= {minimum}")
    return value


def _model(raw: Mapping[str, Any]) -> ModelSpec:
    uri = raw.get("uri")
    if not isinstance(uri, str) or not uri:
        raise SpecError("spec.model.uri is missing: give an http(s) URL or a path to a .onnx file")
    shapes: dict[str, tuple[int, ...]] = {}
    for name, dims in (raw.get("inputShapes") or {}).items():
        if (
            not isinstance(dims, list)
            or not dims
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims)
        ):
            raise SpecError(
                f"spec.model.inputShapes[{name!r}] is {dims!r}: give a list of positive integers"
            )
        shapes[str(name)] = tuple(dims)
    volume = None
    if raw.get("volume"):
        v = raw["volume"]
        volume = ModelVolume(claim_name=str(v["claimName"]), mount_path=str(v["mountPath"]))
    sha = raw.get("sha256")
    model = ModelSpec(
        uri=uri, sha256=sha.lower() if sha else None, input_shapes=shapes, volume=volume
    )
    scheme = urlparse(uri).scheme
    if scheme not in ("http", "https", "file", ""):
        raise SpecError(f"spec.model.uri scheme {scheme!r} is not supported: use http(s) or a path")
    if not model.is_remote:
        if volume is None:
            raise SpecError(
                "spec.model.volume is required for a path URI: name the PersistentVolumeClaim "
                "that holds the model and where to mount it"
            )
        mount = posixpath.normpath(volume.mount_path)
        path = posixpath.normpath(model.local_path)
        if posixpath.commonpath([mount, path]) != mount:
            raise SpecError(
                f"spec.model.uri {path} is not under spec.model.volume.mountPath {mount}"
            )
    return model


def _pool(raw: Mapping[str, Any], i: int) -> PoolSpec:
    where = f"spec.pools[{i}]"
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise SpecError(f"{where}.name is missing")
    selector = raw.get("nodeSelector")
    memory = raw.get("memoryPerDevice")
    if memory is not None:
        try:
            if parse_quantity(memory) <= Decimal(0):
                raise ValueError
        except ValueError:
            raise SpecError(
                f"{where}.memoryPerDevice is {memory!r}: use a positive quantity such as 8Gi"
            ) from None
    return PoolSpec(
        name=name,
        kind=_choice(raw.get("kind"), DEVICE_KINDS, f"{where}.kind", None),
        node_selector=dict(selector) if selector else None,
        max_devices=_int(raw.get("maxDevices"), f"{where}.maxDevices", 1),
        gpus_per_device=_int(raw.get("gpusPerDevice"), f"{where}.gpusPerDevice", 1),
        threads_per_device=_int(raw.get("threadsPerDevice"), f"{where}.threadsPerDevice", 2),
        memory_per_device=memory,
    )


def _batching(raw: Mapping[str, Any], default: BatchingConfig) -> BatchingConfig:
    """spec.serving.batching over the operator's defaults; preferred sizes must fit the max."""
    where = "spec.serving.batching"
    size = _int(raw.get("maxBatchSize"), f"{where}.maxBatchSize", default.max_batch_size, 0)
    preferred = raw.get("preferredBatchSizes")
    if preferred is None:
        preferred = default.preferred_batch_sizes if size == default.max_batch_size else ()
    delay = _int(
        raw.get("maxQueueDelayMicroseconds"),
        f"{where}.maxQueueDelayMicroseconds",
        default.max_queue_delay_us,
        0,
    )
    for value in preferred:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= size:
            raise SpecError(
                f"{where}.preferredBatchSizes has {value!r}: give sizes from 1 to maxBatchSize "
                f"({size})"
            )
    if size == 0:
        return BatchingConfig()  # off: a preferred size or a delay means nothing then
    return BatchingConfig(size, tuple(preferred), delay)


SECRET_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
"""A PlacedModel's name: its children's Services are named after it (DNS-1035 labels, no '.')
and its children carry it as a label value (at most 63 characters). The CRD's schema repeats
this pattern and length on metadata.name (a test checks that they agree)."""


def check_name(name: str) -> None:
    """Raise `SpecError` unless `name` can name a PlacedModel's children (`NAME`): the API
    server admits longer and dotted names for objects made before the CRD said so, and would
    refuse each child of such a PlacedModel."""
    if len(name) <= 63 and NAME.fullmatch(name):
        return
    raise SpecError(
        f"metadata.name {name!r} cannot name this PlacedModel's Services and label its "
        "children: use at most 63 lower-case letters, digits and '-' (no '.'), and recreate "
        "the PlacedModel under that name"
    )


def _secret_name(value: Any, where: str) -> str | None:
    """A Secret's name (a DNS-1123 subdomain), or None when not given."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 253 or not SECRET_NAME.fullmatch(value):
        raise SpecError(
            f"{where} is {value!r}: give the name of a Secret in the PlacedModel's namespace "
            "(lower-case letters, digits, '-' and '.')"
        )
    return value


def _autoscaling(raw: Mapping[str, Any] | None) -> AutoscalingSpec | None:
    if raw is None:
        return None
    where = "spec.serving.autoscaling"
    scaling = AutoscalingSpec(
        max_replicas=_int(raw.get("maxReplicas"), f"{where}.maxReplicas", 0),
        min_replicas=_int(raw.get("minReplicas"), f"{where}.minReplicas", 1),
        target_requests_in_flight=_int(
            raw.get("targetRequestsInFlight"), f"{where}.targetRequestsInFlight", 4
        ),
    )
    if not 1 <= scaling.min_replicas <= scaling.max_replicas:
        raise SpecError(
            f"{where}: minReplicas {scaling.min_replicas} and maxReplicas "
            f"{scaling.max_replicas}: give 1 <= minReplicas <= maxReplicas"
        )
    return scaling


def _check_ports(serving: ServingSpec) -> None:
    """The gateway listens on both public ports and on its own chain and metrics ports: two
    that are the same would leave its pod failing to start, with no condition saying why."""
    if serving.port == serving.grpc_port:
        raise SpecError(
            f"spec.serving.port and spec.serving.grpcPort are both {serving.port}: give the "
            "gateway's HTTP and gRPC ports two different numbers"
        )
    own = {GATEWAY_CHAIN_PORT: "chain", METRICS_PORT: "metrics"}
    for field_name, port in (("port", serving.port), ("grpcPort", serving.grpc_port)):
        if port in own:
            raise SpecError(
                f"spec.serving.{field_name} is {port}, the gateway's own {own[port]} port: "
                "choose another"
            )


def parse_spec(raw: Mapping[str, Any], defaults: Defaults) -> PlacedModelSpec:
    """Parse a PlacedModel's `spec` (already schema-checked by the API server)."""
    pools_raw = raw.get("pools") or []
    if not pools_raw:
        raise SpecError("spec.pools is empty: name at least one node pool")
    pools = tuple(_pool(p, i) for i, p in enumerate(pools_raw))
    names = [p.name for p in pools]
    for n in names:
        if names.count(n) > 1:
            raise SpecError(f"spec.pools: pool name {n!r} appears twice")
    placement = raw.get("placement") or {}
    limit = placement.get("timeLimitSeconds", defaults.time_limit_seconds)
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0:
        raise SpecError(f"spec.placement.timeLimitSeconds is {limit!r}: use a number > 0")
    serving = raw.get("serving") or {}
    if raw.get("image"):
        defaults.check_image(str(raw["image"]))
    spec = PlacedModelSpec(
        model=_model(raw.get("model") or {}),
        pools=pools,
        placement=PlacementSpec(
            solver=_choice(
                placement.get("solver"), SOLVERS, "spec.placement.solver", defaults.solver
            ),
            objective=_choice(
                placement.get("objective"),
                OBJECTIVES,
                "spec.placement.objective",
                defaults.objective,
            ),
            time_limit_seconds=float(limit),
        ),
        profiling=_choice(
            (raw.get("profiling") or {}).get("mode"),
            PROFILING_MODES,
            "spec.profiling.mode",
            "analytic",
        ),
        serving=ServingSpec(
            port=_int(serving.get("port"), "spec.serving.port", 8000),
            grpc_port=_int(serving.get("grpcPort"), "spec.serving.grpcPort", 8001),
            replicas=_int(serving.get("replicas"), "spec.serving.replicas", 1),
            autoscaling=_autoscaling(serving.get("autoscaling")),
            batching=_batching(serving.get("batching") or {}, defaults.batching),
            auth_token_secret=_secret_name(
                serving.get("authTokenSecret"), "spec.serving.authTokenSecret"
            )
            or defaults.auth_token_secret,
            tls_secret=_secret_name(serving.get("tlsSecret"), "spec.serving.tlsSecret")
            or defaults.tls_secret,
            defaulted=frozenset(
                key
                for key, default in (
                    ("authTokenSecret", defaults.auth_token_secret),
                    ("tlsSecret", defaults.tls_secret),
                )
                if default and serving.get(key) is None
            ),
        ),
        image=str(raw.get("image") or defaults.image),
        gpu_image=str(raw.get("image") or defaults.gpu_image),
    )
    _check_ports(spec.serving)
    return spec
