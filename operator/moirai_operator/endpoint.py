"""The shared endpoint: one Open Inference Protocol address for every PlacedModel served.

The chart runs it (`sharedEndpoint.enabled`) as a Deployment and Service of its own, beside each
PlacedModel's own gateway Service:

    python -m moirai_operator.endpoint --namespace NS [--namespace NS2 ...] | --all-namespaces \
        [--host 0.0.0.0] [--grpc-port 8001] [--http-port 8000] [--refresh-seconds 5]

Every `--refresh-seconds` it lists the PlacedModels of its namespaces (the operator's) and serves
each one whose status has an endpoint (the operator writes it once the model is deployed) under
the PlacedModel's name, the name its own gateway serves it by. A request is routed by model name
to that model's gateway Service, over gRPC (`stage_server.remote.RemoteModel`); `/v2/models`
and the repository index list them all, each with its own metadata and readiness. A PlacedModel
deleted, or whose endpoint moved, leaves the index at the next refresh; one not ready is listed
UNAVAILABLE, and only its requests fail. The endpoint's own readiness is that of every model
(as in KServe and Triton); the chart probes its liveness only, so that one model down never takes
the others' shared address out of its Service.

Why a router in front of the models' gateways, not one gateway of every model: a PlacedModel's
stage servers push the model's outputs to its own gateway's chain address, and its gateway
carries the model's lanes, batching and autoscaling metric; routing to it keeps those where they
are, at the cost of one hop (clients that want none call the model's own Service). It holds no
endpoint token: each client's `authorization` goes on to the model's gateway, which checks it
(`stage_server.remote`), so a PlacedModel behind `spec.serving.authTokenSecret` is served here
to the clients that hold its token.

A PlacedModel with `spec.serving.tlsSecret` (its gateway serves TLS only: an `https` endpoint in
its status) is called over TLS, its certificate verified, never skipped: against the trust root
the operator publishes in its `status.gatewayCA` (the Secret's `ca.crt`, else its `tls.crt`;
public certificates, so the endpoint needs no access to Secrets, which hold the keys), and for
the gateway Service's DNS name `<name>-gateway.<namespace>.svc`, which the certificate must carry
whatever address is dialled. Without a trust root, or with one that does not verify it, the model
is listed UNAVAILABLE with the reason, in one line, and only its requests fail (UNAVAILABLE, HTTP
503); a model without TLS is called in plaintext.

PlacedModels of one name in several namespaces cannot share one name here: the name is listed
as UNAVAILABLE with the reason, and each stays on its own Service. The API is only listed (no
watch, no write): the chart's RBAC for the endpoint is `list` of PlacedModels.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from moirai.errors import MoiraiError
from moirai_operator.children import Owner, gateway_host
from moirai_operator.resources import GROUP, PLURAL, VERSION, PlacedModelBody
from moirai_operator.spec import ServingSpec
from stage_server.errors import Unavailable
from stage_server.metrics import Metrics
from stage_server.remote import RemoteModel, TLSTarget
from stage_server.repository import Repository

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    """Where the shared endpoint sends a model's requests: its gateway's OIP gRPC address (and
    how to verify it, when it serves TLS), or nowhere and why."""

    name: str
    address: str = ""
    reason: str = ""
    tls: TLSTarget | None = None


_PEM_CERTIFICATE = "-----BEGIN CERTIFICATE-----"


def _route(pm: PlacedModelBody, host: str, port: int) -> Route:
    """The route to one PlacedModel's gateway at `host`: in plaintext, or over TLS (an `https`
    endpoint) verified with the trust root the operator publishes (`status.gatewayCA`) for the
    gateway Service's DNS name; without a trust root that can verify it, nowhere."""
    status = pm.get("status") or {}
    meta = pm["metadata"]
    address = f"{host}:{port}"
    if urlparse(status["endpoint"]).scheme != "https":
        return Route(meta["name"], address)
    ca = status.get("gatewayCA") or ""
    server_name = gateway_host(Owner(meta["name"], meta["namespace"], meta.get("uid", "")))
    if _PEM_CERTIFICATE not in ca:
        what = "is not a PEM certificate" if ca else "is empty"
        return Route(
            meta["name"],
            reason=f"its gateway serves TLS, and its status.gatewayCA (the trust root the "
            f"operator publishes from spec.serving.tlsSecret's ca.crt, else tls.crt) {what}: "
            "not called until its certificate can be verified",
        )
    source = "its status.gatewayCA (spec.serving.tlsSecret's ca.crt, else its tls.crt)"
    return Route(meta["name"], address, tls=TLSTarget(ca.encode(), server_name, source))


def routes(placed_models: Iterable[PlacedModelBody]) -> dict[str, Route]:
    """The route of every PlacedModel with an endpoint in its status, by name."""
    found: dict[str, list[tuple[str, Route]]] = {}
    for pm in placed_models:
        endpoint = (pm.get("status") or {}).get("endpoint")
        host = urlparse(endpoint).hostname if endpoint else None
        if not host:
            continue
        serving = (pm.get("spec") or {}).get("serving") or {}
        port = serving.get("grpcPort", ServingSpec.grpc_port)
        meta = pm["metadata"]
        found.setdefault(meta["name"], []).append((meta["namespace"], _route(pm, host, port)))
    out = {}
    for name, where in sorted(found.items()):
        if len(where) == 1:
            out[name] = where[0][1]
        else:
            namespaces = " and ".join(sorted(ns for ns, _ in where))
            out[name] = Route(
                name,
                reason=f"PlacedModels named {name!r} in namespaces {namespaces}: the shared "
                "endpoint serves a name once; rename one (each serves on its own Service)",
            )
    return out


class _Unrouted:
    """A model name that the shared endpoint cannot route (`Route.reason`): listed, never
    ready."""

    def __init__(self, route: Route, timeout_s: float) -> None:
        self.model_name = route.name
        self.reason = route.reason
        self.timeout_s = timeout_s
        """The request deadline that the transports read (the HTTP one bounds the body's)."""
        self.metrics = Metrics({})
        self.inputs: dict[str, Any] = {}
        self.outputs: dict[str, Any] = {}

    def ready(self) -> bool:
        return False

    async def infer(self, *args: Any, **kwargs: Any) -> Any:
        raise Unavailable(self.reason)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


Lister = Callable[[], list[PlacedModelBody]]


class SharedEndpoint:
    """Keeps `repository` in line with the PlacedModels that `list_placed_models` returns."""

    def __init__(
        self,
        repository: Repository,
        list_placed_models: Lister,
        *,
        refresh_s: float = 5.0,
        timeout_s: float = 30.0,
    ) -> None:
        self.repository = repository
        self._list = list_placed_models
        self.refresh_s = refresh_s
        self.timeout_s = timeout_s
        self._routes: dict[str, Route] = {}
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> None:
        """List the PlacedModels once and serve exactly their routes."""
        wanted = routes(await asyncio.to_thread(self._list))
        for name, route in list(self._routes.items()):
            if wanted.get(name) != route:
                del self._routes[name]
                await self.repository.remove(name).stop()
                log.info("stopped routing model %s", name)
        for name, route in wanted.items():
            if name in self._routes:
                continue
            plane = (
                RemoteModel(name, route.address, tls=route.tls, timeout_s=self.timeout_s)
                if route.address
                else _Unrouted(route, self.timeout_s)
            )
            await plane.start()
            self.repository.add(plane)
            self._routes[name] = route
            log.info(
                "routing model %s to %s%s",
                name,
                route.address or f"nowhere: {route.reason}",
                f" over TLS, verified for {route.tls.server_name}" if route.tls else "",
            )

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception as e:  # the API server away: keep the routes known, try again
                log.warning("listing PlacedModels failed (%s); keeping the routes known", e)

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def placed_model_lister(namespaces: Sequence[str]) -> Lister:
    """Lists the PlacedModels of `namespaces` (none: every namespace) with the cluster's
    client (`moirai_operator.kube.new_api_client`)."""
    from kubernetes import client

    from moirai_operator.kube import new_api_client

    api = client.CustomObjectsApi(new_api_client())

    def list_placed_models() -> list[PlacedModelBody]:
        if not namespaces:
            return list(api.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"])
        out: list[PlacedModelBody] = []
        for namespace in namespaces:
            out += api.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
        return out

    return list_placed_models


@dataclass
class _Handle:
    endpoint: SharedEndpoint
    frontend: Any

    async def stop(self, grace: float | None = None) -> None:
        await self.endpoint.stop()
        await self.frontend.stop(grace)


def main(argv: Sequence[str] | None = None) -> int:
    from moirai.cli.options import check_port_free, port, positive_float
    from moirai.runtime.daemon import run_until_signalled
    from stage_server.serve import start_oip

    parser = argparse.ArgumentParser(
        prog="python -m moirai_operator.endpoint",
        description="One Open Inference Protocol endpoint for every PlacedModel served.",
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--namespace", action="append", help="a namespace to serve (repeat)")
    where.add_argument("--all-namespaces", action="store_true", help="serve every namespace")
    parser.add_argument("--host", default="0.0.0.0", help="address to bind")
    parser.add_argument("--grpc-port", type=port, default=8001, help="OIP gRPC port")
    parser.add_argument("--http-port", type=port, default=8000, help="OIP HTTP port")
    parser.add_argument(
        "--refresh-seconds", type=positive_float, default=5.0, help="how often to list"
    )
    parser.add_argument(
        "--timeout", type=positive_float, default=30.0, help="request deadline, seconds"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        check_port_free("--grpc-port", args.grpc_port, args.host)
        check_port_free("--http-port", args.http_port, args.host)
    except MoiraiError as e:
        print(f"moirai: {e}", file=sys.stderr)
        return 2
    lister = placed_model_lister([] if args.all_namespaces else args.namespace)

    async def start() -> _Handle:
        repository = Repository([], labelled=True)
        endpoint = SharedEndpoint(
            repository, lister, refresh_s=args.refresh_seconds, timeout_s=args.timeout
        )
        frontend = await start_oip(
            repository, host=args.host, grpc_port=args.grpc_port, http_port=args.http_port
        )
        await endpoint.start()
        return _Handle(endpoint, frontend)

    served = "every namespace" if args.all_namespaces else ", ".join(args.namespace)
    return run_until_signalled(
        start, f"shared endpoint of {served} on :{args.grpc_port} (gRPC), :{args.http_port} (HTTP)"
    )


if __name__ == "__main__":
    sys.exit(main())
