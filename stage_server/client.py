"""A small Open Inference Protocol gRPC client, for `moirai infer`, the demo and the benchmarks.

Any OIP client works against the gateway (tritonclient, KServe's); this one exists so that Moirai
needs no extra client package, and it uses the same codec as the gateway. `InferenceClient` is
blocking; `AsyncInferenceClient` runs many requests concurrently on one channel.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc
import numpy as np

from stage_server import codec
from stage_server.oip_grpc import SERVICE
from stage_server.protos import grpc_predict_v2_pb2 as oip

_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def _method(channel: Any, name: str, request: type, response: type) -> Any:
    return channel.unary_unary(
        f"/{SERVICE}/{name}",
        request_serializer=request.SerializeToString,
        response_deserializer=response.FromString,
    )


def _auth(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """The metadata of calls to an endpoint that needs `token` (`stage_server.auth`)."""
    return None if token is None else (("authorization", f"Bearer {token}"),)


def _channel(api: Any, address: str, tls_ca: bytes | None) -> Any:
    """A channel of `api` (`grpc` or `grpc.aio`) to `address`, over TLS trusting `tls_ca`."""
    if tls_ca is None:
        return api.insecure_channel(address, options=_OPTIONS)
    credentials = grpc.ssl_channel_credentials(root_certificates=tls_ca)
    return api.secure_channel(address, credentials, options=_OPTIONS)


class InferenceClient:
    def __init__(self, address: str, token: str | None = None, tls_ca: bytes | None = None) -> None:
        """`token`: the endpoint's bearer token, if it needs one; `tls_ca`: the PEM
        certificates to trust for an endpoint that serves TLS (None: plaintext)."""
        self._auth = _auth(token)
        self._channel = _channel(grpc, address, tls_ca)
        self._ready = _method(
            self._channel, "ServerReady", oip.ServerReadyRequest, oip.ServerReadyResponse
        )
        self._metadata = _method(
            self._channel, "ModelMetadata", oip.ModelMetadataRequest, oip.ModelMetadataResponse
        )
        self._infer = self._channel.unary_unary(f"/{SERVICE}/ModelInfer")

    def ready(self, timeout_s: float = 5.0) -> bool:
        return bool(self._ready(oip.ServerReadyRequest(), timeout=timeout_s).ready)

    def metadata(self, model: str, timeout_s: float = 5.0) -> oip.ModelMetadataResponse:
        request = oip.ModelMetadataRequest(name=model)
        return self._metadata(request, timeout=timeout_s, metadata=self._auth)

    def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] = (),
        timeout_s: float = 30.0,
    ) -> dict[str, np.ndarray]:
        request = codec.encode_infer_request(model, inputs, outputs)
        reply = self._infer(request, timeout=timeout_s, metadata=self._auth)
        return codec.decode_infer_response(reply)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncInferenceClient:
    def __init__(self, address: str, token: str | None = None, tls_ca: bytes | None = None) -> None:
        """As `InferenceClient`'s, on asyncio."""
        self._auth = _auth(token)
        self._channel = _channel(grpc.aio, address, tls_ca)
        self._infer = self._channel.unary_unary(f"/{SERVICE}/ModelInfer")

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] = (),
        timeout_s: float = 30.0,
    ) -> dict[str, np.ndarray]:
        request = codec.encode_infer_request(model, inputs, outputs)
        reply = await self._infer(request, timeout=timeout_s, metadata=self._auth)
        return codec.decode_infer_response(reply)

    async def close(self) -> None:
        await self._channel.close()
