"""Open Inference Protocol over gRPC: `inference.GRPCInferenceService`, a thin adapter.

Each method looks the request's model up in the front end's `Repository` (NOT_FOUND for a model
not served), converts with `stage_server.codec`, calls that model's data plane, and converts
back; errors are raised as domain errors and become status codes in
`stage_server.transport.guarded`. The request size limit is the gRPC server's
`max_receive_message_length` (`max_message_bytes`: the request limit, or what the models' inputs
can take when their shapes are fixed), so gRPC refuses an oversized request with
RESOURCE_EXHAUSTED from its message header, before it is held in memory; string tensors, which
take several times their wire size decoded, are counted against the same limit as they are
decoded (`codec.Budget`), and a request past it is refused with RESOURCE_EXHAUSTED too. Each
inference takes a
place among the front end's requests in flight (`stage_server.limits.InFlight`). A client
deadline shortens the gateway's own timeout.

The methods are registered under the specification's service name, `inference.
GRPCInferenceService`, by `add_to_server` (the messages live in a private protobuf package; see
`protos/grpc_predict_v2.proto` for why). The protocol's repository methods are not among them
(UNIMPLEMENTED): the list of models is HTTP's (`oip_http`). The system shared-memory extension's
methods are Triton's (`stage_server.regions`).
"""

from __future__ import annotations

import math

import grpc

from moirai import __version__
from stage_server import auth, codec
from stage_server.limits import InFlight
from stage_server.protos import grpc_predict_v2_pb2 as oip
from stage_server.regions import SharedMemoryRegions
from stage_server.repository import VERSION, Repository, described
from stage_server.transport import CountsErrors, guarded

SERVICE = "inference.GRPCInferenceService"
METHODS: dict[str, tuple[type, type]] = {
    "ServerLive": (oip.ServerLiveRequest, oip.ServerLiveResponse),
    "ServerReady": (oip.ServerReadyRequest, oip.ServerReadyResponse),
    "ModelReady": (oip.ModelReadyRequest, oip.ModelReadyResponse),
    "ServerMetadata": (oip.ServerMetadataRequest, oip.ServerMetadataResponse),
    "ModelMetadata": (oip.ModelMetadataRequest, oip.ModelMetadataResponse),
    "SystemSharedMemoryStatus": (
        oip.SystemSharedMemoryStatusRequest,
        oip.SystemSharedMemoryStatusResponse,
    ),
    "SystemSharedMemoryRegister": (
        oip.SystemSharedMemoryRegisterRequest,
        oip.SystemSharedMemoryRegisterResponse,
    ),
    "SystemSharedMemoryUnregister": (
        oip.SystemSharedMemoryUnregisterRequest,
        oip.SystemSharedMemoryUnregisterResponse,
    ),
}
"""Methods with protobuf (de)serialisers; ModelInfer takes and returns raw bytes, which
`stage_server.codec` reads and writes without copying tensors through protobuf."""
SERVER_NAME = "moirai"
PLATFORM = "onnxruntime_onnx"
MESSAGE_OVERHEAD = 64 << 10
"""Bytes of a ModelInferRequest besides its tensors' values (names, shapes, parameters): far
less in practice."""
_VARINT_MAX = 10
"""Bytes of an integer in typed contents at most (a negative int32 is sign-extended)."""


def max_message_bytes(repository: Repository, max_request_bytes: int) -> int:
    """The largest ModelInferRequest worth receiving: `max_request_bytes`, or less when every
    model is known from the start and every input of each has a fixed shape (its values as raw
    contents or typed ones). A repository whose models come and go (labelled, empty at first:
    the shared endpoint) keeps `max_request_bytes`."""
    planes = repository.planes
    if not planes or any(getattr(p, "input_bytes", None) is None for p in planes):
        return max_request_bytes
    largest = 0
    for plane in planes:
        total = MESSAGE_OVERHEAD
        for spec in plane.inputs.values():
            itemsize = codec.DTYPES[spec.datatype].itemsize
            per_value = _VARINT_MAX if spec.datatype[:3] in ("INT", "UIN") else itemsize
            total += math.prod(spec.shape) * per_value
        largest = max(largest, total)
    return min(max_request_bytes, largest)


OPEN_METHODS = (f"/{SERVICE}/ServerLive", f"/{SERVICE}/ServerReady")
"""Methods that need no endpoint token: liveness and readiness, which probes call."""


def add_to_server(
    servicer: InferenceServicer,
    server: grpc.aio.Server,
    metrics: CountsErrors | None = None,
    token: str | None = None,
) -> None:
    """Register the methods, each `guarded` (errors counted in `metrics`); with `token`, all but
    `OPEN_METHODS` only for calls that carry it (`stage_server.auth`)."""
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            guarded(getattr(servicer, name), metrics),
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        )
        for name, (request, response) in METHODS.items()
    }
    handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(
        guarded(servicer.ModelInfer, metrics)
    )
    generic = grpc.method_handlers_generic_handler(SERVICE, handlers)
    server.add_generic_rpc_handlers((auth.endpoint_guard(generic, token, OPEN_METHODS),))


class InferenceServicer:
    def __init__(
        self,
        repository: Repository,
        in_flight: InFlight,
        regions: SharedMemoryRegions,
        max_request_bytes: int | None = None,
    ) -> None:
        """`in_flight` counts inference requests, `regions` are the clients' shared memory
        (both shared with the HTTP transport); `max_request_bytes`: what a request's tensors may
        take in memory decoded (strings take several times their wire size; `codec.Budget`)."""
        self._repository = repository
        self._in_flight = in_flight
        self._regions = regions
        self._max_request_bytes = max_request_bytes

    async def ServerLive(
        self, request: oip.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: oip.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=self._repository.ready())

    async def ModelReady(
        self, request: oip.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelReadyResponse:
        plane = self._repository.get(request.name, request.version)
        return oip.ModelReadyResponse(ready=plane.ready())

    async def ServerMetadata(
        self, request: oip.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerMetadataResponse:
        extensions = ["system_shared_memory"] if self._regions.allowed else []
        return oip.ServerMetadataResponse(
            name=SERVER_NAME, version=__version__, extensions=extensions
        )

    async def ModelMetadata(
        self, request: oip.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelMetadataResponse:
        plane = self._repository.get(request.name, request.version)
        with auth.ServingClient(auth.grpc_authorization(context)):
            await described(plane)
        tensor = oip.ModelMetadataResponse.TensorMetadata
        return oip.ModelMetadataResponse(
            name=plane.model_name,
            versions=[VERSION],
            platform=PLATFORM,
            inputs=[
                tensor(name=t.name, datatype=t.datatype, shape=t.shape)
                for t in plane.inputs.values()
            ],
            outputs=[
                tensor(name=t.name, datatype=t.datatype, shape=t.shape)
                for t in plane.outputs.values()
            ],
        )

    async def ModelInfer(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        with self._in_flight, auth.ServingClient(auth.grpc_authorization(context)):
            shared = self._regions.view
            message, inputs = codec.decode_infer_request(request, shared, self._max_request_bytes)
            plane = self._repository.get(message.model_name, message.model_version)
            requested, places = None, None  # the usual request names no outputs: all of them
            if message.outputs:
                requested = [o.name for o in message.outputs]
                places = codec.shared_outputs(
                    ((o.name, o.parameters) for o in message.outputs), shared
                )
            outputs = await plane.infer(inputs, requested, context.time_remaining(), places)
            return codec.encode_infer_response(plane.model_name, message.id, outputs, places)

    async def SystemSharedMemoryStatus(
        self, request: oip.SystemSharedMemoryStatusRequest, context: grpc.aio.ServicerContext
    ) -> oip.SystemSharedMemoryStatusResponse:
        status = oip.SystemSharedMemoryStatusResponse.RegionStatus
        return oip.SystemSharedMemoryStatusResponse(
            regions={
                r.name: status(name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size)
                for r in self._regions.status(request.name)
            }
        )

    async def SystemSharedMemoryRegister(
        self, request: oip.SystemSharedMemoryRegisterRequest, context: grpc.aio.ServicerContext
    ) -> oip.SystemSharedMemoryRegisterResponse:
        self._regions.register(request.name, request.key, request.offset, request.byte_size)
        return oip.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(
        self, request: oip.SystemSharedMemoryUnregisterRequest, context: grpc.aio.ServicerContext
    ) -> oip.SystemSharedMemoryUnregisterResponse:
        self._regions.unregister(request.name)
        return oip.SystemSharedMemoryUnregisterResponse()
