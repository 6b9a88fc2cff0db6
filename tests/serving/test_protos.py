"""The committed stubs match the .proto files (regenerate with stage_server/protos/generate.sh)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "stage_server" / "protos"


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
        assert (copy / name).read_text() == (PROTOS / name).read_text(), f"{name} is stale"
