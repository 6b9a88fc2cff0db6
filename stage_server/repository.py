"""The front end's model repository: the data planes it serves, by model name.

A front end serves one or several models behind one Open Inference Protocol endpoint. Each
model has a data plane of its own (a `Gateway`, behind a `BatchingFront` when that model
batches: batching settings are per model, as in Triton), and the transports (`oip_grpc`,
`oip_http`) look the model of every request up here by name (`get`), so a request for a model
that is not served is refused with NOT_FOUND / 404 naming the models that are.

Readiness follows KServe and Triton: a model is ready when its own plane is (a lane of its
chain is fully up); the server is ready when every model is. The repository index (HTTP only:
the gRPC protocol served here has no repository methods) lists every model with its state.

In a front end of several models, the last stages of every model push the final outputs to the
one chain port of the front end's process, all to the target "gateway"; `GatewayDispatch` hands
each push to the model whose request it is (every gateway knows its requests in flight), so one
chain port serves them all. A front end of one model attaches its gateway directly, and its
metrics are that gateway's, exactly as before there was a repository.

Metrics: each model keeps its own registry; the front end's `/metrics` shows a lone model's
as they are, and several models' with a `model` label on every sample (`merged_exposition`).
Errors counted by the transports go to the model's metrics for one model, and to the
repository's own counter for several (an error may name no served model at all).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from stage_server.chain import Delivery
from stage_server.errors import NotFound
from stage_server.metrics import Metrics, merged_exposition

VERSION = "1"
"""The version of every model, in the Open Inference Protocol's sense: one each."""

READY, UNAVAILABLE = "READY", "UNAVAILABLE"
NOT_READY = "no lane of its chain has every stage server up"


class ErrorMetrics:
    """The repository's own error counter, for a front end of several models."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.errors = Counter(
            "moirai_request_errors_total",
            "Failed requests by gRPC status code.",
            ["code"],
            registry=self.registry,
        )


class Repository:
    """The models a front end serves, each by its data plane (a `Gateway` or a batching front
    over one, or a `stage_server.remote.RemoteModel`); `planes` in the order they are listed.

    `labelled` (default: with other than one model) shows metrics labelled by model and counts
    errors apart; a repository whose models come and go (`add`, `remove`: the shared endpoint on
    Kubernetes) is labelled from the start."""

    def __init__(self, planes: Sequence[Any], *, labelled: bool | None = None) -> None:
        self._planes: dict[str, Any] = {}
        self._served = ""
        for plane in planes:
            self.add(plane)
        self.labelled = len(planes) != 1 if labelled is None else labelled
        self.metrics: Metrics | ErrorMetrics = (
            ErrorMetrics() if self.labelled else planes[0].metrics
        )
        """Where the transports count errors."""

    def add(self, plane: Any) -> None:
        name = plane.model_name
        if name in self._planes:
            raise ValueError(f"model {name!r} is given twice")
        self._planes[name] = plane
        self._served = ", ".join(repr(n) for n in self._planes)

    def remove(self, name: str) -> Any:
        """Stop serving model `name`; its plane (to stop)."""
        plane = self._planes.pop(name)
        self._served = ", ".join(repr(n) for n in self._planes)
        return plane

    @property
    def names(self) -> list[str]:
        return list(self._planes)

    @property
    def planes(self) -> list[Any]:
        return list(self._planes.values())

    @property
    def only(self) -> Any:
        """The plane of the one model served (a front end of one model)."""
        if len(self._planes) != 1:
            raise ValueError(f"this front end serves several models: {self._served}")
        return next(iter(self._planes.values()))

    def get(self, name: str, version: str = "") -> Any:
        """The plane of model `name`; refused with `NotFound` for a model not served, or for a
        version other than `VERSION` (an empty version means the model's only one)."""
        plane = self._planes.get(name)
        if plane is None:
            raise NotFound(
                f"model {name!r} is not served here; this endpoint serves "
                f"{self._served or 'no model yet'}"
            )
        if version and version != VERSION:
            raise NotFound(
                f"model {name!r} has no version {version!r}: its one version is {VERSION!r} "
                "(or leave the version out)"
            )
        return plane

    def ready(self) -> bool:
        """Every model is ready (the server's readiness, as in KServe and Triton)."""
        return all(plane.ready() for plane in self._planes.values())

    def index(self) -> list[dict[str, str]]:
        """Every model with its version and state (Triton's repository index); a model not
        ready says why (its plane's `reason`, where it has one)."""
        out = []
        for name, plane in self._planes.items():
            ready = plane.ready()
            reason = "" if ready else getattr(plane, "reason", "") or NOT_READY
            state = READY if ready else UNAVAILABLE
            out.append({"name": name, "version": VERSION, "state": state, "reason": reason})
        return out

    def exposition(self) -> bytes:
        if not self.labelled:
            return self.only.metrics.exposition()
        registries = {name: plane.metrics.registry for name, plane in self._planes.items()}
        assert isinstance(self.metrics, ErrorMetrics)
        return merged_exposition(registries, self.metrics.registry)

    async def start(self) -> None:
        for plane in self._planes.values():
            await plane.start()

    async def wait_ready(self, timeout_s: float) -> bool:
        end = time.monotonic() + timeout_s
        while not self.ready() and time.monotonic() < end:
            await asyncio.sleep(0.05)
        return self.ready()

    async def stop(self) -> None:
        for plane in self._planes.values():
            await plane.stop()


class GatewayDispatch:
    """The chain handler of the target "gateway" in a front end of several models: a push of
    final outputs goes to the gateway whose request it is; a failure report to every gateway
    (each drops only its own requests)."""

    def __init__(self, gateways: Sequence[Any]) -> None:
        self._gateways = list(gateways)

    def deliver(self, delivery: Delivery) -> None:
        for gateway in self._gateways:
            if delivery.request_id in gateway.pending:
                gateway.deliver(delivery)
                return
        # No model waits for it any more (answered, failed or expired): dropped, as a gateway
        # drops a late push of its own.

    def failed(self, request_id: str, code: str, message: str, deadline_ms: float) -> None:
        for gateway in self._gateways:
            gateway.failed(request_id, code, message, deadline_ms)


async def described(plane: Any) -> Any:
    """`plane`, its metadata (`inputs`, `outputs`) known: a plane that learns them only with
    the client's own token (a `RemoteModel` of a model behind one) asks for them first, with
    the token of the client being served (`stage_server.auth.client_authorization`)."""
    describe = getattr(plane, "describe", None)
    if describe is not None:
        await describe()
    return plane
