"""moirai.weights: a loaded model is its graph, its weights referenced where they lie."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from moirai.errors import ModelError
from moirai.graph import build_graph, load_model
from moirai.partition import build_plan
from moirai.stagecut import extract_stage
from moirai.stageplan import DeviceSpec
from moirai.weights import (
    FOLDER_KEY,
    PROTOBUF_LIMIT,
    external_files,
    folder_of,
    model_digest,
    ort_session,
    read_skeleton,
)

from .onnx_patterns import init, model, tensor


def _chain(size: int = 64) -> onnx.ModelProto:
    """x(1,size) → MatMul w0 → Relu → MatMul w1 → Reshape(shape constant) → y(size)."""
    return model(
        [
            helper.make_node("MatMul", ["x", "w0"], ["h0"]),
            helper.make_node("Relu", ["h0"], ["r0"]),
            helper.make_node("MatMul", ["r0", "w1"], ["h1"]),
            helper.make_node("Reshape", ["h1", "shape"], ["y"]),
        ],
        [tensor("x", [1, size])],
        [tensor("y", [size])],
        [
            init("w0", [size, size]),
            init("w1", [size, size]),
            numpy_helper.from_array(np.array([size], np.int64), "shape"),
        ],
    )


def _reference(m: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """ONNX Runtime on the model as built, every weight in memory."""
    session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _copy(m: onnx.ModelProto) -> onnx.ModelProto:
    """onnx.save with external data moves the weights out of the proto it is given."""
    return onnx.ModelProto.FromString(m.SerializeToString())


def _location(t: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _run(m: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort_session(m, ort.SessionOptions(), ["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_embedded_weights_become_references_into_the_model_file(tmp_path: Path) -> None:
    original = _chain()
    path = tmp_path / "m.onnx"
    onnx.save(original, path)
    skeleton = read_skeleton(path)
    assert skeleton.ByteSize() < 2048 < path.stat().st_size
    assert folder_of(skeleton) == str(tmp_path.resolve())
    raw = path.read_bytes()
    for tensor_proto in original.graph.initializer:
        kept = next(t for t in skeleton.graph.initializer if t.name == tensor_proto.name)
        if tensor_proto.name == "shape":  # 8 bytes: stays in the model
            assert kept.raw_data == tensor_proto.raw_data
            continue
        where = _location(kept)
        assert where["location"] == "m.onnx"
        start, length = int(where["offset"]), int(where["length"])
        assert raw[start : start + length] == tensor_proto.raw_data
    x = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
    np.testing.assert_allclose(_run(skeleton, x), _reference(original, x), rtol=1e-4, atol=1e-4)


def test_external_data_stays_in_its_file_and_small_tensors_are_read_in(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    original = _chain()
    saved = _copy(original)
    onnx.save(saved, path, save_as_external_data=True, location="m.data", size_threshold=0)
    loaded = load_model(path)
    by_name = {t.name: t for t in loaded.graph.initializer}
    assert _location(by_name["w0"])["location"] == "m.data"
    assert not by_name["shape"].external_data  # read in: shape inference sees the constant
    assert [d.dim_value for d in loaded.graph.output[0].type.tensor_type.shape.dim] == [64]
    assert external_files(loaded, path) == ["m.data"]
    assert build_graph(loaded).weight_bytes(["MatMul_0"]) == 64 * 64 * 4
    x = np.ones((1, 64), np.float32)
    np.testing.assert_allclose(_run(loaded, x), _reference(original, x), rtol=1e-4, atol=1e-4)


def test_a_stage_references_only_its_own_weights(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    original = _chain()
    onnx.save(_copy(original), path, save_as_external_data=True, location="m.data")
    loaded = load_model(path)
    names = [n.name for n in loaded.graph.node]
    plan = build_plan(
        loaded,
        {n: "a" if i < 2 else "b" for i, n in enumerate(names)},
        [DeviceSpec("a"), DeviceSpec("b")],
    )
    first, second = (extract_stage(loaded, plan, s.id) for s in plan.stages)
    assert [t.name for t in first.graph.initializer] == ["w0"]
    assert {t.name for t in second.graph.initializer} == {"w1", "shape"}
    assert folder_of(second) == folder_of(loaded)
    offsets = {_location(t)["offset"] for s in (first, second) for t in s.graph.initializer[:1]}
    assert len(offsets) == 2  # each references its own bytes of the one file
    x = np.ones((1, 64), np.float32)
    hidden = _run(first, x)
    second_session = ort_session(second, ort.SessionOptions(), ["CPUExecutionProvider"])
    got = second_session.run(None, {plan.stages[1].inputs[0]: hidden})[0]
    np.testing.assert_allclose(got, _reference(original, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("location", ["../outside.data", "/etc/passwd", "sub/../../x.data"])
def test_locations_that_leave_the_folder_are_refused(tmp_path: Path, location: str) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_chain(), path, save_as_external_data=True, location="m.data")
    m = onnx.load(path, load_external_data=False)
    for t in m.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(m, path)
    with pytest.raises(ModelError, match="relative paths inside the model's folder") as e:
        read_skeleton(path)
    assert "\n" not in str(e.value)


def test_a_single_file_over_the_protobuf_limit_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "huge.onnx"
    with path.open("wb") as f:  # sparse: no disk used, nothing read
        f.truncate(PROTOBUF_LIMIT + 1)
    with pytest.raises(ModelError, match=r"over protobuf.s 2 GiB limit.*external data") as e:
        load_model(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("content", [b"", b"\x0a\xff\xff\xff\xff\x0f", b"\x07garbage"])
def test_corrupt_files_are_one_line(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=r"bad\.onnx") as e:
        read_skeleton(path)
    assert "\n" not in str(e.value)


def test_the_folder_is_only_metadata(tmp_path: Path) -> None:
    """A model built in memory has no folder: its sessions are ONNX Runtime's as ever."""
    m = _chain()
    assert folder_of(m) is None
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    assert FOLDER_KEY in {p.key for p in read_skeleton(path).metadata_props}
    x = np.ones((1, 64), np.float32)
    np.testing.assert_array_equal(_run(m, x), _reference(m, x))


def test_the_digest_covers_data_files_and_is_remembered_until_a_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOIRAI_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "m.onnx"
    onnx.save(_chain(), path, save_as_external_data=True, location="m.data")
    data = tmp_path / "m.data"
    want = hashlib.sha256(path.read_bytes() + data.read_bytes()).hexdigest()
    assert model_digest(path) == want
    assert len(list((tmp_path / "cache" / "digests").iterdir())) == 1
    assert model_digest(path) == want  # from the cache
    # The same size and modification time, other bytes: the change time gives it away.
    before = data.stat()
    data.write_bytes(data.read_bytes()[:-4] + b"\0\0\0\0")
    os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert model_digest(path) == hashlib.sha256(path.read_bytes() + data.read_bytes()).hexdigest()
    assert model_digest(path) != want
