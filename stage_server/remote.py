"""A model served by another Open Inference Protocol endpoint, as a data plane of this one.

The shared endpoint on Kubernetes (`moirai_operator.endpoint`) serves every PlacedModel behind
one address: its `Repository` holds a `RemoteModel` per PlacedModel, which forwards each request
over gRPC to that model's own gateway Service (where the model's batching, lanes and chain
are). To the transports it is a data plane like a `Gateway`: `infer`, metadata, readiness.

Readiness and metadata are polled, not asked per request: every `poll_s` the model's
ModelReady, and its ModelMetadata each time it becomes ready (a new plan may change the model).
A model that is not ready, or not reachable, refuses requests with UNAVAILABLE at once, saying
why; an error of the remote endpoint reaches the client with the remote's status code.

A model behind an endpoint token (`spec.serving.authTokenSecret`) is served too, though this
front end holds no token: each request goes on with the `authorization` its client sent
(`stage_server.auth.client_authorization`), which the model's gateway checks, so a client
without the token is refused there (UNAUTHENTICATED, HTTP 401) as on the model's own Service.
Its ModelReady needs the token, so its readiness is polled with ServerReady, which is open and,
on a gateway of one model, says the same; its metadata is asked at each ModelMetadata request,
with that client's token (`describe`).

A model whose endpoint serves TLS (`spec.serving.tlsSecret` on Kubernetes) is called over TLS,
its certificate verified, never skipped: against `trust_root` (PEM certificates: the issuer's, or
a self-signed certificate itself) and for `server_name` (the gateway Service's DNS name, which
the certificate must carry), whatever address the channel dials. A handshake that fails says so
in the model's `reason`, in one line, and its requests fail with UNAVAILABLE.

The forwarding costs one gRPC hop and a copy of the tensors each way, on top of the model's own
endpoint: clients that care for the last fraction of a millisecond call the model's own Service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from moirai.stageplan import TensorSpec
from stage_server import auth, codec
from stage_server.errors import Unavailable, from_code
from stage_server.limits import request_timeout_s
from stage_server.metrics import Metrics
from stage_server.oip_grpc import SERVICE
from stage_server.protos import grpc_predict_v2_pb2 as oip

log = logging.getLogger(__name__)

_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


@dataclass(frozen=True)
class TLSTarget:
    """How to verify a remote endpoint that serves TLS: the PEM certificates to trust, and the
    name its certificate must carry (checked instead of the address dialled)."""

    trust_root: bytes
    server_name: str
    source: str = "the trust root given"
    """Where `trust_root` came from, to say in the reason when the certificate fails it."""


def _channel(address: str, tls: TLSTarget | None) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(address, options=_OPTIONS)
    credentials = grpc.ssl_channel_credentials(root_certificates=tls.trust_root)
    options = [*_OPTIONS, ("grpc.ssl_target_name_override", tls.server_name)]
    return grpc.aio.secure_channel(address, credentials, options=options)


_HANDSHAKE_SIGNS = ("handshake", "certificate", "verification", "peer name", "ssl")
"""Words of gRPC's errors when a TLS handshake failed (its certificate, or the name, did not
verify)."""


class RemoteModel:
    """Model `model_name` at the OIP gRPC endpoint `address` (host:port), over TLS verified as
    `tls` says when given, else in plaintext."""

    def __init__(
        self,
        model_name: str,
        address: str,
        *,
        tls: TLSTarget | None = None,
        timeout_s: float = 30.0,
        poll_s: float = 1.0,
    ) -> None:
        self.model_name = model_name
        self.address = address
        self.tls = tls
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.metrics = Metrics({})
        self.inputs: dict[str, TensorSpec] = {}
        self.outputs: dict[str, TensorSpec] = {}
        self.reason = f"its endpoint {address} has not answered yet"
        """Why it is not ready (the repository index shows it)."""
        self._ready = False
        self._described = False
        """Whether `inputs` and `outputs` are the model's as it now is."""
        self._needs_token = False
        """Its ModelReady refused the shared endpoint (which has no token): poll ServerReady."""
        self._channel = _channel(address, tls)
        self._infer = self._channel.unary_unary(f"/{SERVICE}/ModelInfer")
        self._model_ready = self._channel.unary_unary(
            f"/{SERVICE}/ModelReady",
            request_serializer=oip.ModelReadyRequest.SerializeToString,
            response_deserializer=oip.ModelReadyResponse.FromString,
        )
        self._server_ready = self._channel.unary_unary(
            f"/{SERVICE}/ServerReady",
            request_serializer=oip.ServerReadyRequest.SerializeToString,
            response_deserializer=oip.ServerReadyResponse.FromString,
        )
        self._metadata = self._channel.unary_unary(
            f"/{SERVICE}/ModelMetadata",
            request_serializer=oip.ModelMetadataRequest.SerializeToString,
            response_deserializer=oip.ModelMetadataResponse.FromString,
        )
        self._poller: asyncio.Task[None] | None = None

    def ready(self) -> bool:
        return self._ready

    async def start(self) -> None:
        """Poll from now on (the first answer makes it ready)."""
        self._poller = asyncio.get_running_loop().create_task(self._poll_forever())

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        await self._channel.close()

    async def _poll_forever(self) -> None:
        while True:
            await self.poll()
            await asyncio.sleep(self.poll_s)

    async def _is_ready(self) -> bool:
        timeout = self.poll_s + 1.0
        if not self._needs_token:
            name = oip.ModelReadyRequest(name=self.model_name)
            try:
                return (await self._model_ready(name, timeout=timeout)).ready
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNAUTHENTICATED:
                    raise
                self._needs_token = True
                log.info("model %s at %s needs its clients' token", self.model_name, self.address)
        return (await self._server_ready(oip.ServerReadyRequest(), timeout=timeout)).ready

    async def poll(self) -> None:
        """Ask the endpoint whether the model is ready (and its metadata when it becomes so,
        unless that needs a client's token)."""
        try:
            ready = await self._is_ready()
            if ready and not self._ready:
                self._described = False
                if not self._needs_token:
                    await self._learn_metadata()
            self.reason = "" if ready else f"its endpoint {self.address} reports it not ready"
        except grpc.aio.AioRpcError as e:
            ready = False
            self.reason = self._unreachable(e)
        if ready != self._ready:
            log.info("model %s at %s: %s", self.model_name, self.address, self.reason or "ready")
        self._ready = ready

    def _unreachable(self, e: grpc.aio.AioRpcError) -> str:
        """Why the endpoint did not answer, in one line: for TLS, what its certificate must
        be when the handshake failed."""
        details = " ".join((e.details() or "").split())
        if self.tls is not None and any(sign in details.lower() for sign in _HANDSHAKE_SIGNS):
            # gRPC's "failed to connect to all addresses; last error: UNKNOWN: ipv4:IP:PORT: "
            # says nothing the reason does not.
            details = re.sub(r"^.*last error: \w+: \S+: ", "", details)[:300]
            return (
                f"its endpoint {self.address} failed the TLS check: its certificate must be "
                f"signed by {self.tls.source} (or be it) and carry the DNS name "
                f"{self.tls.server_name} ({details})"
            )
        return f"its endpoint {self.address} does not answer ({e.code().name})"

    async def _learn_metadata(self) -> None:
        request = oip.ModelMetadataRequest(name=self.model_name)
        metadata = await self._metadata(
            request, timeout=self.poll_s + 1.0, metadata=auth.forwarded_metadata()
        )
        self.inputs = _specs(metadata.inputs)
        self.outputs = _specs(metadata.outputs)
        self._described = True

    async def describe(self) -> None:
        """Learn the ready model's metadata (`inputs`, `outputs`) unless known, with the token
        of the client being served, if any; the remote's refusal (without the token:
        UNAUTHENTICATED) reaches that client. A model behind a token is asked each time, so
        that no client without it learns what one with it did. A model not ready keeps what is
        known."""
        if (self._described and not self._needs_token) or not self._ready:
            return
        try:
            await self._learn_metadata()
        except grpc.aio.AioRpcError as e:
            raise from_code(e.code().name, f"{self.address}: {e.details()}") from None

    async def infer(
        self,
        inputs: Mapping[str, np.ndarray],
        requested: Sequence[str] | None = None,
        timeout_s: float | None = None,
        places: Mapping[str, memoryview] | None = None,
    ) -> dict[str, np.ndarray]:
        """The requested outputs (all when None), from the model's own endpoint (`places` are
        not used: the front end copies the outputs there)."""
        if not self._ready:
            raise Unavailable(f"model {self.model_name!r} is not ready: {self.reason}")
        timeout = request_timeout_s(timeout_s, self.timeout_s)
        request = codec.encode_infer_request(self.model_name, inputs, requested or ())
        started = time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            reply = await self._infer(request, timeout=timeout, metadata=auth.forwarded_metadata())
        except grpc.aio.AioRpcError as e:
            raise from_code(e.code().name, f"{self.address}: {e.details()}") from None
        finally:
            self.metrics.in_flight.dec()
        self.metrics.request_seconds.observe(time.perf_counter() - started)
        return codec.decode_infer_response(reply)


def _specs(tensors: Sequence[oip.ModelMetadataResponse.TensorMetadata]) -> dict[str, TensorSpec]:
    return {t.name: TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in tensors}
