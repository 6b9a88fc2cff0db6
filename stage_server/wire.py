"""`moirai.stage.v1.PushRequest` on the wire, without copying tensor bytes through protobuf.

A push is mostly tensor bytes. Through the protobuf classes they would be copied four times
(array to bytes, bytes into the message, message to the wire, and out of the parsed message on
the other side), and on a machine where fresh memory is slow to fault in, those copies, not the
socket, set the cost of a hop. So this module writes and reads the same wire format by hand where
the bytes are: the small fields still go through `stage_pb2` (one message per tensor header, one
for the request header), and each tensor's `data` is appended after its header as a
length-delimited field, so the sender copies the array once (into the gRPC payload) and the
receiver gets a numpy array that is a view into the received payload. Any protobuf
implementation reads what `encode_push` writes, and `decode_push` reads what any protobuf
implementation writes (fields in any order, unknown fields skipped): `stage.proto` stays the
contract.

Timings travel as their encoded `PushRequest.timings` fields, opaque to the stage servers: a stage
adds its own and forwards the rest as bytes, so a long chain does not parse and re-encode the
growing list at every hop; the gateway decodes them once, when the request completes. A timing
made in this process is a `Timing` tuple until a push encodes it: one that never leaves the
process (a one-stage plan whose front end runs beside its stage) is never encoded at all.

Tensors that travel through shared memory (`stage_server.shm`, on the same-host path only) carry
a `SharedMemory` reference instead of `data`; `decode_push` gives read-only arrays over the
receiver's mapping of the sender's file (and raises `SharedMemoryUnavailable` when it cannot map
it, so the sender can fall back to inline bytes).

The by-hand parts of the format (varints, walking fields) are `stage_server.protowire`'s.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from stage_server import codec, protowire, shm
from stage_server.errors import InvalidInput, SharedMemoryUnavailable
from stage_server.protos import stage_pb2

# Field numbers, from stage.proto's descriptors.
_PUSH_TENSORS = stage_pb2.PushRequest.TENSORS_FIELD_NUMBER
_PUSH_TIMINGS = stage_pb2.PushRequest.TIMINGS_FIELD_NUMBER
_TENSOR_DATA = stage_pb2.Tensor.DATA_FIELD_NUMBER
_TENSOR_SHARED = stage_pb2.Tensor.SHARED_FIELD_NUMBER
_TIMING_KEY = protowire.key(_PUSH_TIMINGS)
_TENSOR_KEY = protowire.key(_PUSH_TENSORS)
_DATA_KEY = protowire.key(_TENSOR_DATA)


@dataclass
class Push:
    """A decoded `PushRequest`."""

    request_id: str
    stage: str
    tensors: dict[str, np.ndarray]
    deadline_ms: float
    sent_ms: float
    timings: tuple[bytes, ...]
    """Encoded `timings` fields (see `decode_timings`)."""
    origin: str


class Timing(NamedTuple):
    """One `moirai.stage.v1.Timing`, as this process made it (not yet encoded)."""

    stage: str
    kind: str
    ms: float
    tensor: str = ""


Timings = Sequence["bytes | Timing"]
"""Timings as they travel with a request: encoded fields received from a peer, or tuples made
in this process."""


def _encoded(t: bytes | Timing) -> bytes:
    """One `PushRequest.timings` field."""
    if isinstance(t, bytes):
        return t
    body = stage_pb2.Timing(stage=t.stage, kind=t.kind, tensor=t.tensor, ms=t.ms)
    data = body.SerializeToString()
    return _TIMING_KEY + protowire.varint(len(data)) + data


def decode_timings(timings: Collection[bytes | Timing]) -> list[Timing]:
    """Every timing once (one that came back to its process encoded equals its tuple)."""
    found = dict.fromkeys(timings)
    encoded = [t for t in found if isinstance(t, bytes)]
    if encoded:
        for t in encoded:
            del found[t]
        for t in stage_pb2.PushRequest.FromString(b"".join(encoded)).timings:
            found[Timing(t.stage, t.kind, t.ms, t.tensor)] = None
    return list(found)


def encode_push(
    request_id: str,
    stage: str,
    tensors: Mapping[str, np.ndarray],
    deadline_ms: float,
    sent_ms: float,
    timings: Timings = (),
    origin: str = "",
    shared: Mapping[str, stage_pb2.SharedMemory] | None = None,
) -> bytes:
    """The wire bytes of a push; tensors named in `shared` travel by reference."""
    header = stage_pb2.PushRequest(
        request_id=request_id,
        stage=stage,
        deadline_unix_ms=deadline_ms,
        sent_unix_ms=sent_ms,
        origin=origin,
    )
    parts: list[bytes | memoryview] = [header.SerializeToString(), *map(_encoded, timings)]
    for name, array in tensors.items():
        meta = stage_pb2.Tensor(name=name, datatype=codec.datatype_of(array), shape=array.shape)
        ref = (shared or {}).get(name)
        if ref is not None:
            meta.shared.CopyFrom(ref)
            body = meta.SerializeToString()
            parts += [_TENSOR_KEY, protowire.varint(len(body)), body]
            continue
        data = codec.raw_bytes(array)
        body = meta.SerializeToString()
        data_head = _DATA_KEY + protowire.varint(data.nbytes)
        parts += [
            _TENSOR_KEY,
            protowire.varint(len(body) + len(data_head) + data.nbytes),
            body,
            data_head,
        ]
        parts.append(data)
    return b"".join(parts)


def decode_push(payload: bytes, mappings: shm.Mappings | None = None) -> Push:
    """A push from its wire bytes; tensor arrays are read-only views into `payload`, or into
    shared memory through the connection's `mappings` (same-host path only)."""
    buf = memoryview(payload)
    header: list[memoryview] = []
    tensor_spans: list[tuple[int, int]] = []
    timings: list[bytes] = []
    for number, start, value, end in protowire.fields(buf):
        if number == _PUSH_TENSORS:
            tensor_spans.append((value, end))
        elif number == _PUSH_TIMINGS:
            timings.append(bytes(buf[start:end]))
        else:
            header.append(buf[start:end])
    try:
        request = stage_pb2.PushRequest.FromString(b"".join(header))
    except Exception as e:  # protobuf's DecodeError and friends
        raise InvalidInput(f"malformed push header: {e}") from None
    tensors = {}
    for value, end in tensor_spans:
        name, array = _decode_tensor(buf[value:end], mappings)
        tensors[name] = array
    return Push(
        request.request_id,
        request.stage,
        tensors,
        request.deadline_unix_ms,
        request.sent_unix_ms,
        tuple(timings),
        request.origin,
    )


def _decode_tensor(buf: memoryview, mappings: shm.Mappings | None) -> tuple[str, np.ndarray]:
    meta_parts: list[memoryview] = []
    data: bytes | memoryview | np.ndarray | None = None
    for number, start, value, end in protowire.fields(buf):
        if number == _TENSOR_DATA:
            data = buf[value:end]  # repeated scalar fields would keep the last; so does this
        else:
            meta_parts.append(buf[start:end])
    try:
        meta = stage_pb2.Tensor.FromString(b"".join(meta_parts))
    except Exception as e:
        raise InvalidInput(f"malformed tensor in push: {e}") from None
    if meta.HasField("shared"):
        if mappings is None:
            raise SharedMemoryUnavailable("shared-memory tensors travel the same-host path only")
        nbytes = codec.nbytes(meta.name, meta.datatype, meta.shape)
        data = mappings.read(meta.shared, nbytes)
    return meta.name, codec.from_bytes(
        meta.name, meta.datatype, meta.shape, data if data is not None else b""
    )
