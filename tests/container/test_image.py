"""Moirai's image, built by `hack/image/build.sh`: every entry point runs as the pod templates
run it (user 10001, read-only root filesystem, no capabilities, no network), and the GPU target
builds its Python layer (on the CPU base image: no registry here offers the CUDA base)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from image import image as build_image

DOCKERFILE = Path(__file__).resolve().parents[2] / "Dockerfile"

LOCKED_DOWN = ["--network", "none", "--read-only", "--cap-drop", "ALL", "--tmpfs", "/tmp"]


def run(image: str, *argv: str) -> str:
    result = subprocess.run(
        ["docker", "run", "--rm", *LOCKED_DOWN, image, *argv],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{argv} in {image}: {result.stderr[-3000:]}"
    return result.stdout


def test_every_entry_point_runs_as_the_unprivileged_user(image: str) -> None:
    assert run(image, "id", "-u").strip() == "10001"  # the image's USER, as in the pod specs
    assert "Place an ONNX model" in run(image, "moirai", "--help")
    for command in ("stage", "gateway", "profile"):
        assert "--plan" in run(image, "moirai", command, "--help") or command == "profile"
    assert "kopf" in run(image, "kopf", "--version")
    for module in ("moirai_operator.fetch", "moirai_operator.upload"):
        assert "usage" in run(image, "python", "-m", module, "--help")
    # The operator's handlers import (kopf loads them by module name).
    run(image, "python", "-c", "import moirai_operator.handlers")


def test_the_gpu_target_builds_with_onnxruntime_gpu() -> None:
    gpu = build_image("gpu")
    providers = run(
        gpu, "python", "-c", "import onnxruntime; print(onnxruntime.get_available_providers())"
    )
    assert "CUDAExecutionProvider" in providers
    assert run(gpu, "id", "-u").strip() == "10001"
    assert "Place an ONNX model" in run(gpu, "moirai", "--help")
    # The CUDA the installed onnxruntime-gpu is built for is the default base's: with another
    # major version its CUDA provider cannot load (the default base was CUDA 12.6, onnxruntime-gpu
    # 1.31 needs CUDA 13).
    built_for = run(
        gpu,
        "python",
        "-c",
        "from onnxruntime.capi import build_and_package_info as b; print(b.cuda_version)",
    ).strip()
    default_base = re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.", DOCKERFILE.read_text(), re.M)
    assert default_base, "the Dockerfile names no default nvidia/cuda base"
    assert built_for.split(".")[0] == default_base.group(1), (built_for, default_base.group(0))
