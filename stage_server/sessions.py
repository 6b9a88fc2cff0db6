"""ONNX Runtime sessions for one device of a stage plan.

Sessions are built by `moirai.sessions` (options and providers per device kind), which measured
profiling shares, so that a profile times what the stage servers run.

A stage server runs each session as a `StageSession`: outputs large enough for shared memory
(`stage_server.samehost.SHARED_MIN_BYTES`) whose size is known before the run (from the plan,
or for a dynamic output from an earlier run at the same input shapes) are bound (ONNX Runtime's
IOBinding) to arrays of the server's `stage_server.shm.Arena`, so the stage writes them straight
into the memory files that a same-host push then references, and inputs are bound where they lie
(the receiver's mappings of the sender's files): no tensor is copied between two stages on one
host. A large final output that a client asked for in its shared memory (`places`) is bound
there instead, when its shape is known and the place fits (`codec.array_at`): the front end then
copies nothing. Other outputs are ONNX Runtime's own arrays, as `InferenceSession.run` returns
them; on a gRPC push an arena array is only reused memory.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np
import onnxruntime as ort

from moirai.sessions import create_session, execution_providers, session_options
from moirai.stageplan import TensorSpec
from stage_server import codec, samehost, shm

__all__ = ["StageSession", "create_session", "execution_providers", "session_options"]


class StageSession:
    """One stage's session, its large outputs written into shared memory.

    An output of static shape is bound to an arena array from the first run on. An output with
    a dimension the plan leaves open (-1: a dynamic batch, say) cannot be allocated before ONNX
    Runtime has computed its shape, so the first run at given input shapes lets ONNX Runtime
    allocate it (a same-host push then copies it once into shared memory), and the session
    remembers the output shapes those input shapes gave: later runs at the same input shapes
    (the same batch size again) bind arena arrays of those shapes, and the copy is gone. Should a
    remembered shape not hold (an output whose size depends on the data, not only on the input
    shapes), ONNX Runtime refuses the binding, the run is repeated with its own allocation, and
    that output is never bound again.
    """

    SEEN_SHAPES = 64
    """Input shapes whose output shapes a session remembers (the most recently used)."""

    def __init__(
        self, session: ort.InferenceSession, outputs: Sequence[TensorSpec], arena: shm.Arena | None
    ) -> None:
        """`outputs`: the stage's outputs as the plan types them (a dimension of -1: unknown);
        `arena`: where large outputs go, or None to let ONNX Runtime allocate all."""
        self.session = session
        self._names = [t.name for t in outputs]
        self._arena = arena
        # Outputs that can go to the arena: those of a fixed-size datatype (`codec.DTYPES`). A
        # string output (BYTES) is never bound: its elements are Python objects, and the arena's
        # buffers are fixed-size; ONNX Runtime allocates it, and it travels inline.
        large = {  # outputs of static shape large enough to be worth binding
            t.name: (codec.DTYPES[t.datatype], tuple(t.shape))
            for t in outputs
            if t.datatype in codec.DTYPES
            and min(t.shape, default=0) >= 0
            and codec.nbytes(t.name, t.datatype, t.shape) >= samehost.SHARED_MIN_BYTES
        }
        self._placeable = large
        self._fixed = large if arena is not None else {}
        typed = [t for t in outputs if arena is not None and t.datatype in codec.DTYPES]
        self._open = {t.name: codec.DTYPES[t.datatype] for t in typed if -1 in t.shape}
        self._seen: OrderedDict[tuple[tuple[int, ...], ...], dict[str, tuple[int, ...]]] = (
            OrderedDict()
        )
        self._unstable: set[str] = set()
        self._lock = threading.Lock()  # stage servers with workers > 1 run from several threads

    def run(
        self, feeds: Mapping[str, np.ndarray], places: Mapping[str, memoryview] | None = None
    ) -> list[np.ndarray]:
        """The outputs, in the order of the plan; bound arrays (arena, `places`) come back
        read-only. `places`: where outputs go in a client's shared memory."""
        key = tuple(a.shape for a in feeds.values()) if self._open else None
        guessed = self._guess(key) if key is not None else {}
        shared = {**self._fixed, **guessed} if guessed else self._fixed
        placed = self._placed(places, guessed) if places else {}
        if not shared and not placed:
            outputs = self.session.run(self._names, dict(feeds))
        else:
            try:
                outputs = self._run_bound(feeds, shared, placed)
            except Exception:
                if not guessed and not placed:
                    raise
                outputs = self.session.run(self._names, dict(feeds))  # a real error raises again
                self._distrust(guessed, outputs)
        if key is not None and not guessed:
            self._remember(key, outputs)
        return outputs

    def _placed(
        self, places: Mapping[str, memoryview], guessed: Mapping[str, tuple[np.dtype, tuple]]
    ) -> dict[str, np.ndarray]:
        """Arrays over the places of large outputs whose shapes are known, where they fit."""
        arrays = {}
        for name, place in places.items():
            typed = self._placeable.get(name) or guessed.get(name)
            array = None if typed is None else codec.array_at(place, *typed)
            if array is not None:
                arrays[name] = array
        return arrays

    def _guess(self, key: tuple[tuple[int, ...], ...]) -> dict[str, tuple[np.dtype, tuple]]:
        """Large open outputs with the shapes these input shapes gave before."""
        with self._lock:
            seen = self._seen.get(key)
            if seen is None:
                return {}
            self._seen.move_to_end(key)
            return {
                name: (self._open[name], shape)
                for name, shape in seen.items()
                if name not in self._unstable
                and math.prod(shape) * self._open[name].itemsize >= samehost.SHARED_MIN_BYTES
            }

    def _remember(self, key: tuple[tuple[int, ...], ...], outputs: Sequence[np.ndarray]) -> None:
        shapes = {
            name: array.shape
            for name, array in zip(self._names, outputs, strict=True)
            if name in self._open
        }
        with self._lock:
            self._seen[key] = shapes
            if len(self._seen) > self.SEEN_SHAPES:
                self._seen.popitem(last=False)

    def _distrust(
        self, guessed: Mapping[str, tuple[np.dtype, tuple]], outputs: Sequence[np.ndarray]
    ) -> None:
        """A bound run failed and ONNX Runtime's own succeeded: the outputs whose shape changed
        at the same input shapes depend on the data; never bind them again."""
        got = dict(zip(self._names, outputs, strict=True))
        with self._lock:
            self._unstable.update(n for n, (_, shape) in guessed.items() if got[n].shape != shape)

    def _run_bound(
        self,
        feeds: Mapping[str, np.ndarray],
        shared: Mapping[str, tuple[np.dtype, tuple]],
        placed: Mapping[str, np.ndarray],
    ) -> list[np.ndarray]:
        """A run with outputs bound to `placed` arrays, else to new arena arrays (`shared`),
        else to ONNX Runtime's own."""
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        arrays: dict[str, np.ndarray] = {}
        for name in self._names:
            array = placed.get(name)
            if array is None:
                typed = shared.get(name)
                if typed is None:
                    binding.bind_output(name)
                    continue
                assert self._arena is not None
                array = self._arena.empty(*typed)
            arrays[name] = array
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
