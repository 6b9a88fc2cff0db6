"""What a measurement describes: a device target and the signature of the hardware under it.

A *target* is how a device is named on the command line and in profile files:

    cpu                 the CPU provider with ONNX Runtime's default thread count
    cpu:threads=N       the CPU provider with N intra-op threads (pinned to N cores)
    cuda, cuda:ID       the CUDA provider on device ID (default 0)

optionally prefixed by a name, `NAME=cpu:threads=2`, which the profile file uses as the device's
key (default: the target itself) and which a cost graph device of that name picks up first.

A *signature* is what makes two measurements of the same model interchangeable: the ONNX Runtime
version, the execution provider, the CPU model and thread count, the GPU's name, and the version
of the measuring method. Profiles are cached under it (`moirai.profile.cache`), so a second
machine of the same kind, or the same machine later, reuses a measurement, while a different
thread count, GPU or ONNX Runtime measures again. The CUDA device id is deliberately not part of
it: two GPUs of one model time the same.
"""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import onnxruntime as ort

from moirai.devices import CPU, CUDA, DeviceSpec, available_cores
from moirai.errors import MoiraiError
from moirai.stageplan import DeviceSpec as PlanDevice

METHOD_VERSION = 7
"""Bump when the measuring method changes what a profile means: cached profiles then miss (6:
sessions of every core of their thread spin, `moirai.sessions.spins`; 7: and stop spinning when a
run ends, which profiles timed in turns were measured beside)."""

_SPEC = re.compile(r"^(?:(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)=)?(?P<target>[a-z]+(?::[^\s]*)?)$")


@dataclass(frozen=True)
class Target:
    kind: str
    """"cpu" or "gpu"."""
    threads: int | None = None
    device_id: int = 0

    @property
    def provider(self) -> str:
        return CPU if self.kind == "cpu" else CUDA

    @property
    def key(self) -> str:
        if self.kind == "gpu":
            return f"cuda:{self.device_id}"
        return "cpu" if self.threads is None else f"cpu:threads={self.threads}"

    def __str__(self) -> str:
        return self.key

    @property
    def plan_device(self) -> PlanDevice:
        """The stage plan's view of this target, which the serving sessions are built from."""
        if self.kind == "gpu":
            return PlanDevice(self.key, "gpu", device_id=self.device_id)
        return PlanDevice(self.key, "cpu", threads=self.threads)

    def check_available(self) -> None:
        """Raise one line when this ONNX Runtime cannot run the target's provider."""
        if self.provider not in ort.get_available_providers():
            raise MoiraiError(
                f"--device {self.key}: this ONNX Runtime ({ort.__version__}) has no CUDA "
                "provider; install onnxruntime-gpu (the `gpu` extra) on a machine with an NVIDIA "
                "GPU, or profile cpu devices only"
            )

    @classmethod
    def of(cls, device: DeviceSpec) -> Target:
        """The target that measures a cost graph device."""
        if device.provider == CPU:
            return cls("cpu", threads=device.threads)
        if device.provider == CUDA:
            return cls("gpu", device_id=device.device_id)
        raise MoiraiError(
            f"device {device.name}: measured profiling runs the CPU and CUDA providers, not "
            f"{device.provider}; use --profile analytic for it"
        )


def parse_device(text: str) -> tuple[str, Target]:
    """`[NAME=]cpu[:threads=N]` or `[NAME=]cuda[:ID]` → (name, target); one-line errors."""
    match = _SPEC.match(text.strip())
    if match is None:
        raise MoiraiError(_usage(text))
    kind, _, rest = match["target"].partition(":")
    target: Target
    if kind == "cpu":
        if not rest:
            target = Target("cpu")
        else:
            key, _, value = rest.partition("=")
            if key != "threads" or not value.isdigit() or int(value) < 1:
                raise MoiraiError(_usage(text))
            target = Target("cpu", threads=int(value))
    elif kind in ("cuda", "gpu"):
        if rest and not rest.isdigit():
            raise MoiraiError(_usage(text))
        target = Target("gpu", device_id=int(rest or 0))
    else:
        raise MoiraiError(_usage(text))
    return match["name"] or target.key, target


def _usage(text: str) -> str:
    return (
        f"--device {text!r}: write cpu, cpu:threads=N, cuda or cuda:ID, optionally prefixed by "
        "a name (e.g. fast=cpu:threads=4)"
    )


# ------------------------------------------------------------------ signature
def signature(target: Target) -> dict[str, Any]:
    """What must match for a cached measurement to stand for a new one (module docstring)."""
    out: dict[str, Any] = {
        "method": METHOD_VERSION,
        "onnxruntime": ort.__version__,
        "provider": target.provider,
        "cpu": cpu_model(),
    }
    if target.kind == "cpu":
        out["threads"] = target.threads or f"default of {len(available_cores())} cores"
    else:
        out["gpu"] = gpu_name(target.device_id)
    return out


@cache
def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    found = re.search(r"^model name\s*:\s*(.+)$", text, flags=re.MULTILINE)
    return (found.group(1).strip() if found else platform.processor()) or platform.machine()


@cache
def gpu_name(device_id: int) -> str:
    """The name `nvidia-smi` gives the GPU, or "unknown GPU" without it."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "unknown GPU"
    try:
        out = subprocess.run(
            [smi, f"--id={device_id}", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown GPU"
    return out or "unknown GPU"
