"""String tensors (ONNX `tensor(string)`, OIP `BYTES`) in the codec: one serialisation, each
element a 4-byte little-endian length then its bytes (Triton's and KServe's binary form, checked
against tritonclient's own serialiser), in every wire form: gRPC raw and typed contents, JSON
`data`, the binary-data extension, clients' shared memory and the chain's pushes. Bad contents
are refused in one line naming the tensor."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from stage_server import codec, wire
from stage_server.errors import InvalidInput
from stage_server.protos import grpc_predict_v2_pb2 as oip
from stage_server.protos import stage_pb2

CITIES = np.array([["a", ""], ["ünïcödé", "x" * 300]], dtype=object)


def test_the_wire_form_is_tritonclient_s() -> None:
    """The same bytes as tritonclient's serialiser writes, and read back as text by ours and as
    bytes by its deserialiser."""
    ours = bytes(codec.raw_bytes(CITIES))
    assert ours == serialize_byte_tensor(CITIES).item()
    assert ours[:5] == struct.pack("<I", 1) + b"a"
    back = codec.from_bytes("city", "BYTES", [2, 2], ours)
    assert back.dtype == object and back.shape == (2, 2)
    assert back.tolist() == CITIES.tolist()
    assert deserialize_bytes_tensor(ours).tolist() == [s.encode() for s in CITIES.ravel()]


def test_numpy_string_arrays_are_bytes_too() -> None:
    for array in (CITIES.astype(str), np.array([b"a", b"bc"]), np.array([b"a"], dtype=object)):
        assert codec.datatype_of(array) == "BYTES"
        decoded = codec.from_bytes("t", "BYTES", array.shape, codec.raw_bytes(array))
        want = [v.decode() if isinstance(v, bytes) else v for v in array.ravel().tolist()]
        assert decoded.ravel().tolist() == want
    assert codec.numpy_dtype("BYTES", "t") == np.dtype(object)
    assert "BYTES" in codec.DATATYPES and "BYTES" not in codec.DTYPES  # not of fixed size


def test_an_empty_string_tensor() -> None:
    empty = np.empty((0, 1), dtype=object)
    assert bytes(codec.raw_bytes(empty)) == b""
    assert codec.from_bytes("t", "BYTES", [0, 1], b"").shape == (0, 1)


@pytest.mark.parametrize(
    ("data", "shape", "needle"),
    [
        (struct.pack("<I", 10) + b"abc", [1], "length prefix of BYTES element 0 (10) runs past"),
        (struct.pack("<I", 1) + b"a" + b"\x01\x00", [2], "hold 1 elements in 7 bytes"),
        (struct.pack("<I", 1) + b"a" + b"zz", [1], "2 bytes follow the 1 BYTES elements"),
        (struct.pack("<I", 2) + b"\xff\xfe", [1], "BYTES element 0 is not UTF-8"),
    ],
)
def test_bad_bytes_contents_name_the_tensor(data: bytes, shape: list[int], needle: str) -> None:
    with pytest.raises(InvalidInput, match=r"input 'city'") as e:
        codec.from_bytes("city", "BYTES", shape, data)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_grpc_raw_and_typed_contents() -> None:
    payload = codec.encode_infer_request("m", {"city": CITIES})
    request, inputs = codec.decode_infer_request(payload)
    assert request.inputs[0].datatype == "BYTES"
    assert inputs["city"].tolist() == CITIES.tolist()

    typed = oip.ModelInferRequest(model_name="m")
    t = typed.inputs.add(name="city", datatype="BYTES", shape=[2, 2])
    t.contents.bytes_contents.extend(s.encode() for s in CITIES.ravel())
    _, inputs = codec.decode_infer_request(typed.SerializeToString())
    assert inputs["city"].tolist() == CITIES.tolist()

    t.contents.bytes_contents.append(b"one too many")
    with pytest.raises(InvalidInput, match=r"input 'city': contents.bytes_contents holds 5"):
        codec.decode_infer_request(typed.SerializeToString())

    response = codec.encode_infer_response("m", "r", {"upper": CITIES, "n": np.arange(3)})
    outputs = codec.decode_infer_response(response)
    assert outputs["upper"].tolist() == CITIES.tolist()
    np.testing.assert_array_equal(outputs["n"], np.arange(3))


def test_json_data_holds_strings_and_binary_data_is_length_prefixed() -> None:
    body = {"inputs": [{"name": "city", "datatype": "BYTES", "shape": [2, 2],
                        "data": [["a", ""], ["ünïcödé", "x" * 300]]}]}  # fmt: skip
    inputs, *_ = codec.decode_json_inputs(body)
    assert inputs["city"].tolist() == CITIES.tolist()

    blob = serialize_byte_tensor(CITIES).item()
    body = {"inputs": [{"name": "city", "datatype": "BYTES", "shape": [2, 2],
                        "parameters": {"binary_data_size": len(blob)}}]}  # fmt: skip
    inputs, *_ = codec.decode_json_inputs(body, blob)
    assert inputs["city"].tolist() == CITIES.tolist()

    entries, blobs = codec.encode_json_outputs("m", "", {"upper": CITIES}, binary=False)
    assert entries["outputs"][0] == {
        "name": "upper", "datatype": "BYTES", "shape": [2, 2], "data": CITIES.ravel().tolist()
    }  # fmt: skip
    entries, blobs = codec.encode_json_outputs("m", "", {"upper": CITIES}, binary=True)
    assert bytes(blobs[0]) == blob
    assert entries["outputs"][0]["parameters"] == {"binary_data_size": len(blob)}


@pytest.mark.parametrize("value", [1, None, True, ["a"]])
def test_json_data_of_a_non_string_is_refused(value: object) -> None:
    data = ["a", value] if value != ["a"] else [["a"], value, "b"]
    body = {"inputs": [{"name": "city", "datatype": "BYTES", "shape": [2], "data": data}]}
    with pytest.raises(InvalidInput, match=r"input 'city': 'data' .*must be strings|holds 3"):
        codec.decode_json_inputs(body)


def test_clients_shared_memory_holds_the_wire_form() -> None:
    blob = bytearray(serialize_byte_tensor(CITIES).item() + b"\0" * 8)
    region = memoryview(blob)

    def shared(who: str, name: str, size: int, offset: int) -> memoryview:
        return region[offset : offset + size]

    size = len(blob) - 8
    array = codec.from_shared("city", "BYTES", [2, 2], ("r", size, 0), shared)
    assert array.tolist() == CITIES.tolist()
    with pytest.raises(InvalidInput, match="input 'city': 8 bytes follow"):
        codec.from_shared("city", "BYTES", [2, 2], ("r", len(blob), 0), shared)
    out = memoryview(bytearray(size))
    codec.write_shared("upper", CITIES, out)
    assert bytes(out) == bytes(blob[:size])


def test_a_push_carries_strings_inline() -> None:
    tensors = {"upper": CITIES, "x": np.ones((2, 3), np.float32)}
    push = wire.decode_push(wire.encode_push("r", "s1", tensors, 1e12, 5.0))
    assert push.tensors["upper"].tolist() == CITIES.tolist()
    np.testing.assert_array_equal(push.tensors["x"], tensors["x"])
    # A push that claims a string tensor lies in shared memory is refused, not read.
    meta_only = wire.encode_push(
        "r", "s1", {"upper": CITIES}, 1e12, 5.0, shared={"upper": stage_pb2.SharedMemory()}
    )
    with pytest.raises(InvalidInput, match="tensor 'upper': BYTES tensors have no size"):
        wire.decode_push(meta_only, mappings=object())  # type: ignore[arg-type]


def test_a_non_string_in_a_bytes_array_is_refused() -> None:
    with pytest.raises(InvalidInput, match=r"holds 3 \(int\): its elements must be strings"):
        codec.raw_bytes(np.array(["a", 3], dtype=object))
