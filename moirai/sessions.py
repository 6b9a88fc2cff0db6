"""ONNX Runtime sessions for one device of a stage plan, built the same way everywhere.

A CPU device gets the CPU execution provider with its own intra-op thread count (one inter-op
thread, sequential execution). Its threads spin while they wait for work only when they are
exactly the cores the session may run on (`spins`): a stage server pinned to its own cores, or
alone on the machine, then takes no other server's cores, and a model of many small kernels runs
much faster (measured in process on 2 cores: EfficientNet-B0 9.0 ms without spinning, 6.7 ms
with; MobileNetV3-Large 4.6 and 3.5 ms; ResNet-50 39.1 and 38.4 ms), which is also ONNX
Runtime's default that a user compares with. They stop spinning when a run ends
(`session.force_spinning_stop`): ONNX Runtime's default keeps them spinning for 20 ms and more
after each run, a whole core taken from the front end, the client and the next request's
decoding in the same process (shufflenet: 2.64 ms a run spinning, 2.67 ms with the stop, 3.87
without spinning; CPU in the 20 ms after a run 19.8, 0.0 and 0.0 ms). Where several devices
share cores, spinning threads would steal them from their neighbours, so it is off; the local
runtime says so explicitly where it cannot give every stage server cores of its own
(`moirai stage --no-spin`). A GPU device
gets the CUDA execution provider with its device id, falling back to the CPU provider only for
operators CUDA lacks; when this ONNX Runtime build has no CUDA provider, that is an error the
user can act on rather than a silent run on the CPU.

The stage servers (`stage_server.sessions`), measured profiling (`moirai.profile.measured`) and
the in-process reference run (`moirai.runtime.sequential`) all build their sessions here, so a
profile times what serving runs. A model's weights stay in their files (`moirai.weights`): a
stage's session maps the weights of its own nodes and no others.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort

from moirai.devices import CPU, CUDA, available_cores
from moirai.errors import ModelError, MoiraiError, one_line
from moirai.stageplan import DeviceSpec
from moirai.weights import ort_session

STAGE_SERVER_OVERHEAD_BYTES = 128 * 2**20
"""Host memory a stage server holds besides its sessions' weights and activations: Python, ONNX
Runtime, gRPC and their libraries. Measured at 107 MiB peak resident for a one-stage server of a
one-node model (`bench/largemodels.py`); the planner reserves this much of every CPU device's
memory for it, so a device's tasks plus this are what its stage server peaks at."""


def create_session(
    model: onnx.ModelProto,
    device: DeviceSpec,
    *,
    threads: int | None = None,
    cuda_device: int | None = None,
    spin: bool = True,
) -> ort.InferenceSession:
    """A session running `model` on `device`; `threads`/`cuda_device` override the plan's;
    `spin=False`: its threads never spin, even on cores of their own (`session_options`).
    A model that ONNX Runtime refuses (an operator it lacks, an opset it does not know) is a
    `ModelError` in one line: a stage server used to die of it in a traceback, after planning
    had placed the model node by node (`moirai.fusion`)."""
    options = session_options(threads if threads is not None else device.threads, spin=spin)
    try:
        return device_session(model, options, device, cuda_device, prepack=device.prepack)
    except MoiraiError:
        raise
    except Exception as e:  # ORT raises its own exception types, without a common base
        raise ModelError(
            f"ONNX Runtime cannot run {model.graph.name or 'the model'!r} on {device.name}: "
            + one_line(e, 300)
        ) from None


def device_session(
    model: onnx.ModelProto,
    options: ort.SessionOptions,
    device: DeviceSpec,
    cuda_device: int | None = None,
    *,
    prepack: bool = True,
) -> ort.InferenceSession:
    """`model` in a session on `device`'s providers. ONNX Runtime starts a session without its
    CUDA provider when that provider's libraries do not load (a CUDA or cuDNN other than the
    one onnxruntime-gpu was built for), saying so only in a warning that stage sessions do not
    log: a GPU device would then serve, and be profiled, on the CPU. That is an error here."""
    session = ort_session(model, options, execution_providers(device, cuda_device), prepack=prepack)
    if device.kind == "gpu" and CUDA not in session.get_providers():
        raise MoiraiError(cuda_not_started(device))
    return session


def cuda_not_started(device: DeviceSpec) -> str:
    """Why a GPU device's session has no CUDA provider, and what to check."""
    from onnxruntime.capi import build_and_package_info as build

    cuda = getattr(build, "cuda_version", None) or "the version it was built for"
    library = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    return (
        f"device {device.name} is a GPU, but ONNX Runtime {ort.__version__} could not start its "
        f"CUDA provider: it needs the NVIDIA driver, CUDA {cuda} and cuDNN 9 on the library "
        f"path (`ldd {library}` names what is missing)"
    )


def session_options(threads: int | None, *, spin: bool = True) -> ort.SessionOptions:
    """The options of every stage session (module docstring); measured profiling starts from
    them too, so that it times what the stage servers run. `spin=False` where the caller knows
    that other sessions share the cores (several stage servers unpinned, or several models on
    one device): spinning threads would take them from each other."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    spin = spin and spins(threads)
    options.add_session_config_entry("session.intra_op.allow_spinning", str(int(spin)))
    if spin:  # between the parallel sections of a run, not for long after it (module docstring)
        options.add_session_config_entry("session.force_spinning_stop", "1")
    if threads:
        options.intra_op_num_threads = threads
    return options


def spins(threads: int | None) -> bool:
    """Whether a session of `threads` intra-op threads, built in the calling thread, lets them
    spin: when they are several and exactly the cores the calling thread may run on (the threads
    ONNX Runtime starts inherit its cores). `None` (ONNX Runtime's choice) never spins."""
    return threads is not None and threads > 1 and threads == len(available_cores())


def execution_providers(
    device: DeviceSpec, cuda_device: int | None = None
) -> list[str | tuple[str, dict[str, str]]]:
    """The providers of a device: CUDA with its device id (CPU for what CUDA lacks), or CPU."""
    if device.kind != "gpu":
        return [CPU]
    if CUDA not in ort.get_available_providers():
        raise MoiraiError(
            f"device {device.name} is a GPU, but this ONNX Runtime has no CUDA provider: "
            "install onnxruntime-gpu (the `gpu` extra) or plan for CPU devices only"
        )
    ordinal = cuda_device if cuda_device is not None else (device.device_id or 0)
    return [(CUDA, {"device_id": str(ordinal)}), CPU]
