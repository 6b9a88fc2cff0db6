"""One codec for every tensor that crosses a wire.

Tensors are numpy arrays inside Moirai and travel as raw bytes + datatype + shape outside it. The
datatype names are the Open Inference Protocol's (`FP32`, `INT64`, ...), used everywhere: in the
stage plan, on the internal chain (`moirai.stage.v1.Tensor`) and at the gateway, so there is one
table of types. This module converts between numpy and each of the wire forms:

- the chain's `Tensor` message (raw bytes; framed without protobuf copies by `stage_server.wire`);
- the OIP gRPC `ModelInferRequest`/`ModelInferResponse` (raw contents or typed contents; raw
  contents framed by `stage_server.protowire`, so a large tensor is copied once, not four times);
- the OIP HTTP/JSON body (`data` lists) and its binary-data extension (raw bytes after the JSON).

Every malformed tensor raises `InvalidInput` with a message naming the tensor and what was
expected, so the transports never see a numpy or protobuf exception.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from stage_server import protowire
from stage_server.errors import InvalidInput
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
_NAMES = {dtype: name for name, dtype in DTYPES.items()}

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
        raise InvalidInput(f"tensor dtype {array.dtype} is not supported") from None


def numpy_dtype(datatype: str, name: str) -> np.dtype:
    try:
        return DTYPES[datatype]
    except KeyError:
        raise InvalidInput(
            f"input {name!r}: datatype {datatype!r} is not supported; use one of "
            f"{', '.join(DTYPES)}"
        ) from None


def _shape(shape: Sequence[int], name: str) -> tuple[int, ...]:
    dims = tuple(int(d) for d in shape)
    if any(d < 0 for d in dims):
        raise InvalidInput(f"input {name!r}: shape {list(dims)} has a negative dimension")
    return dims


def nbytes(name: str, datatype: str, shape: Sequence[int]) -> int:
    """The size in bytes of a tensor of this datatype and shape."""
    return math.prod(_shape(shape, name)) * numpy_dtype(datatype, name).itemsize


def from_bytes(
    name: str, datatype: str, shape: Sequence[int], data: bytes | memoryview | np.ndarray
) -> np.ndarray:
    """A read-only array over `data` (no copy), after checking its size against the shape."""
    dtype = numpy_dtype(datatype, name)
    dims = _shape(shape, name)
    expected = math.prod(dims) * dtype.itemsize
    if len(data) != expected:
        raise InvalidInput(
            f"input {name!r}: raw contents hold {len(data)} bytes, but {datatype} {list(dims)} "
            f"needs {expected}"
        )
    array = np.frombuffer(data, dtype=dtype).reshape(dims)
    if datatype == "BOOL" and len(data) and np.frombuffer(data, np.uint8).max() > 1:
        raise InvalidInput(f"input {name!r}: BOOL raw contents must be bytes 0 or 1")
    return array


def to_bytes(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array).tobytes()


def raw_bytes(array: np.ndarray) -> memoryview:
    """The array's bytes as a view, without a copy (one when it is not C-contiguous)."""
    return memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


# ----------------------------------------------------------- OIP gRPC (KServe v2)
# Field numbers of the raw contents in grpc_predict_v2.proto.
_RAW_INPUT_CONTENTS = 7
_RAW_OUTPUT_CONTENTS = 6


def decode_infer_request(payload: bytes) -> tuple[oip.ModelInferRequest, dict[str, np.ndarray]]:
    """A serialised `ModelInferRequest` (without its raw contents) and its input tensors, from
    raw contents (views into `payload`, no copy) or typed contents."""
    message, raw = protowire.split_bytes_field(payload, _RAW_INPUT_CONTENTS)
    try:
        request = oip.ModelInferRequest.FromString(message)
    except Exception as e:  # protobuf's DecodeError and friends
        raise InvalidInput(f"malformed ModelInferRequest: {e}") from None
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs: give "
            "one per input, in the order of `inputs`"
        )
    arrays: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name in arrays:
            raise InvalidInput(f"input {tensor.name!r} is given twice")
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInput(
                    f"input {tensor.name!r}: give raw_input_contents or typed contents, not both"
                )
            arrays[tensor.name] = from_bytes(tensor.name, tensor.datatype, tensor.shape, raw[i])
        else:
            arrays[tensor.name] = _from_contents(tensor)
    return request, arrays


def _from_contents(tensor: oip.ModelInferRequest.InferInputTensor) -> np.ndarray:
    name, datatype = tensor.name, tensor.datatype
    dtype = numpy_dtype(datatype, name)
    dims = _shape(tensor.shape, name)
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidInput(f"input {name!r}: {datatype} tensors travel as raw_input_contents only")
    values = getattr(tensor.contents, field)
    count = int(np.prod(dims, dtype=np.int64))
    if len(values) != count:
        raise InvalidInput(
            f"input {name!r}: contents.{field} holds {len(values)} values, but shape "
            f"{list(dims)} needs {count}"
        )
    try:
        return np.array(values, dtype=dtype).reshape(dims)
    except OverflowError:
        raise InvalidInput(
            f"input {name!r}: a value in contents.{field} overflows {datatype}"
        ) from None


def encode_infer_response(
    model_name: str, request_id: str, outputs: Mapping[str, np.ndarray]
) -> bytes:
    """A serialised `ModelInferResponse` carrying every output as raw contents (as Triton
    does), each copied once."""
    response = oip.ModelInferResponse(model_name=model_name, id=request_id)
    for name, array in outputs.items():
        response.outputs.add(name=name, datatype=datatype_of(array), shape=array.shape)
    raw = protowire.bytes_field_parts(
        _RAW_OUTPUT_CONTENTS, [raw_bytes(a) for a in outputs.values()]
    )
    return b"".join([response.SerializeToString(), *raw])


# ----------------------------------------------------------------- OIP HTTP/JSON
def decode_json_inputs(
    body: Mapping[str, Any], binary: bytes = b""
) -> tuple[dict[str, np.ndarray], list[str] | None, bool]:
    """Inputs, requested output names and whether binary outputs are wanted, from a JSON body.

    `binary` holds the bytes that followed the JSON header under the binary-data extension
    (`Inference-Header-Content-Length`); inputs whose parameters give `binary_data_size` take
    their contents from it, in order.
    """
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("request body needs a non-empty 'inputs' list")
    arrays: dict[str, np.ndarray] = {}
    offset = 0
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
        size = (entry.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise InvalidInput(
                    f"input {name!r}: binary_data_size {size} runs past the {len(binary)} bytes "
                    "of binary data after the JSON header"
                )
            arrays[name] = from_bytes(name, datatype, shape, binary[offset : offset + size])
            offset += size
        else:
            arrays[name] = _from_json_data(name, datatype, shape, entry.get("data"))
    if offset != len(binary):
        raise InvalidInput(
            f"{len(binary) - offset} bytes of binary data after the JSON header belong to no input"
        )
    requested = body.get("outputs")
    names = None
    binary_out = bool((body.get("parameters") or {}).get("binary_data_output", False))
    if requested is not None:
        if not isinstance(requested, list) or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str) for o in requested
        ):
            raise InvalidInput("'outputs' must be a list of objects with a 'name'")
        names = [o["name"] for o in requested]
        binary_out = binary_out or any(
            (o.get("parameters") or {}).get("binary_data", False) for o in requested
        )
    return arrays, names, binary_out


def _from_json_data(name: str, datatype: str, shape: list[int], data: Any) -> np.ndarray:
    dtype = numpy_dtype(datatype, name)
    dims = _shape(shape, name)
    if not isinstance(data, list):
        raise InvalidInput(f"input {name!r}: 'data' must be a list of values")
    try:
        array = np.array(data, dtype=dtype)
    except (ValueError, TypeError, OverflowError):
        raise InvalidInput(f"input {name!r}: 'data' does not hold {datatype} values") from None
    count = int(np.prod(dims, dtype=np.int64))
    if array.size != count:
        raise InvalidInput(
            f"input {name!r}: 'data' holds {array.size} values, but shape {list(dims)} needs "
            f"{count}"
        )
    return array.reshape(dims)


def encode_json_outputs(
    model_name: str, request_id: str, outputs: Mapping[str, np.ndarray], binary: bool
) -> tuple[dict[str, Any], list[bytes]]:
    """The JSON response body and, for the binary-data extension, the bytes to append."""
    entries = []
    blobs: list[bytes] = []
    for name, array in outputs.items():
        entry: dict[str, Any] = {
            "name": name,
            "datatype": datatype_of(array),
            "shape": list(array.shape),
        }
        if binary:
            blob = to_bytes(array)
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
    """The output tensors of a serialised `ModelInferResponse` (raw contents, as the gateway
    sends), as views into `payload`."""
    message, raw = protowire.split_bytes_field(payload, _RAW_OUTPUT_CONTENTS)
    response = oip.ModelInferResponse.FromString(message)
    return {
        t.name: from_bytes(t.name, t.datatype, t.shape, data)
        for t, data in zip(response.outputs, raw, strict=True)
    }
