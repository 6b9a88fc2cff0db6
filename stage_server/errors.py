"""Serving errors and the one table that maps them to gRPC and HTTP status codes.

The data plane (stage servers, gateway) raises these domain errors and knows nothing of
transports. Each transport translates them in exactly one place: `status_of` below, used by the
gRPC interceptor and the HTTP middleware (`stage_server.transport`). A failure that travels along
the chain (a stage reporting to the gateway) carries the gRPC code name, and `from_code` turns it
back into the same domain error, so the client of the gateway sees the code of the original
failure.
"""

from __future__ import annotations

import grpc

from moirai.errors import MoiraiError


class ServingError(MoiraiError):
    """A request could not be served; subclasses say why."""


class InvalidInput(ServingError):
    """The request's tensors do not match the model (name, datatype, shape or contents)."""


class NotFound(ServingError):
    """The request names a model this gateway does not serve."""


class AlreadyExists(ServingError):
    """The request would create what exists already (a shared memory region's name)."""


class NotAllowed(ServingError):
    """This endpoint does not serve the request's kind (shared memory, when not allowed)."""


class TooLarge(ServingError):
    """The request exceeds the configured size limit."""


class Overloaded(ServingError):
    """The server holds as many requests (or bytes of them) as it is configured to: retry
    later."""


class Unauthenticated(ServingError):
    """The call lacks the token that this server needs (`stage_server.auth`)."""


class ClientTimeout(ServingError):
    """The client did not send its request within the time it is given."""


class Unavailable(ServingError):
    """A stage server cannot be reached or is not serving."""


class DeadlineExceeded(ServingError):
    """The request's deadline passed before its outputs were complete."""


class Cancelled(ServingError):
    """The client gave up on the request."""


class StageFailed(ServingError):
    """A stage raised while running its sub-model."""


class SharedMemoryUnavailable(ServingError):
    """A push names a shared-memory tensor this receiver cannot map (`stage_server.shm`); the
    sender falls back to inline bytes. Never reaches a client."""


_STATUS: dict[type[ServingError], tuple[grpc.StatusCode, int]] = {
    InvalidInput: (grpc.StatusCode.INVALID_ARGUMENT, 400),
    NotFound: (grpc.StatusCode.NOT_FOUND, 404),
    AlreadyExists: (grpc.StatusCode.ALREADY_EXISTS, 409),
    NotAllowed: (grpc.StatusCode.PERMISSION_DENIED, 403),
    Unauthenticated: (grpc.StatusCode.UNAUTHENTICATED, 401),
    TooLarge: (grpc.StatusCode.RESOURCE_EXHAUSTED, 413),
    Overloaded: (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    Unavailable: (grpc.StatusCode.UNAVAILABLE, 503),
    ClientTimeout: (grpc.StatusCode.DEADLINE_EXCEEDED, 408),
    DeadlineExceeded: (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    Cancelled: (grpc.StatusCode.CANCELLED, 499),
    StageFailed: (grpc.StatusCode.INTERNAL, 500),
    SharedMemoryUnavailable: (grpc.StatusCode.FAILED_PRECONDITION, 500),
}
_BY_CODE = {code.name: cls for cls, (code, _) in _STATUS.items()}
"""A code reported along the chain becomes the last error of the table with that code: a stage
that is full (RESOURCE_EXHAUSTED) is `Overloaded`, a deadline is `DeadlineExceeded`."""


def status_of(error: BaseException) -> tuple[grpc.StatusCode, int]:
    """The gRPC status code and HTTP status of an error; INTERNAL / 500 for anything unexpected."""
    for cls in type(error).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return grpc.StatusCode.INTERNAL, 500


def from_code(code: str, message: str) -> ServingError:
    """The domain error for a gRPC status code name reported along the chain."""
    return _BY_CODE.get(code, StageFailed)(message)
