"""ONNX Runtime sessions for one device of a stage plan, built the same way everywhere.

A CPU device gets the CPU execution provider with its own intra-op thread count (one inter-op
thread, sequential execution, no spinning: the stage servers of several CPU devices share one
machine, and a spinning pool would steal the cores of its neighbours). A GPU device gets the CUDA
execution provider with its device id, falling back to the CPU provider only for operators CUDA
lacks; when this ONNX Runtime build has no CUDA provider, that is an error the user can act on
rather than a silent run on the CPU.

The stage servers (`stage_server.sessions`), measured profiling (`moirai.profile.measured`) and
the in-process reference run (`moirai.runtime.sequential`) all build their sessions here, so a
profile times what serving runs. A model's weights stay in their files (`moirai.weights`): a
stage's session maps the weights of its own nodes and no others.
"""

from __future__ import annotations

import onnx
import onnxruntime as ort

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
) -> ort.InferenceSession:
    """A session running `model` on `device`; `threads`/`cuda_device` override the plan's.
    A model that ONNX Runtime refuses (an operator it lacks, an opset it does not know) is a
    `ModelError` in one line: a stage server used to die of it in a traceback, after planning
    had placed the model node by node (`moirai.fusion`)."""
    options = session_options(threads if threads is not None else device.threads)
    try:
        return ort_session(
            model, options, execution_providers(device, cuda_device), prepack=device.prepack
        )
    except MoiraiError:
        raise
    except Exception as e:  # ORT raises its own exception types, without a common base
        raise ModelError(
            f"ONNX Runtime cannot run {model.graph.name or 'the model'!r} on {device.name}: "
            + one_line(e, 300)
        ) from None


def session_options(threads: int | None) -> ort.SessionOptions:
    """The options of every stage session (module docstring); measured profiling starts from
    them too, so that it times what the stage servers run."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    return options


def execution_providers(
    device: DeviceSpec, cuda_device: int | None = None
) -> list[str | tuple[str, dict[str, str]]]:
    """The providers of a device: CUDA with its device id (CPU for what CUDA lacks), or CPU."""
    if device.kind != "gpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise MoiraiError(
            f"device {device.name} is a GPU, but this ONNX Runtime has no CUDA provider: "
            "install onnxruntime-gpu (the `gpu` extra) or plan for CPU devices only"
        )
    ordinal = cuda_device if cuda_device is not None else (device.device_id or 0)
    return [("CUDAExecutionProvider", {"device_id": str(ordinal)}), "CPUExecutionProvider"]
