"""Start and stop the servers: a stage server (with or without the front end), or the gateway.

This is where the data planes meet their transports: `start_stage` puts a `StageServer` behind
`moirai.stage.v1.Chain` and `grpc.health.v1`, and, given a `Frontend`, also a `Gateway` behind
the Open Inference Protocol over gRPC and HTTP in the same process ("fused": the stages of this
process get model inputs and give back final outputs in memory, through the process's
`chain.Router`; remote stages push final outputs to this chain port). `start_front_end` runs the
front end alone, of one model (`start_gateway`) or several: a `Gateway` per model in a
`stage_server.repository.Repository`, behind one OIP endpoint and one chain service on which
every model's stages push final outputs. The transports reach the models through the repository
only. The CLI (`moirai stage`, `moirai gateway`), the local runtime and the tests all start
servers through here.

The chain always has a port of its own, never a public one: a front end alone listens for the
stages' pushes on `chain_port`, a stage server on its `port`. The public endpoint's limits
(requests in flight, sizes, idle connections) are `stage_server.limits`'.

Every chain port also serves the same-host fast path (`stage_server.samehost`) unless
`same_host=False`, which also keeps this server's own pushes on gRPC: the path between hosts,
which the tests and the benchmark exercise on one machine this way.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import onnx
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from moirai.errors import MoiraiError
from moirai.stageplan import GATEWAY, StagePlan
from stage_server import limits, samehost
from stage_server.batchconfig import BatchingConfig
from stage_server.batching import with_batching
from stage_server.chain import ChainHandler, ChainServicer, Peers, Router
from stage_server.chain import add_to_server as add_chain_to_server
from stage_server.gateway import Gateway
from stage_server.limits import InFlight
from stage_server.oip_grpc import InferenceServicer, add_to_server, max_message_bytes
from stage_server.oip_http import create_app, create_metrics_app
from stage_server.regions import SharedMemoryRegions
from stage_server.repository import GatewayDispatch, Repository
from stage_server.samehost import Listener
from stage_server.settings import DEFAULT_MAX_PENDING_BYTES, EndpointConfig
from stage_server.stage import StageServer

DEFAULT_MAX_REQUEST_BYTES = 1 << 30
PUSH_OVERHEAD_BYTES = 64 << 10
"""Bytes of a push besides its tensors' (ids, names, shapes, timings): far less in practice."""
_GRPC_MAX_MESSAGE = 2**31 - 1


def _server(options: list[tuple[str, int]], max_calls: int | None = None) -> grpc.aio.Server:
    """A gRPC server that owns its port: gRPC sets SO_REUSEPORT by default, so a second server
    would bind a port in use and share its connections (and fail later, on the same-host socket
    of that port). `max_calls`: calls at once, past which gRPC refuses with RESOURCE_EXHAUSTED
    before reading their message."""
    return grpc.aio.server(
        options=[*options, ("grpc.so_reuseport", 0)], maximum_concurrent_rpcs=max_calls
    )


def _bind(
    server: grpc.aio.Server,
    host: str,
    port: int,
    credentials: grpc.ServerCredentials | None = None,
) -> int:
    try:
        if credentials is None:
            bound = server.add_insecure_port(f"{host}:{port}")
        else:
            bound = server.add_secure_port(f"{host}:{port}", credentials)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise MoiraiError(f"cannot listen on {host}:{port} (in use?)")
    return bound


def _tls(endpoint: EndpointConfig) -> tuple[grpc.ServerCredentials, ssl.SSLContext] | None:
    """The endpoint's TLS for gRPC and for HTTP, from its certificate and key files."""
    if not endpoint.tls:
        return None
    cert, key = endpoint.tls_files()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(endpoint.tls_cert_file, endpoint.tls_key_file)
    except ssl.SSLError as e:
        raise MoiraiError(
            f"--tls-cert-file / --tls-key-file: not a certificate and its key ({e.reason})"
        ) from None
    return grpc.ssl_server_credentials([(key, cert)]), context


@dataclass(frozen=True)
class ChainOptions:
    """Who may call a server's chain port and what it holds for them."""

    token: str | None = None
    """The deployment's chain token (`stage_server.auth`): calls without it are refused, and
    this server's own calls carry it. None: the chain is open to whoever reaches the port."""
    max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES
    """The most bytes of tensors a stage server holds for requests (RESOURCE_EXHAUSTED past
    it); no push may be larger."""
    timeout_s: float = 30.0
    """The longest a request is held: later deadlines of pushes and failure reports are
    brought forward to now plus this."""


@dataclass
class ChainHandle:
    """A chain port: its gRPC server and same-host listener."""

    server: grpc.aio.Server
    port: int
    listener: Listener | None = None

    async def stop(self, grace: float | None = None) -> None:
        if self.listener is not None:
            await self.listener.stop()
        await self.server.stop(grace)


def _chain_server(
    handler: ChainHandler, options: ChainOptions
) -> tuple[grpc.aio.Server, ChainServicer, health.aio.HealthServicer]:
    """A chain port's gRPC server for `handler`, with `grpc.health.v1` (open: probes carry no
    token), not yet bound."""
    largest = min(options.max_pending_bytes + PUSH_OVERHEAD_BYTES, _GRPC_MAX_MESSAGE)
    server = _server(
        [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", largest)]
    )
    servicer = ChainServicer(handler)
    add_chain_to_server(servicer, server, options.token)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return server, servicer, health_servicer


async def _start_chain_port(
    server: grpc.aio.Server,
    servicer: ChainServicer,
    host: str,
    port: int,
    same_host: bool,
    options: ChainOptions,
) -> ChainHandle:
    """Bind and start `server` and the same-host listener of its port. A failure stops the
    server again."""
    try:
        bound = _bind(server, host, port)
        await server.start()
        if not (same_host and samehost.SUPPORTED):
            return ChainHandle(server, bound)
        listener = Listener(
            servicer.receive,
            options.token,
            options.max_pending_bytes + PUSH_OVERHEAD_BYTES,
        )
        try:
            await listener.start(bound)
        except OSError as e:
            raise MoiraiError(
                f"cannot listen on the same-host socket of chain port {bound} ({e.strerror}): "
                "another server holds it; stop it or pick another port"
            ) from None
        return ChainHandle(server, bound, listener)
    except MoiraiError:
        await server.stop(None)
        raise


async def start_chain(
    handler: ChainHandler,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    same_host: bool = True,
    options: ChainOptions = ChainOptions(),
) -> ChainHandle:
    """Serve only `moirai.stage.v1.Chain` for `handler` (and `grpc.health.v1`, SERVING), over
    gRPC and the same-host fast path, exactly as a stage server receives pushes: for link
    measurements and tests."""
    server, servicer, _ = _chain_server(handler, options)
    return await _start_chain_port(server, servicer, host, port, same_host, options)


@dataclass
class Frontend:
    """The options of an Open Inference Protocol front end."""

    grpc_port: int = 0
    http_port: int = 0
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    timeout_s: float = 30.0
    batching: BatchingConfig | None = None
    endpoint: EndpointConfig = field(default_factory=EndpointConfig)
    """Its limits (`stage_server.limits`)."""


@dataclass
class FrontendHandle:
    """A running front end: its models (`Repository`: a gateway per model, batching where
    configured), OIP gRPC server and HTTP app, and its metrics app if on a port of its own."""

    repository: Repository
    server: grpc.aio.Server
    http: web.AppRunner
    grpc_port: int
    http_port: int
    in_flight: InFlight
    metrics: web.AppRunner | None = None

    @property
    def gateway(self) -> Any:
        """The data plane of the one model served (a gateway, or the batching front over it)."""
        return self.repository.only

    @property
    def metrics_port(self) -> int | None:
        """The port of `/metrics` alone; None: it is on the HTTP port."""
        return None if self.metrics is None else self.metrics.addresses[0][1]

    async def stop_endpoint(self, grace: float | None = None) -> None:
        """Stop the public servers (and the metrics port)."""
        await self.http.cleanup()
        if self.metrics is not None:
            await self.metrics.cleanup()
        await self.server.stop(grace)

    async def stop(self, grace: float | None = None) -> None:
        await self.stop_endpoint(grace)
        await self.repository.stop()


def _oip_server(
    repository: Repository,
    max_request_bytes: int,
    timeout_s: float,
    endpoint: EndpointConfig,
    in_flight: InFlight,
    regions: SharedMemoryRegions,
) -> grpc.aio.Server:
    """The OIP gRPC server of a front end, not yet bound."""
    settings = [
        ("grpc.max_receive_message_length", max_message_bytes(repository, max_request_bytes)),
        ("grpc.max_send_message_length", -1),
        *limits.grpc_options(endpoint.idle_timeout_s, timeout_s),
    ]
    server = _server(settings, limits.grpc_call_cap(endpoint.max_in_flight))
    add_to_server(
        InferenceServicer(repository, in_flight, regions, max_request_bytes),
        server,
        repository.metrics,
        endpoint.auth_token,
    )
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    return server


async def _start_http(
    repository: Repository,
    host: str,
    port: int,
    max_request_bytes: int,
    endpoint: EndpointConfig,
    in_flight: InFlight,
    regions: SharedMemoryRegions,
    ssl_context: ssl.SSLContext | None = None,
) -> web.AppRunner:
    runner = web.AppRunner(
        create_app(
            repository,
            max_request_bytes,
            in_flight,
            regions,
            endpoint.auth_token,
            metrics=endpoint.metrics_port is None,
        ),
        access_log=None,
        # A client that closes its connection cancels its request, which the gateway then
        # cancels along the chain, instead of serving it for no one.
        handler_cancellation=True,
        # Also closes a connection whose request's headers never complete.
        keepalive_timeout=endpoint.idle_timeout_s,
    )
    return await _start_site(runner, host, port, ssl_context)


async def _start_site(
    runner: web.AppRunner, host: str, port: int, ssl_context: ssl.SSLContext | None = None
) -> web.AppRunner:
    """Set `runner` up and listen on `host:port` (over TLS with `ssl_context`); a failure
    cleans it up."""
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
    except OSError as e:
        await runner.cleanup()
        raise MoiraiError(f"cannot listen on {host}:{port} ({e.strerror})") from None
    return runner


async def start_oip(
    repository: Repository,
    *,
    host: str = "127.0.0.1",
    grpc_port: int = 0,
    http_port: int = 0,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    timeout_s: float = 30.0,
    endpoint: EndpointConfig | None = None,
) -> FrontendHandle:
    """Serve the OIP over gRPC and HTTP for the models of `repository` (whose chains, if any,
    are served elsewhere) and start them, within `endpoint`'s limits; a failure stops what
    started. `timeout_s` is what calls get to finish when their gRPC connection reaches its
    maximum age."""
    endpoint = endpoint or EndpointConfig()
    tls = _tls(endpoint)
    in_flight = InFlight(endpoint.max_in_flight)
    regions = SharedMemoryRegions(endpoint.allow_shared_memory)
    server = _oip_server(repository, max_request_bytes, timeout_s, endpoint, in_flight, regions)
    runner = metrics = None
    try:
        bound = _bind(server, host, grpc_port, tls[0] if tls else None)
        await server.start()
        runner = await _start_http(
            repository,
            host,
            http_port,
            max_request_bytes,
            endpoint,
            in_flight,
            regions,
            tls[1] if tls else None,
        )
        if endpoint.metrics_port is not None:
            metrics = web.AppRunner(create_metrics_app(repository), access_log=None)
            metrics = await _start_site(metrics, host, endpoint.metrics_port)
    except MoiraiError:
        if runner is not None:
            await runner.cleanup()
        await server.stop(None)
        raise
    await repository.start()
    return FrontendHandle(
        repository, server, runner, bound, runner.addresses[0][1], in_flight, metrics
    )


async def _start_frontend(gateway: Gateway, host: str, options: Frontend) -> FrontendHandle:
    """The front end of a stage server's process, for `gateway`."""
    return await start_oip(
        Repository([with_batching(gateway, options.batching)]),
        host=host,
        grpc_port=options.grpc_port,
        http_port=options.http_port,
        max_request_bytes=options.max_request_bytes,
        timeout_s=options.timeout_s,
        endpoint=options.endpoint,
    )


@dataclass
class StageHandle(ChainHandle):
    """A stage server: its chain port, the data plane of each device it serves, and its front
    end if it has one."""

    impls: tuple[StageServer, ...] = field(kw_only=True)
    frontend: FrontendHandle | None = field(default=None, kw_only=True)

    @property
    def impl(self) -> StageServer:
        """The data plane of a server of one device."""
        (only,) = self.impls
        return only

    async def stop(self, grace: float | None = None) -> None:
        if self.frontend is not None:
            await self.frontend.stop(grace)
        await super().stop(grace)
        for impl in self.impls:
            await impl.stop()


async def start_stage(
    model: onnx.ModelProto,
    plan: StagePlan,
    devices: str | Sequence[str],
    addresses: Mapping[str, str],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    threads: int | None = None,
    cuda_device: int | None = None,
    workers: int = 1,
    same_host: bool = True,
    cpus: Mapping[str, set[int]] | None = None,
    frontend: Frontend | None = None,
    chain: ChainOptions = ChainOptions(),
    spin: bool = True,
) -> StageHandle:
    """A stage server on `port` for one device, or several (their stages then run each in a
    thread of its device, side by side, and hand tensors to each other in memory); with
    `frontend`, also the model's OIP front end, in this process (remote stages then push final
    outputs to `port`, the plan's "gateway" address). `cpus`: pin the threads that run a
    device's stages to these cores, and only them; `spin=False`: ONNX Runtime's threads never
    spin (other processes share these cores)."""
    devices = [devices] if isinstance(devices, str) else list(devices)
    router = Router((plan,), chain.timeout_s)
    peers = Peers(plan, addresses, same_host=same_host, local=router, token=chain.token)
    impls: list[StageServer] = []
    try:
        for device in devices:
            impls.append(
                StageServer(
                    model,
                    plan,
                    device,
                    peers,
                    threads=threads,
                    cuda_device=cuda_device,
                    workers=workers,
                    # The loop must stay free for the front end, and devices run side by side.
                    offload=frontend is not None or len(devices) > 1,
                    cpus=(cpus or {}).get(device),
                    max_pending_bytes=chain.max_pending_bytes,
                    spin=spin,
                )
            )
    except BaseException:
        for impl in impls:
            await impl.stop()
        raise
    gateway = None
    if frontend is not None:
        gateway = Gateway(plan, peers, timeout_s=frontend.timeout_s)
        router.attach([GATEWAY], gateway)
    server, servicer, health_servicer = _chain_server(router, chain)
    try:
        port_handle = await _start_chain_port(server, servicer, host, port, same_host, chain)
    except MoiraiError:
        for impl in impls:
            await impl.stop()
        raise
    for impl in impls:
        impl.start()
    for service in ("", "moirai.stage.v1.Chain"):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    handle = StageHandle(server, port_handle.port, port_handle.listener, impls=tuple(impls))
    if gateway is not None:
        assert frontend is not None
        try:
            handle.frontend = await _start_frontend(gateway, host, frontend)
        except MoiraiError:
            await handle.stop(None)
            await gateway.stop()
            raise
    return handle


@dataclass
class GatewayHandle(FrontendHandle):
    """The front end alone: its OIP servers and the chain port stages push final outputs to."""

    chain: ChainHandle = field(kw_only=True)

    @property
    def chain_port(self) -> int:
        return self.chain.port

    async def stop(self, grace: float | None = None) -> None:
        await self.stop_endpoint(grace)
        await self.chain.stop(grace)
        await self.repository.stop()


@dataclass(frozen=True)
class ServedModel:
    """One model of a standalone front end: its plan, the addresses of its stage servers
    (device names), and its own batching."""

    plan: StagePlan
    addresses: Mapping[str, str]
    batching: BatchingConfig | None = None


async def start_gateway(
    plan: StagePlan,
    addresses: Mapping[str, str],
    *,
    batching: BatchingConfig | None = None,
    **options: Any,
) -> GatewayHandle:
    """The front end of one model alone, every stage remote (`moirai gateway`); `options` are
    `start_front_end`'s."""
    return await start_front_end([ServedModel(plan, addresses, batching)], **options)


async def start_front_end(
    models: Sequence[ServedModel],
    *,
    host: str = "127.0.0.1",
    chain_port: int = 0,
    same_host: bool = True,
    chain: ChainOptions = ChainOptions(),
    **options: Any,
) -> GatewayHandle:
    """A standalone front end of one or several models (`moirai gateway`), every stage remote:
    a gateway per model in one `Repository`, behind one OIP endpoint (`options` are `Frontend`'s
    but batching, which is each model's), and the chain port, of its own, where the last stages
    of every model push their final outputs."""
    frontend = Frontend(**options)
    router = Router(tuple(m.plan for m in models), frontend.timeout_s)
    gateways = [
        Gateway(
            m.plan,
            Peers(m.plan, m.addresses, same_host=same_host, local=router, token=chain.token),
            timeout_s=frontend.timeout_s,
        )
        for m in models
    ]
    router.attach([GATEWAY], gateways[0] if len(gateways) == 1 else GatewayDispatch(gateways))
    repository = Repository(
        [with_batching(g, m.batching) for g, m in zip(gateways, models, strict=True)]
    )
    server, servicer, _ = _chain_server(router, chain)
    try:
        chain_handle = await _start_chain_port(server, servicer, host, chain_port, same_host, chain)
    except MoiraiError:
        await repository.stop()
        raise
    try:
        handle = await start_oip(
            repository,
            host=host,
            grpc_port=frontend.grpc_port,
            http_port=frontend.http_port,
            max_request_bytes=frontend.max_request_bytes,
            timeout_s=frontend.timeout_s,
            endpoint=frontend.endpoint,
        )
    except MoiraiError:
        await chain_handle.stop(None)
        await repository.stop()
        raise
    return GatewayHandle(
        repository,
        handle.server,
        handle.http,
        handle.grpc_port,
        handle.http_port,
        handle.in_flight,
        handle.metrics,
        chain=chain_handle,
    )
