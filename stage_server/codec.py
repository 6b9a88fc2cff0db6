"""One codec for every tensor that crosses a wire.

Tensors are numpy arrays inside Moirai and travel as raw bytes + datatype + shape outside it. The
datatype names are the Open Inference Protocol's (`FP32`, `INT64`, ...), used everywhere: in the
stage plan, on the internal chain (`moirai.stage.v1.Tensor`) and at the gateway, so there is one
table of types. This module converts between numpy and each of the wire forms:

- the chain's `Tensor` message (raw bytes; framed without protobuf copies by `stage_server.wire`);
- the OIP gRPC `ModelInferRequest`/`ModelInferResponse` (raw contents or typed contents; raw
  contents framed by `stage_server.protowire`, so a large tensor is copied once, not four times);
- the OIP HTTP/JSON body (`data` lists) and its binary-data extension (raw bytes after the JSON).

String tensors (ONNX `tensor(string)`) are the datatype `BYTES`, as in Triton and KServe: inside
Moirai a numpy array of Python `str` (dtype object), what ONNX Runtime takes and returns; on every
wire that carries raw bytes (the chain's `Tensor.data`, gRPC `raw_*_contents`, the binary-data
extension, clients' shared memory) each element is a 4-byte little-endian length followed by its
UTF-8 bytes, in row-major order (`encode_strings`, `decode_strings`: the one serialisation); gRPC
typed contents carry them as `bytes_contents`, JSON `data` as strings. ONNX Runtime's Python API
takes only `str` elements (`bytes` ones it turns into their repr, silently), so an element that
is not UTF-8 is refused here, naming the tensor. The numeric paths do not change: each function
branches on `BYTES` only where a numeric lookup has already missed, or once per tensor.

A string tensor takes far more memory decoded than on the wire: each element is a Python `str` of
some 40 to 50 bytes besides its characters, by Python version (about ten times the wire size for
words of two letters), which `nbytes` does not see (it counts the 8-byte pointers). `memory_bytes`
is what a decoded tensor holds, the one count of every limit on held bytes. The front end decodes a
request under a `Budget` (its `--max-request-bytes`): a string tensor's elements are counted as
they are made, so a request past the limit is refused (`TooLarge`) before its strings are decoded
whole.

Every malformed tensor raises `InvalidInput` with a message naming the tensor and what was
expected, so the transports never see a numpy or protobuf exception.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from stage_server import protowire
from stage_server.errors import InvalidInput, TooLarge
from stage_server.protos import grpc_predict_v2_pb2 as oip

DTYPES: Mapping[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
"""The fixed-size datatypes: each element takes its dtype's itemsize (`BYTES` is not one)."""
_NAMES = {dtype: name for name, dtype in DTYPES.items()}

BYTES = "BYTES"
"""The datatype of string tensors: numpy arrays of `str` (dtype object) inside Moirai, and each
element length-prefixed on the wire (`encode_strings`)."""
_STRINGS = np.dtype(object)
DATATYPES = (*DTYPES, BYTES)
"""Every datatype Moirai serves."""

# The typed-contents field of `InferTensorContents` for each datatype (FP16 travels raw only).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def datatype_of(array: np.ndarray) -> str:
    """The OIP datatype name of a numpy array."""
    try:
        return _NAMES[array.dtype]
    except KeyError:
        if array.dtype.kind in "OUS":  # object (of str or bytes), numpy's unicode and bytes
            return BYTES
        raise InvalidInput(f"tensor dtype {array.dtype} is not supported") from None


def datatype_name(dtype: np.dtype) -> str:
    """The OIP datatype name of a numpy dtype, for messages: numpy's own name where Moirai
    serves none."""
    name = _NAMES.get(dtype)
    if name is None:
        return BYTES if dtype.kind in "OUS" else str(dtype)
    return name


def numpy_dtype(datatype: str, name: str, role: str = "input") -> np.dtype:
    """The numpy dtype of a datatype (object for `BYTES`); `role` and `name` name the tensor in
    the message."""
    try:
        return DTYPES[datatype]
    except KeyError:
        if datatype == BYTES:
            return _STRINGS
        raise InvalidInput(
            f"{role} {name!r}: datatype {datatype!r} is not supported; use one of "
            f"{', '.join(DATATYPES)}"
        ) from None


# The largest dimension numpy and ONNX Runtime can hold (an int64); element counts are Python
# ints, so a product of large dimensions is never wrapped around.
MAX_DIM = 2**63 - 1


def _shape(shape: Sequence[int], name: str, role: str = "input") -> tuple[int, ...]:
    dims = tuple(map(int, shape))
    for dim in dims:  # a loop: half the time of min() and max() on a request's few dimensions
        if dim < 0:
            raise InvalidInput(f"{role} {name!r}: shape {list(dims)} has a negative dimension")
        if dim > MAX_DIM:
            raise InvalidInput(
                f"{role} {name!r}: shape {list(dims)} has a dimension above 2**63 - 1; give the "
                "tensor's real shape"
            )
    return dims


def nbytes(name: str, datatype: str, shape: Sequence[int]) -> int:
    """The size in bytes of a tensor of this fixed-size datatype and shape."""
    if datatype == BYTES:
        raise InvalidInput(f"tensor {name!r}: BYTES tensors have no size fixed by their shape")
    return math.prod(_shape(shape, name)) * numpy_dtype(datatype, name).itemsize


# ------------------------------------------------------------- BYTES (strings)
_LENGTH = struct.Struct("<I")
_POINTER = np.dtype(object).itemsize
_ASCII_STR = sys.getsizeof("")
"""The size of an ASCII `str` of no characters: one of n characters takes n bytes more."""
_STR_AT_MOST = sys.getsizeof("\U0001f600") - 8
"""The most bytes a `str` takes besides 4 a character and 4 for its terminator: the header
of one with a character past U+FFFF (the 4-byte kind, the widest)."""


def memory_bytes(array: np.ndarray) -> int:
    """The bytes of memory a decoded tensor holds: its `nbytes`, plus, for a string tensor (an
    object array, whose `nbytes` counts only its pointers), the size of each element
    (`sys.getsizeof`, what tracemalloc counts; an element repeated is counted each time)."""
    if array.dtype.hasobject:
        return array.nbytes + _sizes(array.ravel().tolist())
    return array.nbytes


def _sizes(values: list[Any], utf8: int | None = None) -> int:
    """The sum of `sys.getsizeof` of `values`, at once where they are ASCII text (a fifth of
    the time): known from `utf8`, the bytes of their UTF-8 form, when given (ASCII alone has as
    many characters as bytes)."""
    try:
        chars = sum(map(len, values))
        if (chars == utf8) if utf8 is not None else all(map(str.isascii, values)):
            return len(values) * _ASCII_STR + chars
    except TypeError:  # not str (a client's bytes)
        pass
    return sum(map(sys.getsizeof, values))


def strings_bound(count: int, wire_bytes: int) -> int:
    """The most memory that `count` strings take decoded from `wire_bytes` of their wire form
    (`encode_strings`), pointers included: each character takes a byte of UTF-8 at least and 4
    bytes of memory at most."""
    return count * (_POINTER + _STR_AT_MOST + 4) + 4 * (wire_bytes - 4 * count)


class Budget:
    """The memory a request's decoded tensors may take: `limit` bytes (the front end's
    `--max-request-bytes`), of which `held` are taken so far. Given to the decoders, which
    count a string tensor's elements as they make them and refuse the request as soon as it
    passes the limit."""

    __slots__ = ("held", "limit")

    def __init__(self, limit: int, held: int = 0) -> None:
        self.limit = limit
        self.held = held

    def take(self, who: str, nbytes: int, strings: int | None = None) -> None:
        """Count `nbytes` more for tensor `who`; past the limit, refuse the request (`strings`:
        the elements of the string tensor being decoded, for the message)."""
        self.held += nbytes
        if self.held > self.limit:
            why = ""
            if strings is not None:
                why = f": its {strings} strings are Python objects, several times their wire size"
            raise TooLarge(
                f"{who}: decoded, the request would take over the {self.limit} bytes allowed "
                f"(--max-request-bytes){why}"
            )


def encode_strings(array: np.ndarray) -> bytes:
    """The wire form of a `BYTES` tensor: each element, in row-major order, as a 4-byte
    little-endian length followed by its bytes (`str` elements encoded as UTF-8), as Triton's
    and KServe's clients write it."""
    pack = _LENGTH.pack
    parts = []
    for value in array.ravel().tolist():
        if isinstance(value, str):
            value = value.encode()
        elif not isinstance(value, bytes):
            raise InvalidInput(
                f"a BYTES tensor holds {_show_value(value)} ({type(value).__name__}): its "
                "elements must be strings"
            )
        parts += (pack(len(value)), value)
    return b"".join(parts)


def decode_strings(
    who: str,
    dims: tuple[int, ...],
    data: bytes | memoryview | np.ndarray,
    budget: Budget | None = None,
) -> np.ndarray:
    """A `BYTES` tensor of shape `dims` (an array of `str`) from its wire form
    (`encode_strings`); `who` names the tensor in messages. Under a `budget`, its memory is
    taken (`memory_bytes`): its pointers first, then its elements' sizes once decoded, or, when
    they could pass the budget (`strings_bound`), each as it is decoded (half again as slow)."""
    raw = bytes(data)
    count = math.prod(dims)
    values = []
    offset, end = 0, len(raw)
    unpack = _LENGTH.unpack_from
    counting = False
    if budget is not None:
        counting = budget.held + strings_bound(count, end) > budget.limit
        budget.take(who, min(count, end // 4) * _POINTER, count)  # as many as `raw` can hold
        room, size = budget.limit - budget.held, 0
        getsizeof = sys.getsizeof
    for i in range(count):
        if offset + 4 > end:
            raise InvalidInput(
                f"{who}: BYTES contents hold {len(values)} elements in {end} bytes, but shape "
                f"{list(dims)} needs {count} (each a 4-byte little-endian length, then its bytes)"
            )
        (length,) = unpack(raw, offset)
        offset += 4
        if offset + length > end:
            raise InvalidInput(
                f"{who}: the length prefix of BYTES element {i} ({length}) runs past the end "
                f"of the contents ({end - offset} bytes left)"
            )
        value = _text(who, i, raw[offset : offset + length])
        if counting:
            size += getsizeof(value)
            if size > room:
                budget.take(who, size, count)  # raises
        values.append(value)
        offset += length
    if offset != end:
        raise InvalidInput(
            f"{who}: {end - offset} bytes follow the {count} BYTES elements of shape {list(dims)}"
        )
    if budget is not None:
        budget.take(who, size if counting else _sizes(values, end - 4 * count), count)
    return _strings(values, dims)


def _text(who: str, index: int, value: bytes) -> str:
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise InvalidInput(
            f"{who}: BYTES element {index} is not UTF-8 text (ONNX Runtime takes strings as text)"
        ) from None


def _strings(values: Sequence[str], dims: tuple[int, ...]) -> np.ndarray:
    array = np.empty(len(values), _STRINGS)
    array[:] = values
    return array.reshape(dims)


def _show_value(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def from_bytes(
    name: str,
    datatype: str,
    shape: Sequence[int],
    data: bytes | memoryview | np.ndarray,
    role: str = "input",
    budget: Budget | None = None,
) -> np.ndarray:
    """A read-only array over `data` (no copy), after checking its size against the shape; for
    `BYTES`, an array of the strings in `data` (`decode_strings`, under `budget`)."""
    dtype = numpy_dtype(datatype, name, role)
    dims = _shape(shape, name, role)
    if dtype is _STRINGS:
        return decode_strings(f"{role} {name!r}", dims, data, budget)
    expected = math.prod(dims) * dtype.itemsize
    if len(data) != expected:
        raise InvalidInput(
            f"{role} {name!r}: raw contents hold {len(data)} bytes, but {datatype} {list(dims)} "
            f"needs {expected}"
        )
    array = np.ndarray(dims, dtype, data)
    if datatype == "BOOL" and len(data) and np.frombuffer(data, np.uint8).max() > 1:
        raise InvalidInput(f"{role} {name!r}: BOOL raw contents must be bytes 0 or 1")
    return array


def raw_bytes(array: np.ndarray) -> memoryview:
    """The array's bytes as a view, without a copy (one when it is not C-contiguous); for a
    string array, its wire form (`encode_strings`)."""
    if array.dtype.kind in "OUS":
        return memoryview(encode_strings(array))
    if array.flags.c_contiguous and array.size:
        return array.data.cast("B")
    return memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


# ----------------------------------------------------------- OIP gRPC (KServe v2)
# Field numbers of the raw contents, from grpc_predict_v2.proto's descriptors.
_RAW_INPUT_CONTENTS = oip.ModelInferRequest.RAW_INPUT_CONTENTS_FIELD_NUMBER
_RAW_OUTPUT_CONTENTS = oip.ModelInferResponse.RAW_OUTPUT_CONTENTS_FIELD_NUMBER
_Tensor = oip.ModelInferRequest.InferInputTensor | oip.ModelInferResponse.InferOutputTensor


SMALL_MESSAGE_BYTES = 16 << 10
"""Below this size protobuf parses a whole message faster than the raw contents are cut out of
it by hand, and its copies of them cost next to nothing."""


SharedView = Callable[[str, str, int, int], memoryview]
"""`stage_server.regions.SharedMemoryRegions.view`: (tensor, region, byte size, offset) -> the
bytes there."""


def decode_infer_request(
    payload: bytes, shared: SharedView | None = None, max_bytes: int | None = None
) -> tuple[oip.ModelInferRequest, dict[str, np.ndarray]]:
    """A serialised `ModelInferRequest` and its input tensors, from raw contents (views into
    `payload`, no copy, and not in the message returned, if it is not small), typed contents,
    or the clients' shared memory (read through `shared`, no copy); with `max_bytes`
    (`--max-request-bytes`), one whose tensors would take more memory decoded is refused
    (`_decode_tensors`)."""
    if len(payload) < SMALL_MESSAGE_BYTES:
        message, raw = payload, None
    else:
        message, raw = protowire.split_bytes_field(payload, _RAW_INPUT_CONTENTS)
    try:
        request = oip.ModelInferRequest.FromString(message)
    except Exception as e:  # protobuf's DecodeError and friends
        raise InvalidInput(f"malformed ModelInferRequest: {e}") from None
    if raw is None:
        raw = list(request.raw_input_contents)
    return request, _decode_tensors(request.inputs, raw, "input", shared, max_bytes)


def _decode_tensors(
    tensors: Sequence[_Tensor],
    raw: list[memoryview],
    role: str,
    shared: SharedView | None = None,
    max_bytes: int | None = None,
) -> dict[str, np.ndarray]:
    """The tensors of a request (`role` "input") or response ("output"): each from shared
    memory where its parameters name a region, else from the raw contents `raw` when there are
    any (one per tensor not in shared memory, in order), else from its typed contents.

    With `max_bytes`, from the first string tensor on, the tensors are decoded under a `Budget`
    that holds the memory of those before it: a numeric tensor takes its wire size (it is a view
    of it), which the transport's limit has counted already, so a request without strings is
    never counted."""
    # Most tensors have no parameters: then no place, and no message to format.
    places = [
        shared_memory(t.parameters, f"{role} {t.name!r}") if t.parameters else None for t in tensors
    ]
    inline = [t for t, place in zip(tensors, places, strict=True) if place is None]
    if raw and len(raw) != len(inline):
        raise InvalidInput(
            f"raw_{role}_contents has {len(raw)} entries for {len(inline)} {role}s: give "
            f"one per {role} not in shared memory, in the order of `{role}s`"
        )
    arrays: dict[str, np.ndarray] = {}
    contents = iter(raw)
    budget = None
    for tensor, place in zip(tensors, places, strict=True):
        name, datatype = tensor.name, tensor.datatype
        if name in arrays:
            raise InvalidInput(f"{role} {name!r} is given twice")
        if budget is None and datatype == BYTES and max_bytes is not None:
            budget = Budget(max_bytes, sum([a.nbytes for a in arrays.values()]))
        if place is not None:
            array = _from_shared(tensor, place, role, shared, budget)
        elif raw:
            if tensor.HasField("contents"):
                raise InvalidInput(
                    f"{role} {name!r}: give raw_{role}_contents or typed contents, not both"
                )
            array = from_bytes(name, datatype, tensor.shape, next(contents), role, budget)
        else:
            array = _from_contents(tensor, role, budget)
        if budget is not None and datatype != BYTES:
            budget.take(f"{role} {name!r}", array.nbytes)
        arrays[name] = array
    return arrays


SharedPlace = tuple[str, int, int]
"""Where a tensor lies in the clients' shared memory: region, byte size, offset."""


def shared_memory(parameters: Mapping[str, Any], who: str) -> SharedPlace | None:
    """The shared-memory place that a tensor's parameters name (protobuf `InferParameter`s or
    JSON values), or None."""
    if "shared_memory_region" not in parameters:
        return None

    def value(key: str, kind: type, default: Any = None) -> Any:
        if key not in parameters:
            if default is None:
                raise InvalidInput(f"{who}: shared_memory_region needs {key} too")
            return default
        found = parameters[key]
        if isinstance(found, oip.InferParameter):
            found = getattr(found, found.WhichOneof("parameter_choice") or "string_param")
        if not isinstance(found, kind) or isinstance(found, bool):
            raise InvalidInput(f"{who}: parameter {key} must be a {kind.__name__}")
        return found

    return (
        value("shared_memory_region", str),
        value("shared_memory_byte_size", int),
        value("shared_memory_offset", int, 0),
    )


def _from_shared(
    tensor: _Tensor,
    place: SharedPlace,
    role: str,
    shared: SharedView | None,
    budget: Budget | None = None,
) -> np.ndarray:
    if shared is None:
        raise InvalidInput(f"{role} {tensor.name!r}: shared memory is not read here")
    if tensor.HasField("contents"):
        raise InvalidInput(
            f"{role} {tensor.name!r}: give shared_memory_region or contents, not both"
        )
    return from_shared(tensor.name, tensor.datatype, tensor.shape, place, shared, budget)


def from_shared(
    name: str,
    datatype: str,
    shape: Sequence[int],
    place: SharedPlace,
    shared: SharedView,
    budget: Budget | None = None,
) -> np.ndarray:
    """A read-only array over input `name`'s bytes in the clients' shared memory (no copy); a
    string tensor decoded from there under `budget`."""
    region, byte_size, offset = place
    if datatype == BYTES:  # its size is that of its elements: the contents say whether it fits
        view = shared(f"input {name!r}", region, byte_size, offset)
        return from_bytes(name, datatype, shape, view, budget=budget)
    expected = nbytes(name, datatype, shape)
    if byte_size != expected:
        raise InvalidInput(
            f"input {name!r}: shared_memory_byte_size is {byte_size}, but {datatype} "
            f"{list(shape)} needs {expected}"
        )
    view = shared(f"input {name!r}", region, byte_size, offset)
    return from_bytes(name, datatype, shape, view.toreadonly())


def _from_contents(tensor: _Tensor, role: str, budget: Budget | None = None) -> np.ndarray:
    name, datatype = tensor.name, tensor.datatype
    dtype = numpy_dtype(datatype, name, role)
    dims = _shape(tensor.shape, name, role)
    field = _CONTENTS_FIELD.get(datatype)
    if dtype is _STRINGS:
        who = f"{role} {name!r}"
        items = tensor.contents.bytes_contents
        if budget is not None:  # each element's size as it is made (protobuf holds the bytes)
            budget.take(who, len(items) * _POINTER, len(items))
            values = []
            for i, item in enumerate(items):
                values.append(_text(who, i, item))
                budget.take(who, sys.getsizeof(values[-1]), len(items))
        else:
            values = [_text(who, i, v) for i, v in enumerate(items)]
        return _from_values(who, dtype, dims, values, "contents.bytes_contents")
    if field is None:
        raise InvalidInput(
            f"{role} {name!r}: {datatype} tensors travel as raw_{role}_contents only"
        )
    # As a list, so numpy checks each value's range (from protobuf's container it wraps them).
    values = list(getattr(tensor.contents, field))
    return _from_values(f"{role} {name!r}", dtype, dims, values, f"contents.{field}")


def _from_values(
    who: str, dtype: np.dtype, dims: tuple[int, ...], values: Sequence[Any], source: str
) -> np.ndarray:
    """An array of the values of typed contents or JSON `data` (`source`), after checking their
    count against the shape; `who` names the tensor in messages."""
    count = math.prod(dims)
    if len(values) != count:
        raise InvalidInput(
            f"{who}: {source} holds {len(values)} values, but shape {list(dims)} needs {count}"
        )
    if dtype is _STRINGS:
        return _strings(values, dims)
    try:
        return np.array(values, dtype=dtype).reshape(dims)
    except OverflowError:
        raise InvalidInput(f"{who}: a value in {source} overflows {_NAMES[dtype]}") from None


def encode_infer_response(
    model_name: str,
    request_id: str,
    outputs: Mapping[str, np.ndarray],
    shared: Mapping[str, memoryview] | None = None,
) -> bytes:
    """A serialised `ModelInferResponse` carrying every output as raw contents (as Triton
    does), each copied once; an output with a place in `shared` (`shared_outputs`) is copied
    there instead, and its raw contents are empty."""
    shared = shared or {}
    response = oip.ModelInferResponse(model_name=model_name, id=request_id)
    blobs = []
    for name, array in outputs.items():
        response.outputs.add(name=name, datatype=datatype_of(array), shape=array.shape)
        if name in shared:
            write_shared(name, array, shared[name])
            blobs.append(memoryview(b""))
        else:
            blobs.append(raw_bytes(array))
    raw = protowire.bytes_field_parts(_RAW_OUTPUT_CONTENTS, blobs)
    return b"".join([response.SerializeToString(), *raw])


def shared_outputs(
    requested: Iterable[tuple[str, Mapping[str, Any]]], shared: SharedView | None
) -> dict[str, memoryview]:
    """Where the requested outputs (name, parameters) that name a shared-memory region go."""
    places = {}
    for name, parameters in requested:
        place = shared_memory(parameters, f"output {name!r}")
        if place is not None:
            if shared is None:
                raise InvalidInput(f"output {name!r}: shared memory is not written here")
            region, byte_size, offset = place
            places[name] = shared(f"output {name!r}", region, byte_size, offset)
    return places


PLACE_ALIGNMENT = 64
"""The alignment of an output written straight into a client's shared memory (`array_at`): what
ONNX Runtime's own allocations have."""


def array_at(place: memoryview, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray | None:
    """A writable array over the start of `place` (a client's shared memory), for a stage to
    write an output of this dtype and shape straight there, so that `write_shared` has nothing
    to copy; None when it does not fit, or its address is not aligned (`PLACE_ALIGNMENT`)."""
    if math.prod(shape) * dtype.itemsize > len(place):
        return None
    array = np.ndarray(shape, dtype, place)
    return array if array.ctypes.data % PLACE_ALIGNMENT == 0 else None


def write_shared(name: str, array: np.ndarray, place: memoryview) -> None:
    """Copy output `name` into its place in the clients' shared memory (nothing to copy when a
    stage wrote it there, `array_at`)."""
    data = raw_bytes(array)
    if len(data) > len(place):
        raise InvalidInput(
            f"output {name!r}: its {len(data)} bytes do not fit the {len(place)} of "
            "shared_memory_byte_size"
        )
    if len(data) and np.frombuffer(data, np.uint8).ctypes.data == _address(place):
        return
    place[: len(data)] = data


def _address(view: memoryview) -> int:
    return np.frombuffer(view, np.uint8).ctypes.data if len(view) else 0


# ----------------------------------------------------------------- OIP HTTP/JSON
def decode_json_inputs(
    body: Mapping[str, Any],
    binary: bytes | memoryview = b"",
    shared: SharedView | None = None,
    max_bytes: int | None = None,
) -> tuple[dict[str, np.ndarray], list[str] | None, bool, dict[str, memoryview]]:
    """Inputs, requested output names, whether binary outputs are wanted, and where outputs go
    in the clients' shared memory (`shared_outputs`), from a JSON body.

    `binary` holds the bytes that followed the JSON header under the binary-data extension
    (`Inference-Header-Content-Length`); inputs whose parameters give `binary_data_size` take
    their contents from it, in order; inputs whose parameters name a `shared_memory_region`,
    from there (read through `shared`). With `max_bytes`, a request whose tensors would take
    more memory decoded is refused, as in `_decode_tensors` (strings in `data` once parsed, the
    JSON parser having made them, but before their array).
    """
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("request body needs a non-empty 'inputs' list")
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    budget = None
    for i, entry in enumerate(inputs):
        if not isinstance(entry, dict):
            raise InvalidInput(f"inputs[{i}] must be an object with name, shape, datatype, data")
        name = entry.get("name")
        datatype = entry.get("datatype")
        shape = entry.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise InvalidInput(f"inputs[{i}] needs string 'name' and 'datatype'")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in shape
        ):
            raise InvalidInput(f"input {name!r}: 'shape' must be a list of integers")
        if name in arrays:
            raise InvalidInput(f"input {name!r} is given twice")
        if budget is None and datatype == BYTES and max_bytes is not None:
            budget = Budget(max_bytes, sum([a.nbytes for a in arrays.values()]))
        parameters = _parameters(entry, f"input {name!r}")
        size = parameters.get("binary_data_size")
        place = shared_memory(parameters, f"input {name!r}")
        if place is not None:
            if shared is None:
                raise InvalidInput(f"input {name!r}: shared memory is not read here")
            if "data" in entry or size is not None:
                raise InvalidInput(
                    f"input {name!r}: give shared_memory_region, 'data' or binary_data_size, "
                    "only one"
                )
            array = from_shared(name, datatype, shape, place, shared, budget)
        elif size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidInput(
                    f"input {name!r}: binary_data_size must be a non-negative integer (the "
                    f"tensor's bytes after the JSON header), not {_show(size)}"
                )
            if "data" in entry:
                raise InvalidInput(
                    f"input {name!r}: give 'data' or parameters.binary_data_size, not both"
                )
            if offset + size > len(binary):
                raise InvalidInput(
                    f"input {name!r}: binary_data_size {size} runs past the {len(binary)} bytes "
                    "of binary data after the JSON header"
                )
            array = from_bytes(name, datatype, shape, binary[offset : offset + size], budget=budget)
            offset += size
        else:
            array = _from_json_data(name, datatype, shape, entry.get("data"), budget)
        if budget is not None and datatype != BYTES:
            budget.take(f"input {name!r}", array.nbytes)
        arrays[name] = array
    if offset != len(binary):
        raise InvalidInput(
            f"{len(binary) - offset} bytes of binary data after the JSON header belong to no input"
        )
    requested = body.get("outputs")
    names = None
    places: dict[str, memoryview] = {}
    binary_out = _flag(_parameters(body, "the request"), "binary_data_output", "the request")
    if requested is not None:
        if not isinstance(requested, list) or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str) for o in requested
        ):
            raise InvalidInput("'outputs' must be a list of objects with a 'name'")
        names = [o["name"] for o in requested]
        for o in requested:
            where = f"output {o['name']!r}"
            binary_out = _flag(_parameters(o, where), "binary_data", where) or binary_out
        places = shared_outputs(((o["name"], _parameters(o, "")) for o in requested), shared)
    return arrays, names, binary_out, places


def _show(value: Any) -> str:
    """A JSON value as the client wrote it, cut short for a one-line message."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _parameters(entry: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    """The `parameters` object of the body, an input or an output ({} when absent)."""
    parameters = entry.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise InvalidInput(f"{where}: 'parameters' must be a JSON object, not {_show(parameters)}")
    return parameters


def _flag(parameters: Mapping[str, Any], key: str, where: str) -> bool:
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise InvalidInput(f"{where}: parameter {key!r} must be true or false, not {_show(value)}")
    return value


def _json_kind(datatype: str) -> tuple[str, Callable[[Any], bool]]:
    """What JSON values a datatype takes, in words, and a test for them: numpy would parse
    strings, take null as NaN and true as 1; bool being an int, it is refused for numbers."""
    if datatype == "BOOL":
        return "true or false", lambda v: isinstance(v, bool)
    if datatype == BYTES:
        return "strings", lambda v: isinstance(v, str)
    if datatype.startswith("FP"):
        return "JSON numbers", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    return "JSON integers", lambda v: isinstance(v, int) and not isinstance(v, bool)


def _flatten(data: list[Any]) -> list[Any]:
    """The values of `data` in row-major order: OIP allows it flat or nested by the shape."""
    values: list[Any] = []
    stack = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            values.append(value)
        else:
            stack.pop()
    return values


def _from_json_data(
    name: str, datatype: str, shape: list[int], data: Any, budget: Budget | None = None
) -> np.ndarray:
    dtype = numpy_dtype(datatype, name)
    dims = _shape(shape, name)
    if not isinstance(data, list):
        raise InvalidInput(f"input {name!r}: 'data' must be a list of values")
    values = _flatten(data)
    kind, accepts = _json_kind(datatype)
    for value in values:
        if not accepts(value):
            raise InvalidInput(
                f"input {name!r}: 'data' holds {_show(value)}, but {datatype} 'data' must be {kind}"
            )
    if budget is not None and dtype is _STRINGS:
        budget.take(f"input {name!r}", len(values) * _POINTER + _sizes(values), len(values))
    return _from_values(f"input {name!r}", dtype, dims, values, "'data'")


def encode_json_outputs(
    model_name: str,
    request_id: str,
    outputs: Mapping[str, np.ndarray],
    binary: bool,
    shared: Mapping[str, memoryview] | None = None,
) -> tuple[dict[str, Any], list[memoryview]]:
    """The JSON response body and, for the binary-data extension, the bytes to append; an
    output with a place in `shared` is copied there, and its entry carries no data."""
    entries = []
    blobs: list[memoryview] = []
    for name, array in outputs.items():
        entry: dict[str, Any] = {
            "name": name,
            "datatype": datatype_of(array),
            "shape": list(array.shape),
        }
        if shared and name in shared:
            write_shared(name, array, shared[name])
        elif binary:
            blob = raw_bytes(array)  # copied once, into the response
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.ravel().tolist()
        entries.append(entry)
    body: dict[str, Any] = {"model_name": model_name, "outputs": entries}
    if request_id:
        body["id"] = request_id
    return body, blobs


def encode_infer_request(
    model_name: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] = ()
) -> bytes:
    """A serialised `ModelInferRequest` with raw contents (the client side)."""
    request = oip.ModelInferRequest(model_name=model_name)
    for name, array in inputs.items():
        request.inputs.add(name=name, datatype=datatype_of(array), shape=array.shape)
    for name in outputs:
        request.outputs.add(name=name)
    raw = protowire.bytes_field_parts(_RAW_INPUT_CONTENTS, [raw_bytes(a) for a in inputs.values()])
    return b"".join([request.SerializeToString(), *raw])


def decode_infer_response(payload: bytes) -> dict[str, np.ndarray]:
    """The output tensors of a serialised `ModelInferResponse`: views into `payload` for raw
    contents (as the gateway sends), copies for typed contents (as other OIP servers may)."""
    message, raw = protowire.split_bytes_field(payload, _RAW_OUTPUT_CONTENTS)
    try:
        response = oip.ModelInferResponse.FromString(message)
    except Exception as e:  # protobuf's DecodeError and friends
        raise InvalidInput(f"malformed ModelInferResponse: {e}") from None
    return _decode_tensors(response.outputs, raw, "output")
