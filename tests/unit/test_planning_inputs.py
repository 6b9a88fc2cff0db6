"""The one resolver of devices, input shapes and profile (`moirai.planning.inputs`) that
`moirai place`, `moirai serve`, `moirai demo` and the operator share; and the layering it lets
profiling keep (no server package under `moirai.profile`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from moirai.cli import main
from moirai.devices import available_cores, local_devices
from moirai.errors import MoiraiError
from moirai.planning import build_costgraph, load, resolve
from moirai.planning.cpu import split_cpu
from moirai.planning.inputs import default_profile, resolve_devices
from moirai.planning.space import cpu_groupings
from moirai.profile.analytic import AnalyticProfile
from moirai.profile.document import ProfileError

from .onnx_patterns import diamond, save


def test_local_means_every_grouping_of_the_cpu_or_the_one_asked_for() -> None:
    assert resolve_devices("local") == tuple(cpu_groupings(local_devices()))
    assert resolve_devices("local", 1) == (split_cpu(local_devices(), 1),)
    with pytest.raises(MoiraiError, match="--cpu-devices applies to --devices local only"):
        resolve_devices(local_devices(), 2)


def test_groupings_cut_the_cores_into_equal_devices() -> None:
    cores = len(available_cores())
    groupings = cpu_groupings(local_devices())
    assert len([d for d in groupings[0].devices if d.kind == "cpu"]) == 1  # every core at once
    for g in groupings:
        cpus = [d for d in g.devices if d.kind == "cpu"]
        assert sum(d.threads or 0 for d in cpus) == cores
        assert len({d.threads for d in cpus}) == 1


def test_resolve_loads_the_model_once_with_its_shapes(tmp_path: Path) -> None:
    path = save(diamond(), tmp_path / "diamond.onnx")
    inputs = resolve(path, "local", cpu_devices=1, input_shapes=[], profile="analytic")
    assert [d.threads for d in inputs.devices.devices if d.kind == "cpu"] == [
        len(available_cores())
    ]
    assert isinstance(inputs.profile, AnalyticProfile)
    again = load(path)
    assert inputs.model.sha256 == again.sha256
    assert [n.name for n in inputs.model.proto.graph.node] == [
        n.name for n in again.proto.graph.node
    ]


def test_measured_is_the_default_where_the_devices_are_at_hand(tmp_path: Path) -> None:
    assert default_profile("local") == "measured"
    assert default_profile(tmp_path / "devices.yaml") == "analytic"
    assert default_profile(local_devices()) == "analytic"  # the operator's pools


def _range_of_a_step(path: Path) -> Path:
    """Range(0, 8, step) with the step an input: it fails on the zero that profiling feeds, as
    silero-vad fails on a sample rate of 0."""
    graph = helper.make_graph(
        [helper.make_node("Range", ["start", "limit", "step"], ["r"])],
        "steps",
        [helper.make_tensor_value_info("step", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("r", TensorProto.INT64, ["n"])],
        [numpy_helper.from_array(np.array(0, np.int64), "start"),
         numpy_helper.from_array(np.array(8, np.int64), "limit")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return save(model, path)


def test_a_model_that_cannot_be_timed_is_planned_analytically_unless_measured_is_asked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """ONNX Runtime's exception escaped profiling; now a defaulted measured profile prices the
    model analytically with a warning, and `--profile measured` stops with what to do."""
    path = _range_of_a_step(tmp_path / "steps.onnx")
    asked = resolve(path, "local", cpu_devices=1, profile="measured", cache_dir=tmp_path)
    with pytest.raises(ProfileError) as e:
        build_costgraph(asked.model, asked.devices, profile=asked.profile)
    assert "\n" not in str(e.value) and "random floats and zero integers" in str(e.value)
    assert "--profile analytic" in str(e.value)
    default = resolve(path, "local", cpu_devices=1, cache_dir=tmp_path)
    costgraph = build_costgraph(default.model, default.devices, profile=default.profile)
    assert costgraph.extra["source"]["profile"] == "analytic"
    assert "planned with analytic costs instead" in caplog.text


def test_a_profile_file_is_read_before_the_model(tmp_path: Path) -> None:
    """A wrong profile file fails on its own account, whatever the model."""
    broken = tmp_path / "m.onnx"
    broken.write_bytes(b"")
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps({"format": "nope"}), encoding="utf-8")
    with pytest.raises(MoiraiError, match=r"not a moirai\.profile/v1 document"):
        resolve(broken, "local", profile=str(profile))


@pytest.mark.parametrize("parts", [1, 2])
def test_place_and_serve_resolve_local_alike(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], parts: int
) -> None:
    if parts > len(available_cores()):
        parts = len(available_cores())
    path = save(diamond(), tmp_path / "diamond.onnx")
    out = tmp_path / "cg.json"
    argv = ["place", str(path), "--devices", "local", "--cpu-devices", str(parts)]
    argv += ["--profile", "analytic"]
    assert main([*argv, "--solver", "heft", "-q", "--costgraph-out", str(out)]) == 0
    capsys.readouterr()
    devices = [d["name"] for d in json.loads(out.read_text())["devices"]]
    assert devices == [d.name for d in resolve_devices("local", parts)[0].devices]


def test_profiling_does_not_import_the_server_package() -> None:
    code = (
        "import sys, moirai.profile.measured, moirai.profile.cache, moirai.planning;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'stage_server'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
