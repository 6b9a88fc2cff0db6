"""Weights by reference: a model in memory is its graph; its weights stay in their files.

Every step of the pipeline works on the `onnx.ModelProto` that `moirai.graph.load_model` returns,
and none of them needs the weights' bytes in Python: shape inference, fusion analysis, cost
graphs and stage plans read names, types and shapes, and ONNX Runtime, the only consumer of the
values, can read them from the files itself. So `read_skeleton` reads a model file without its
weights:

- an initializer already in external data keeps its reference (`location`, `offset`,
  `length`), checked to stay inside the model's folder;
- an initializer held in the `.onnx` file itself (`raw_data` of 1 KiB or more) becomes an
  external reference into that same file, at the offset where its bytes lie: the file is
  walked with the protobuf wire format (memory-mapped), so the bytes are never read, and the
  model is parsed only once its weights are cut out. Smaller tensors stay where they are, and
  small external ones are read in, so that shape inference still sees shape constants.

ONNX Runtime resolves external locations relative to the folder that
`session.model_external_initializers_file_folder_path` names (it refuses absolute locations), so
the model remembers its folder in its metadata (`FOLDER_KEY`), which sub-models cut from it
keep, and `ort_session` passes it on. On the CPU, ONNX Runtime memory-maps external data: a
session holds only the pages of the weights its nodes read, shared with every other process
that maps the same file, and a stage's sub-model references only its own initializers.
Pre-packing (ONNX Runtime's copy of a matrix kernel's weights in the layout the kernel reads
fastest: BERT-base runs 12% faster with it on a 2-core EPYC) makes that copy beside the
mapping, so a session holds those weights twice while it loads; `ort_session(prepack=False)`
turns it off (`session.disable_prepacking`) for a device whose memory has no room for the copy
(the stage plan's `DeviceSpec.prepack`).

A model file of 2 GiB or more cannot be one protobuf message (its limit): such a model must keep
its weights as external data, and `check_size` says so in one line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from moirai.cachedir import cache_dir, write_entry
from moirai.errors import ModelError

if TYPE_CHECKING:
    import onnxruntime as ort

FOLDER_KEY = "moirai.weights_folder"
"""Metadata key of the folder that the model's external locations are relative to."""
MIN_REFERENCED_BYTES = 1024
"""Tensors smaller than this stay in (or are read into) the model: onnx's own threshold for
external data, and what keeps shape constants visible to shape inference."""
PROTOBUF_LIMIT = 2**31

# Field numbers of onnx.proto3 that the walk needs.
_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_RAW_DATA = 9
_TENSOR_EXTERNAL_DATA = 13
_TENSOR_DATA_LOCATION = 14
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class ExternalDataError(ModelError):
    """An external data location that is absolute or leaves the model's folder."""


# ------------------------------------------------------------------ reading
def check_size(path: Path) -> None:
    """Refuse an `.onnx` file over protobuf's 2 GiB limit (weights not in external data)."""
    size = path.stat().st_size
    if size >= PROTOBUF_LIMIT:
        raise ModelError(
            f"{path}: the file is {size / 1e9:.2f} GB, over protobuf's 2 GiB limit for one "
            "ONNX file; save its weights as external data (onnx.save_model(model, path, "
            "save_as_external_data=True)) and use that model"
        )


def read_skeleton(path: Path) -> onnx.ModelProto:
    """The model at `path` with its weights left in their files (module docstring)."""
    try:
        check_size(path)
        with path.open("rb") as f:
            if path.stat().st_size == 0:
                raise ModelError(f"{path}: the file is empty; re-export or re-download it")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                skeleton, references = _Walk(data).model()
    except FileNotFoundError:
        raise ModelError(f"{path}: no such ONNX file") from None
    except OSError as e:
        raise ModelError(f"{path}: cannot read ({e.strerror})") from None
    except (_WireError, DecodeError) as e:
        raise ModelError(
            f"{path}: not a valid ONNX model (truncated or corrupt: {e}); re-export or "
            "re-download it"
        ) from None
    try:
        model = onnx.ModelProto.FromString(skeleton)
    except DecodeError as e:
        raise ModelError(f"{path}: not a valid ONNX model ({e}); re-export it") from None
    folder = path.resolve().parent
    for tensor in model.graph.initializer:
        span = references.get(tensor.name)
        if span is not None:
            del tensor.external_data[:]
            for key, value in (("location", path.name), ("offset", span[0]), ("length", span[1])):
                tensor.external_data.add(key=key, value=str(value))
            tensor.data_location = onnx.TensorProto.EXTERNAL
    for tensor in external_tensors(model):
        location = external_location(tensor, path)
        if _length(tensor) < MIN_REFERENCED_BYTES and location != path.name:
            _read_in(tensor, folder, path)
    set_folder(model, folder)
    return model


def external_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """The main graph's initializers whose data lie in a file."""
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor


def external_location(tensor: onnx.TensorProto, model_path: Path | str) -> str:
    """The tensor's data file, relative to the model's folder; refused (one line) when the
    location is absolute or leaves the folder."""
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    parts = PurePosixPath(location.replace("\\", "/")).parts
    if not location or PurePosixPath(location).is_absolute() or ".." in parts or ":" in location:
        raise ExternalDataError(
            f"{model_path}: initializer {tensor.name!r} names external data {location!r}: "
            "locations must be relative paths inside the model's folder"
        )
    return str(PurePosixPath(*parts))


def external_files(model: onnx.ModelProto, model_path: Path | str) -> list[str]:
    """The distinct external data files of the model (relative to its folder), sorted, without
    the model file itself."""
    name = Path(model_path).name
    return sorted({external_location(t, model_path) for t in external_tensors(model)} - {name})


def _length(tensor: onnx.TensorProto) -> int:
    info = {e.key: e.value for e in tensor.external_data}
    if "length" in info:
        return int(info["length"])
    count = 1
    for d in tensor.dims:
        count *= d
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _read_in(tensor: onnx.TensorProto, folder: Path, path: Path) -> None:
    try:
        external_data_helper.load_external_data_for_tensor(tensor, str(folder))
    except (OSError, ValueError) as e:
        raise ModelError(
            f"{path}: cannot read the external data of {tensor.name!r} ({e}); keep the data "
            "files next to the model"
        ) from None
    tensor.data_location = onnx.TensorProto.DEFAULT
    del tensor.external_data[:]


def model_files(path: Path) -> list[Path]:
    """The model file, then its external data files in the order of their locations' names (a
    file that is no readable model has none: loading it says what is wrong)."""
    if not path.is_file():
        raise ModelError(f"{path}: no such ONNX file")
    try:
        skeleton = read_skeleton(path)
    except ExternalDataError:
        raise
    except ModelError:
        return [path]
    return [path, *(path.parent / f for f in external_files(skeleton, path))]


def model_digest(path: Path | str) -> str:
    """SHA-256 of the model file followed by its external data files, in the order of their
    locations' names (byte order): `cat model.onnx model.onnx.data | sha256sum` for one data
    file, `sha256sum model.onnx` for a model without external data.

    Remembered (in the cache folder's `digests`) against each file's identity and change
    times, as git's index does: a file written since, even with its modification time put
    back, has a new change time (`st_ctime_ns`, which no tool sets), so it is read again. The
    planner, every stage server and the fetch of one model then read gigabytes once."""
    files = model_files(Path(path))
    stamps = [_stamp(f) for f in files]
    entry = cache_dir("digests") / f"{hashlib.sha256(str(stamps).encode()).hexdigest()}.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        remembered = json.loads(entry.read_text(encoding="utf-8"))
        if remembered["stamps"] == stamps:
            return str(remembered["sha256"])
    digest = hashlib.sha256()
    for file in files:
        try:
            with file.open("rb") as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
        except OSError as e:
            raise ModelError(f"{file}: cannot read the model ({e.strerror})") from None
    if [_stamp(f) for f in files] == stamps:  # unchanged while it was read
        with contextlib.suppress(OSError):  # a cache that cannot be written is no cache
            write_entry(entry, {"stamps": stamps, "sha256": digest.hexdigest()})
    return digest.hexdigest()


def _stamp(file: Path) -> list[int | str]:
    try:
        st = file.stat()
    except OSError as e:
        raise ModelError(f"{file}: cannot read the model ({e.strerror})") from None
    return [str(file.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


# ------------------------------------------------------------------ folder
def set_folder(model: onnx.ModelProto, folder: Path | str | None) -> None:
    """Record (or with None, forget) the folder the model's external locations are in."""
    kept = [p for p in model.metadata_props if p.key != FOLDER_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    if folder is not None:
        model.metadata_props.add(key=FOLDER_KEY, value=str(folder))


def folder_of(model: onnx.ModelProto) -> str | None:
    """The folder recorded by `read_skeleton` (None for a model whose weights are all in it)."""
    return next((p.value for p in model.metadata_props if p.key == FOLDER_KEY), None)


def ort_session(
    model: onnx.ModelProto,
    options: ort.SessionOptions,
    providers: Sequence[str | tuple[str, dict[str, str]]],
    *,
    prepack: bool = True,
    **kwargs: object,
) -> ort.InferenceSession:
    """An ONNX Runtime session over `model`, whose external weights it maps from their files;
    without `prepack`, mapped weights are never copied (module docstring)."""
    import onnxruntime as ort  # here: the gateway digests models but runs none

    folder = folder_of(model)
    if folder is not None:
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", folder
        )
    if not prepack and not _configured(options, _NO_PREPACKING):
        options.add_session_config_entry(_NO_PREPACKING, "1")
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=list(providers), **kwargs
    )


_NO_PREPACKING = "session.disable_prepacking"


def _configured(options: ort.SessionOptions, key: str) -> bool:
    try:
        options.get_session_config_entry(key)
    except Exception:  # ORT raises its own exception types, without a common base
        return False
    return True


def optimised_model_without_weights(options: ort.SessionOptions, folder: Path) -> Path:
    """Have ONNX Runtime write its optimised model into `folder` (a fresh temporary folder)
    with the weights of 1 KiB or more in a side file that is the null device: only the graph's
    structure is read back, and a large model then costs no disk and no time writing them.
    Returns the path the optimised model will have."""
    (folder / "optimised.data").symlink_to(os.devnull)
    options.optimized_model_filepath = str(folder / "optimised.onnx")
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_file_name", "optimised.data"
    )
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
    )
    return folder / "optimised.onnx"


# ------------------------------------------------------------------ the walk
class _WireError(ValueError):
    pass


class _Walk:
    """Rebuilds a serialised ModelProto without the `raw_data` of its main graph's large
    initializers, noting where each lies in the file (name → (offset, length))."""

    def __init__(self, data: mmap.mmap) -> None:
        self.data = data
        self.references: dict[str, tuple[int, int]] = {}

    def model(self) -> tuple[bytes, dict[str, tuple[int, int]]]:
        out = self._message(0, len(self.data), {_MODEL_GRAPH: self._graph})
        return out, self.references

    def _graph(self, start: int, end: int) -> bytes:
        return self._message(start, end, {_GRAPH_INITIALIZER: self._tensor})

    def _tensor(self, start: int, end: int) -> bytes:
        raw: tuple[int, int] | None = None
        name = b""
        kept: list[bytes] = []
        for field, wire, at, value_start, value_end in self._fields(start, end):
            if wire == _LEN and field == _TENSOR_RAW_DATA:
                raw = (value_start, value_end - value_start)
                continue
            if field == 8 and wire == _LEN:
                name = self.data[value_start:value_end]
            if field in (_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION):
                return self.data[start:end]  # already external: as it is
            kept.append(self.data[at:value_end])
        if raw is None or raw[1] < MIN_REFERENCED_BYTES:
            return self.data[start:end]
        self.references[name.decode()] = raw
        return b"".join(kept)

    def _message(self, start: int, end: int, rewrite: dict[int, object]) -> bytes:
        parts: list[bytes] = []
        for field, wire, at, value_start, value_end in self._fields(start, end):
            handler = rewrite.get(field) if wire == _LEN else None
            if handler is None:
                parts.append(self.data[at:value_end])
                continue
            payload = handler(value_start, value_end)  # type: ignore[operator]
            parts += [_varint((field << 3) | _LEN), _varint(len(payload)), payload]
        return b"".join(parts)

    def _fields(self, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
        """(field number, wire type, start of the tag, start and end of the value)."""
        pos = start
        while pos < end:
            at = pos
            tag, pos = self._varint(pos, end)
            field, wire = tag >> 3, tag & 7
            if wire == _VARINT:
                _, value_end = self._varint(pos, end)
            elif wire == _I64:
                value_end = pos + 8
            elif wire == _I32:
                value_end = pos + 4
            elif wire == _LEN:
                length, pos = self._varint(pos, end)
                value_end = pos + length
            else:
                raise _WireError(f"wire type {wire} at byte {at}")
            if field == 0 or value_end > end:
                raise _WireError(f"field {field} at byte {at} runs past its message")
            yield field, wire, at, pos, value_end
            pos = value_end

    def _varint(self, pos: int, end: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            if pos >= end or shift > 63:
                raise _WireError(f"bad varint at byte {pos}")
            byte = self.data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value, pos
            shift += 7


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
