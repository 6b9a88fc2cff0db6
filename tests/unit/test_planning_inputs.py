"""The one resolver of devices, input shapes and profile (`moirai.planning.inputs`) that
`moirai place`, `moirai serve`, `moirai demo` and the operator share; and the layering it lets
profiling keep (no server package under `moirai.profile`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moirai.cli import main
from moirai.devices import local_devices
from moirai.errors import MoiraiError
from moirai.planning import load, resolve
from moirai.planning.cpu import available_cores, split_cpu
from moirai.planning.inputs import default_profile, resolve_devices
from moirai.planning.space import cpu_groupings
from moirai.profile.analytic import AnalyticProfile

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
