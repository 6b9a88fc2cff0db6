"""The committed stubs match the .proto files (regenerate with stage_server/protos/generate.sh).

The stubs carry the versions of the grpcio-tools that generated them (and of the protobuf it
bundles), which they then require at run time; a newer grpcio-tools from the package index
stamps its own version on otherwise equal code. So the code is compared without the stamps, and
the stamps are checked against the lowest grpcio and protobuf that `pyproject.toml` allows.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "stage_server" / "protos"
GRPC_STAMP = re.compile(r"GRPC_GENERATED_VERSION = '([\d.]+)'")
PROTOBUF_STAMP = re.compile(r"# Protobuf Python Version: ([\d.]+)\n")
PROTOBUF_CHECK = re.compile(r"(Domain\.PUBLIC,\n)\s*\d+,\n\s*\d+,\n\s*\d+,\n")


def without_stamps(code: str) -> str:
    code = GRPC_STAMP.sub("GRPC_GENERATED_VERSION = '*'", code)
    code = PROTOBUF_STAMP.sub("# Protobuf Python Version: *\n", code)
    return PROTOBUF_CHECK.sub(r"\1*\n", code)


def version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def lowest_allowed(package: str) -> tuple[int, ...]:
    """The version after `>=` of `package` in the project's dependencies."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:
        name, _, floor = requirement.partition(">=")
        if name.strip() == package:
            return version(floor.strip())
    raise AssertionError(f"pyproject.toml has no {package}>=... dependency")


def test_generated_stubs_are_up_to_date(tmp_path: Path) -> None:
    copy = tmp_path / "stage_server" / "protos"
    copy.mkdir(parents=True)
    for proto in PROTOS.glob("*.proto"):
        shutil.copy(proto, copy)
    shutil.copy(PROTOS / "generate.sh", copy)
    subprocess.run(["sh", str(copy / "generate.sh")], check=True, env={"PYTHON": sys.executable})
    generated = sorted(p.name for p in copy.glob("*_pb2*.py"))
    assert generated == sorted(p.name for p in PROTOS.glob("*_pb2*.py"))
    for name in generated:
        fresh, committed = (copy / name).read_text(), (PROTOS / name).read_text()
        assert without_stamps(fresh) == without_stamps(committed), f"{name} is stale"


def test_the_stubs_need_no_newer_grpc_or_protobuf_than_the_project_allows() -> None:
    for stub in PROTOS.glob("*_pb2_grpc.py"):
        (stamp,) = GRPC_STAMP.findall(stub.read_text())
        assert version(stamp) <= lowest_allowed("grpcio"), stub.name
    for stub in PROTOS.glob("*_pb2.py"):
        (stamp,) = PROTOBUF_STAMP.findall(stub.read_text())
        assert version(stamp) <= lowest_allowed("protobuf"), stub.name


def test_the_stamps_are_all_that_is_left_out() -> None:
    """The comparison above would see a change of anything but the version stamps."""
    stub = (PROTOS / "stage_pb2_grpc.py").read_text()
    assert without_stamps(stub) != stub
    assert without_stamps(stub.replace("DO NOT EDIT", "EDIT")) != without_stamps(stub)
    restamped = GRPC_STAMP.sub("GRPC_GENERATED_VERSION = '9.9.9'", stub)
    assert without_stamps(restamped) == without_stamps(stub)
