"""String tensors (ONNX `tensor(string)`, OIP `BYTES`) in the codec: one serialisation, each
element a 4-byte little-endian length then its bytes (Triton's and KServe's binary form, checked
against tritonclient's own serialiser), in every wire form: gRPC raw and typed contents, JSON
`data`, the binary-data extension, clients' shared memory and the chain's pushes. Bad contents
are refused in one line naming the tensor. Their memory decoded (Python objects, several times the
wire size) is what `memory_bytes` counts, and what a request's limit counts as they are decoded."""

from __future__ import annotations

import struct
import sys
import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from stage_server import codec, wire
from stage_server.errors import InvalidInput, TooLarge
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


TEXTS = {  # each kind of Python str (1, 2 or 4 bytes a character), short and long
    "ascii": ["ab", "xyz" * 100],
    "latin-1": ["é!", "ï" * 300],
    "ucs-2": ["ā!", "a" * 299 + "ā"],
    "ucs-4": ["😀!", "a" * 299 + "😀"],
}


def _traced(make: Callable[[], object]) -> tuple[object, int, int]:
    """What `make` returns, the memory it still holds after (tracemalloc) and its peak."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        made = make()
        now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return made, now - before, peak - before


@pytest.mark.parametrize("kind", TEXTS)
def test_memory_bytes_is_what_a_decoded_string_tensor_holds(kind: str) -> None:
    """Counted as tracemalloc counts (the array's own header aside), where `nbytes` sees the
    pointers alone: for words of two letters, 6 bytes on the wire, 8 by `nbytes`, 59 held."""
    words = np.array(TEXTS[kind] * 5000, dtype=object)
    raw = codec.encode_strings(words)
    array, held, _ = _traced(lambda: codec.decode_strings("t", words.shape, raw))
    counted = codec.memory_bytes(array)  # type: ignore[arg-type]
    assert counted == array.nbytes + sum(map(sys.getsizeof, words))  # type: ignore[attr-defined]
    assert held - 256 <= counted <= held + 256
    assert counted <= codec.strings_bound(len(words), len(raw))  # known before decoding
    assert counted > 5 * array.nbytes  # type: ignore[attr-defined]
    if kind == "ascii":
        short = np.array(["ab"] * 1000, dtype=object)
        assert codec.memory_bytes(short) > 7 * len(codec.encode_strings(short))
    numbers = np.ones((3, 4), np.float32)
    assert codec.memory_bytes(numbers) == numbers.nbytes == 48


WORDS = np.array([["ab"]] * 100_000, dtype=object)  # 600 KB on the wire, 5.9 MB decoded
AGE = np.ones((100_000, 1), np.float32)


def _decoders() -> dict[str, Callable[[int], dict[str, np.ndarray]]]:
    """The request (`AGE`, then `WORDS`) in each wire form, decoded under a limit."""
    blob = codec.encode_strings(WORDS)
    raw = codec.encode_infer_request("m", {"age": AGE, "city": WORDS})
    typed = oip.ModelInferRequest(model_name="m")
    t = typed.inputs.add(name="age", datatype="FP32", shape=AGE.shape)
    t.contents.fp32_contents.extend(AGE.ravel().tolist())
    t = typed.inputs.add(name="city", datatype="BYTES", shape=WORDS.shape)
    t.contents.bytes_contents.extend(s.encode() for s in WORDS.ravel())
    typed_payload = typed.SerializeToString()
    age = {"name": "age", "datatype": "FP32", "shape": list(AGE.shape), "data": [1.0] * len(AGE)}
    city = {"name": "city", "datatype": "BYTES", "shape": list(WORDS.shape)}
    data = {"inputs": [age, {**city, "data": WORDS.ravel().tolist()}]}
    binary = {"inputs": [age, {**city, "parameters": {"binary_data_size": len(blob)}}]}
    shared_body = {"inputs": [age, {**city, "parameters": {
        "shared_memory_region": "r", "shared_memory_byte_size": len(blob)}}]}  # fmt: skip
    region = memoryview(blob)

    def shared(who: str, name: str, size: int, offset: int) -> memoryview:
        return region[offset : offset + size]

    return {
        "raw": lambda limit: codec.decode_infer_request(raw, None, limit)[1],
        "typed": lambda limit: codec.decode_infer_request(typed_payload, None, limit)[1],
        "json-data": lambda limit: codec.decode_json_inputs(data, max_bytes=limit)[0],
        "binary-data": lambda limit: codec.decode_json_inputs(binary, blob, max_bytes=limit)[0],
        "shared-memory": lambda limit: codec.decode_json_inputs(shared_body, b"", shared, limit)[0],
    }


@pytest.mark.parametrize("form", ["raw", "typed", "json-data", "binary-data", "shared-memory"])
def test_a_request_whose_strings_pass_the_limit_decoded_is_refused(form: str) -> None:
    """The limit counts the request's tensors as they take memory decoded: a request that fits
    to the byte is decoded; one byte less, and it is refused in one line naming the tensor and
    the limit (RESOURCE_EXHAUSTED / 413), while its strings are being decoded: far from decoded
    whole (raw contents, the binary-data extension and shared memory hold the wire form only)."""
    decode = _decoders()[form]
    exact = AGE.nbytes + codec.memory_bytes(WORDS)
    inputs = decode(exact)
    assert inputs["city"].tolist() == WORDS.tolist()
    assert codec.memory_bytes(inputs["city"]) == codec.memory_bytes(WORDS)
    limit = 1 << 20
    with pytest.raises(TooLarge) as e:
        decode(limit)
    assert str(e.value) == (
        "input 'city': decoded, the request would take over the 1048576 bytes allowed "
        "(--max-request-bytes): its 100000 strings are Python objects, several times their "
        "wire size"
    )
    with pytest.raises(TooLarge, match=f"over the {exact - 1} bytes allowed"):
        decode(exact - 1)
    if form in ("raw", "binary-data", "shared-memory"):

        def refused() -> None:
            with pytest.raises(TooLarge):
                decode(limit)

        _, _, peak = _traced(refused)
        assert peak < limit + 2 * len(codec.encode_strings(WORDS)) < exact / 2, peak


def test_a_tensor_after_the_strings_counts_too_and_numbers_alone_are_not_counted() -> None:
    payload = codec.encode_infer_request("m", {"city": WORDS, "age": AGE})
    exact = AGE.nbytes + codec.memory_bytes(WORDS)
    assert codec.decode_infer_request(payload, None, exact)[1]["age"].shape == AGE.shape
    with pytest.raises(TooLarge, match=r"^input 'age': decoded, the request would take over"):
        codec.decode_infer_request(payload, None, exact - 1)
    # Numeric tensors are views of the request, which the transport's limit has counted.
    numbers = codec.encode_infer_request("m", {"age": AGE})
    assert codec.decode_infer_request(numbers, None, 1)[1]["age"].shape == AGE.shape
