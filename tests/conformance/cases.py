"""The conformance cases: real ONNX graphs with their test inputs, and what ONNX Runtime computes.

The graphs are ONNX's own backend test models, installed with the `onnx` package: the folders
`pytorch-converted`, `pytorch-operator`, `simple` and `light` under `onnx/backend/test/data`
(each a model.onnx and test_data_set_*/input_*.pb), and the multi-node function expansions of
ONNX's node tests (`*_expanded*`), which `onnx.backend.test.case.node.collect_testcases` builds
in memory with their inputs (the installed package ships no `node/` folder). The expansions are
sampled deterministically (every `EXPANDED_STRIDE`-th by name) to keep the suite within its time
on two cores; `MOIRAI_CONFORMANCE_ALL=1` takes every one.

The reference is ONNX Runtime on the whole model, not the expected outputs in the files: Moirai
must compute what ONNX Runtime computes. A model ONNX Runtime itself cannot load or run is no
case but left out, with ONNX Runtime's own reason (`Case.skip`), decided when the cases are
collected.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
FOLDERS = ("pytorch-converted", "pytorch-operator", "simple")
EXPANDED_STRIDE = 3
"""One multi-node function expansion in this many is a case (sorted by name)."""


@dataclass
class Case:
    name: str
    model: onnx.ModelProto
    inputs: dict[str, Any]
    """Arrays, lists of arrays (sequences) or None (an empty optional), by input name."""
    want: dict[str, Any] | None = None
    """ONNX Runtime's outputs on the whole model, by output name."""
    skip: str = ""
    """Why ONNX Runtime itself cannot run the model (then `want` is None)."""
    large: bool = False
    """A zoo CNN at 224×224: checked under fewer placements (`check.conform`)."""

    def __repr__(self) -> str:
        return self.name


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


def _load_value(path: Path, value_type: onnx.TypeProto) -> Any:
    data = path.read_bytes()
    kind = value_type.WhichOneof("value")
    if kind == "sequence_type":
        proto = onnx.SequenceProto()
        proto.ParseFromString(data)
        return numpy_helper.to_list(proto)
    if kind == "optional_type":
        proto = onnx.OptionalProto()
        proto.ParseFromString(data)
        return numpy_helper.to_optional(proto)
    proto = onnx.TensorProto()
    proto.ParseFromString(data)
    return numpy_helper.to_array(proto)


def _folder_case(folder: Path) -> Case:
    model = onnx.load(folder / "model.onnx")
    data_set = sorted(folder.glob("test_data_set_*"))[0]
    files = sorted(data_set.glob("input_*.pb"), key=lambda p: int(p.stem.split("_")[1]))
    graph_inputs = list(model.graph.input)
    inputs = {
        graph_inputs[i].name: _load_value(f, graph_inputs[i].type) for i, f in enumerate(files)
    }
    return Case(f"{folder.parent.name}/{folder.name}", model, inputs)


def _light_cases() -> list[Case]:
    """The light model zoo (`moirai.zoo`'s CNNs): a model file without test inputs, so its
    input is drawn at random (fixed seed)."""
    cases = []
    for path in sorted((DATA / "light").glob("light_*.onnx")):
        model = onnx.load(path)
        weights = {t.name for t in model.graph.initializer}
        rng = np.random.default_rng(0)
        inputs = {
            i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(
                np.float32
            )
            for i in model.graph.input
            if i.name not in weights
        }
        cases.append(Case(f"light/{path.stem}", model, inputs, large=True))
    return cases


def _expanded_cases() -> list[Case]:
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():  # the reference implementations overflow on purpose
        warnings.simplefilter("ignore", RuntimeWarning)
        tests = collect_testcases()
    cases = []
    for test in tests:
        if "_expanded" not in test.name or len(test.model.graph.node) < 2:
            continue
        model = test.model
        names = [i.name for i in model.graph.input]
        values = [v if isinstance(v, list | None) else np.asarray(v) for v in test.data_sets[0][0]]
        cases.append(Case(f"node/{test.name}", model, dict(zip(names, values, strict=False))))
    cases.sort(key=lambda c: c.name)
    if os.environ.get("MOIRAI_CONFORMANCE_ALL") != "1":
        cases = cases[::EXPANDED_STRIDE]
    return cases


def reference(model: onnx.ModelProto, inputs: dict[str, Any]) -> dict[str, Any]:
    """ONNX Runtime's outputs of the whole model (CPU, default optimisations)."""
    options = ort.SessionOptions()
    options.log_severity_level = 4
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs), strict=True))


@functools.cache
def collect() -> tuple[Case, ...]:
    """Every case, with ONNX Runtime's outputs or its reason for not running the model."""
    cases = [
        _folder_case(folder)
        for name in FOLDERS
        for folder in sorted((DATA / name).iterdir())
        if (folder / "model.onnx").is_file()
    ]
    cases += _light_cases()
    cases += _expanded_cases()
    from . import corners  # it imports Case from here

    cases += corners.cases()
    for case in cases:
        try:
            case.want = reference(case.model, case.inputs)
        except Exception as e:  # ORT raises its own exception types, without a common base
            case.skip = f"ONNX Runtime cannot run the whole model: {_one_line(e)}"
    return tuple(cases)


# ---------------------------------------------------------------------- comparing
def assert_same(got: Any, want: Any, where: str, rtol: float, atol: float) -> None:
    """Outputs equal as ONNX's backend tests compare them: values within rtol/atol, dtypes and
    shapes exact, sequences element by element, empty optionals both None."""
    if want is None:
        assert got is None, f"{where}: expected an empty optional, got {type(got).__name__}"
        return
    if isinstance(want, Sequence) and not isinstance(want, np.ndarray | str | bytes):
        assert isinstance(got, Sequence), f"{where}: expected a sequence, got {type(got)}"
        assert len(got) == len(want), f"{where}: sequence of {len(got)}, expected {len(want)}"
        for k, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{where}[{k}]", rtol, atol)
        return
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype, f"{where}: dtype {got.dtype}, expected {want.dtype}"
    assert got.shape == want.shape, f"{where}: shape {got.shape}, expected {want.shape}"
    if want.dtype.kind in "fc":
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=where)
    else:
        np.testing.assert_array_equal(got, want, err_msg=where)
