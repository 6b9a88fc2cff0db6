"""The Docker engine and Moirai's image, for the tests marked `container` (no tests here).

`image()` builds the image with `hack/image/build.sh` — the command a person runs — once per
test session and target: the first build on a machine takes minutes (dependencies from PyPI),
later ones reuse Docker's layer cache and take seconds. When no engine answers, the tests fail
with the command that starts one (`hack/image/engine.sh`); they never skip.
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "hack" / "image" / "build.sh"
BASE = REPO / "hack" / "image" / "base.sh"
TAGS = {"cpu": "moirai:test", "gpu": "moirai:test-gpu"}
"""What the tests' operators name as MOIRAI_IMAGE and MOIRAI_GPU_IMAGE."""
BUILD_TIMEOUT_S = 1800


def require_engine() -> None:
    try:
        result = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.fail(f"no Docker engine: {e}; run hack/image/engine.sh", pytrace=False)
    if result.returncode != 0:
        pytest.fail(
            "no Docker engine answers: run hack/image/engine.sh (as root)\n" + result.stderr,
            pytrace=False,
        )


def _run(argv: list[str], env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        env={**os.environ, **(env or {})},
    )
    if result.returncode != 0:
        pytest.fail(f"{' '.join(argv)} failed:\n{result.stderr[-6000:]}", pytrace=False)
    return result.stdout.strip().splitlines()[-1]


@functools.cache
def base_image() -> str:
    require_engine()
    return _run([str(BASE)])


@functools.cache
def image(target: str = "cpu") -> str:
    """The tag of the freshly built image of `target` (cpu, or gpu on the CPU base image: its
    Python layer, without CUDA, which no image registry here offers)."""
    require_engine()
    env = {"CUDA_IMAGE": base_image()} if target == "gpu" else {}
    return _run([str(BUILD), target, TAGS[target]], env)
