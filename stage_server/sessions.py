"""ONNX Runtime sessions for one device of a stage plan.

A CPU device gets the CPU execution provider with its own intra-op thread count (one inter-op
thread, sequential execution, no spinning: the stage servers of several CPU devices share one
machine, and a spinning pool would steal the cores of its neighbours). A GPU device gets the CUDA
execution provider with its device id, falling back to the CPU provider only for operators CUDA
lacks; when this ONNX Runtime build has no CUDA provider, that is an error the user can act on
rather than a silent run on the CPU.

A stage server runs each session as a `StageSession`: outputs whose size the plan knows and
that are large enough for shared memory (`stage_server.samehost.SHARED_MIN_BYTES`) are bound
(ONNX Runtime's IOBinding) to arrays of the server's `stage_server.shm.Arena`, so the stage
writes them straight into the memory files that a same-host push then references, and inputs
are bound where they lie (the receiver's mappings of the sender's files): no tensor is copied
between two stages on one host. Other outputs are ONNX Runtime's own arrays, as
`InferenceSession.run` returns them; on a gRPC push an arena array is only reused memory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from moirai.errors import MoiraiError
from moirai.stageplan import DeviceSpec, TensorSpec
from stage_server import codec, samehost, shm


def create_session(
    model: onnx.ModelProto,
    device: DeviceSpec,
    *,
    threads: int | None = None,
    cuda_device: int | None = None,
) -> ort.InferenceSession:
    """A session running `model` on `device`; `threads`/`cuda_device` override the plan's."""
    options = session_options(threads if threads is not None else device.threads)
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=execution_providers(device, cuda_device)
    )


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


class StageSession:
    """One stage's session, its large outputs of static shape written into shared memory."""

    def __init__(
        self, session: ort.InferenceSession, outputs: Sequence[TensorSpec], arena: shm.Arena | None
    ) -> None:
        """`outputs`: the stage's outputs as the plan types them (a dimension of -1: unknown);
        `arena`: where large outputs go, or None to let ONNX Runtime allocate all."""
        self.session = session
        self._names = [t.name for t in outputs]
        self._arena = arena
        self._shared = {
            t.name: (codec.DTYPES[t.datatype], t.shape)
            for t in outputs
            if arena is not None
            and t.datatype in codec.DTYPES  # else the push rejects it, as it always did
            and min(t.shape, default=0) >= 0
            and codec.nbytes(t.name, t.datatype, t.shape) >= samehost.SHARED_MIN_BYTES
        }

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs, in the order of the plan; arena arrays come back read-only."""
        if not self._shared:
            return self.session.run(self._names, dict(feeds))
        assert self._arena is not None
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        arrays: dict[str, np.ndarray] = {}
        for name in self._names:
            typed = self._shared.get(name)
            if typed is None:
                binding.bind_output(name)
                continue
            array = arrays[name] = self._arena.empty(*typed)
            binding.bind_output(name, "cpu", 0, array.dtype, array.shape, array.ctypes.data)
        self.session.run_with_iobinding(binding)
        outputs = []
        for name, value in zip(self._names, binding.get_outputs(), strict=True):
            array = arrays.get(name)
            if array is None:
                array = value.numpy()
            else:
                array.flags.writeable = False
            outputs.append(array)
        return outputs
