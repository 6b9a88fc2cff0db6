"""ONNX Runtime sessions for one device of a stage plan.

Sessions are built by `moirai.sessions` (options and providers per device kind), which measured
profiling shares, so that a profile times what the stage servers run.

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
import onnxruntime as ort

from moirai.sessions import create_session, execution_providers, session_options
from moirai.stageplan import TensorSpec
from stage_server import codec, samehost, shm

__all__ = ["StageSession", "create_session", "execution_providers", "session_options"]


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
