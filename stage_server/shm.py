"""The same-host fast path's shared memory: large tensors handed over beside the push.

When the sender and the receiver of a push run on one host (`stage_server.samehost`), a large
tensor need not travel through the socket, where it would be copied into kernel buffers and out
again into freshly allocated memory. It lies in an anonymous memory file (`memfd_create`) and
the push carries only a reference: the sender's pid, its descriptor of the file and the file's
inode. The receiver opens the file through `/proc/<pid>/fd/<fd>`, checks the inode (so a
descriptor number that was closed and reused can never hand over the wrong tensor), maps it, and
gives the stage a read-only numpy array over the mapping: no copy at all.

A stage's large outputs of static shape are written there by ONNX Runtime itself: the stage
server's `Arena` hands out writable arrays over its files, the stage binds them as its outputs,
and a push of such an array references its file instead of copying it, so a tensor crosses a
hop without being copied anywhere. Any other array (the gateway's inputs, outputs of unknown
shape) is copied once into a file of the connection's `Pool`.

Memory is reused, which is what makes this fast: on a host where fresh memory costs a page fault
per 4 KiB (about 10 µs on the virtual machines measured), writing every tensor into a new file
costs more than the copy itself. So the arena and each connection's pool keep their files, and
each connection's receiver keeps its `Mappings` of them. A file is written again only when
nothing can read it any more: when the receiver released it (the last array over it was
garbage-collected: the stage ran, or the request failed, expired or was cancelled and its state
was dropped, and the receiver sent a release) and, for an arena file, when the sender's own
arrays over it are gone too (a file pushed to several peers waits for each release). A file
whose push failed, or whose connection ended, is never written again: the receiver may still
read it, and a release may still be on its way; it is closed once nothing of the sender's holds
it. Tensors larger than half the budget get a file of their own, closed when done and never
cached by the receiver.

Nothing outlives its use: the pool and the arena close their files, and the receiver forgets its
mappings, when the connection or the stage server ends (closed, broken, or its process gone); an
array still alive then keeps its mapping, and the kernel frees a file's memory with the last
descriptor or mapping. The files have no name anywhere, so nothing can be left behind in
`/dev/shm`; memory is bounded by the budgets of the idle files plus the tensors in use.

Opening another process's descriptor needs the same user and the same pid namespace (the
kernel's ptrace read check); where that fails (containers that do not share them), the receiver
raises `SharedMemoryUnavailable` and the sender falls back to inline bytes for that peer.
"""

from __future__ import annotations

import collections
import contextlib
import math
import mmap
import os
import threading
import weakref
from collections.abc import Callable, Iterable

import numpy as np

from stage_server import codec
from stage_server.errors import SharedMemoryUnavailable
from stage_server.protos import stage_pb2

SUPPORTED = hasattr(os, "memfd_create")
"""Whether this platform has memory files (Linux); elsewhere every tensor travels inline."""
POOL_BYTES = 256 << 20
"""Capacity of the idle files a connection's sender keeps for reuse, of those a stage server's
arena keeps, and of the mappings a connection's receiver keeps."""
_MIN_CAPACITY = 64 << 10
_PID = os.getpid()  # servers never fork after import; one system call less per tensor


def _capacity(nbytes: int) -> int:
    """Files come in powers of two, so that one fits the next tensor of about the same size."""
    return max(_MIN_CAPACITY, 1 << (nbytes - 1).bit_length())


class SharedTensor:
    """A memory file of the sender's: one tensor at a time, while its pushes are in flight."""

    def __init__(self, capacity: int, pooled: bool, arena: Arena | None = None) -> None:
        self.capacity = capacity
        self.pooled = pooled
        self.arena = arena
        self.holds = 0
        """Arena files: the sender's array over it (at most one) plus its pushes in flight."""
        self.retired = False
        """Arena files: never to be written again (a push of it failed, or its connection
        ended)."""
        self._fd = os.memfd_create("moirai-tensor", os.MFD_CLOEXEC)
        self._map: mmap.mmap | None = None
        self._whole: np.ndarray | None = None  # arena files: all of it, mapped writable
        try:
            os.ftruncate(self._fd, capacity)
            self.inode = os.fstat(self._fd).st_ino
            if arena is not None:
                self._map = mmap.mmap(self._fd, capacity, flags=mmap.MAP_SHARED)
                self._whole = np.frombuffer(self._map, np.uint8)
                _ARENA_FILES[self._whole.ctypes.data] = self
        except BaseException:
            self.close()
            raise

    @property
    def reference(self) -> stage_pb2.SharedMemory:
        """What a push carries instead of the tensor's bytes."""
        return stage_pb2.SharedMemory(pid=_PID, fd=self._fd, inode=self.inode, pooled=self.pooled)

    def write(self, array: np.ndarray) -> stage_pb2.SharedMemory:
        """Put `array` in the file; the reference the push carries."""
        data = codec.raw_bytes(array)
        written = 0
        while written < data.nbytes:  # pwrite may stop short of very large buffers
            written += os.pwrite(self._fd, data[written:], written)
        return self.reference

    def flat(self, dtype: np.dtype, count: int) -> np.ndarray:
        """A writable 1-D array over the start of an arena file, made straight over the mapping:
        numpy makes the base of every view of it (slices, reshapes, a batch's rows) this very
        array, so it lives, and the file is not written again, while any of them does. (Had it
        been a view of another array, its views would skip it for that array, and a slice
        could outlive it.)"""
        assert self._map is not None
        return np.frombuffer(self._map, dtype, count)

    def close(self) -> None:
        if self._whole is not None:
            del _ARENA_FILES[self._whole.ctypes.data]
            self._whole = None
        if self._map is not None:
            _unmap(self._map)
            self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


_ARENA_FILES: dict[int, SharedTensor] = {}
"""Arena files by the address of their mapping: how a pool knows an array that already lies in
shared memory."""


def _arena_file(array: np.ndarray) -> SharedTensor | None:
    """The arena file `array` lies at the start of, if any."""
    if not array.flags.c_contiguous or array.nbytes == 0:
        return None
    tensor = _ARENA_FILES.get(array.ctypes.data)
    return tensor if tensor is not None and array.nbytes <= tensor.capacity else None


class Arena:
    """A stage server's memory files for its stages' outputs, reused once nothing holds them.

    Thread-safe: stages may run in a thread pool, and an array may be collected in any
    thread."""

    def __init__(self, budget: int = POOL_BYTES) -> None:
        self._budget = budget
        self._lock = threading.Lock()
        self._idle: dict[int, list[SharedTensor]] = collections.defaultdict(list)
        self._idle_bytes = 0
        self._closed = False

    def empty(self, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """A writable array over a file of its own (no other array is over any part of it);
        pushing it to a peer on this host references the file instead of copying it."""
        capacity = _capacity(math.prod(shape) * dtype.itemsize)
        pooled = capacity <= self._budget // 2
        tensor = None
        with self._lock:
            if pooled and self._idle[capacity]:
                tensor = self._idle[capacity].pop()
                self._idle_bytes -= capacity
        if tensor is None:
            size = capacity if pooled else math.prod(shape) * dtype.itemsize
            tensor = SharedTensor(size, pooled, self)
        tensor.holds = 1
        flat = tensor.flat(dtype, math.prod(shape))
        weakref.finalize(flat, self.release, tensor)  # the base of every view of it
        return flat.reshape(shape)

    def lend(self, tensor: SharedTensor) -> None:
        """A push of the file is in flight."""
        with self._lock:
            tensor.holds += 1

    def release(self, tensor: SharedTensor, reuse: bool = True) -> None:
        """One holder of the file is done with it (`reuse` False: never write it again); when
        none is left, the file is idle or closed."""
        with self._lock:
            tensor.holds -= 1
            tensor.retired |= not reuse
            if tensor.holds:
                return
            if (
                tensor.pooled
                and not tensor.retired
                and not self._closed
                and self._idle_bytes + tensor.capacity <= self._budget
            ):
                self._idle[tensor.capacity].append(tensor)
                self._idle_bytes += tensor.capacity
                return
        tensor.close()

    def close(self) -> None:
        """Close the idle files; the others close when they are released."""
        with self._lock:
            self._closed = True
            idle = [tensor for tensors in self._idle.values() for tensor in tensors]
            self._idle.clear()
            self._idle_bytes = 0
        for tensor in idle:
            tensor.close()


class Pool:
    """The sender's side of one connection: memory files for arrays that do not already lie in
    an arena, reused once their push is released."""

    def __init__(self, budget: int = POOL_BYTES) -> None:
        self._budget = budget
        self._idle: dict[int, list[SharedTensor]] = collections.defaultdict(list)
        self._idle_bytes = 0
        self._closed = False

    def take(self, array: np.ndarray) -> tuple[SharedTensor, stage_pb2.SharedMemory]:
        """The file holding `array`, and its reference: the arena file it lies in, or a file of
        the pool it is copied into. Give it back once the receiver released it."""
        tensor = _arena_file(array)
        if tensor is not None:
            assert tensor.arena is not None
            tensor.arena.lend(tensor)
            return tensor, tensor.reference
        capacity = _capacity(array.nbytes)
        if capacity > self._budget // 2:
            tensor = SharedTensor(array.nbytes, pooled=False)
        else:
            idle = self._idle[capacity]
            if idle:
                tensor = idle.pop()
                self._idle_bytes -= capacity
            else:
                tensor = SharedTensor(capacity, pooled=True)
        try:
            return tensor, tensor.write(array)
        except BaseException:
            tensor.close()
            raise

    def give_back(self, tensors: Iterable[SharedTensor], reuse: bool = True) -> None:
        """The receiver is done with these: keep them for the next pushes, within budget.
        `reuse` False: it may still read them (a failed push, a lost connection), so they are
        never written again."""
        for tensor in tensors:
            if tensor.arena is not None:
                tensor.arena.release(tensor, reuse)
            elif (
                reuse
                and tensor.pooled
                and not self._closed
                and self._idle_bytes + tensor.capacity <= self._budget
            ):
                self._idle[tensor.capacity].append(tensor)
                self._idle_bytes += tensor.capacity
            else:
                tensor.close()

    def close(self) -> None:
        """Close the idle files; those given back later close then."""
        self._closed = True
        for idle in self._idle.values():
            for tensor in idle:
                tensor.close()
        self._idle.clear()
        self._idle_bytes = 0


class Mappings:
    """The receiver's side of one connection: its mappings of the sender's files."""

    def __init__(self, release: Callable[[int], None], budget: int = POOL_BYTES) -> None:
        """`release(inode)` tells the sender that no array over its file is left."""
        self._release = release
        self._budget = budget
        self._maps: collections.OrderedDict[tuple[int, int, int], mmap.mmap] = (
            collections.OrderedDict()
        )
        self._bytes = 0

    def read(self, reference: stage_pb2.SharedMemory, nbytes: int) -> np.ndarray:
        """A read-only array of the first `nbytes` of the file the reference names (as uint8),
        over the mapping itself; the file is released when the array and every array made
        from it are gone."""
        key = (reference.pid, reference.fd, reference.inode)
        mapping = self._maps.get(key)
        if mapping is None:
            mapping = _attach(reference, nbytes)
            if reference.pooled:
                self._remember(key, mapping)
        else:
            self._maps.move_to_end(key)
        if len(mapping) < nbytes:
            raise SharedMemoryUnavailable(
                f"the shared tensor holds {len(mapping)} bytes, the push names {nbytes}"
            )
        view = np.frombuffer(mapping, np.uint8, nbytes)
        weakref.finalize(view, self._release, reference.inode)
        return view

    def _remember(self, key: tuple[int, int, int], mapping: mmap.mmap) -> None:
        self._maps[key] = mapping
        self._bytes += len(mapping)
        while self._bytes > self._budget and len(self._maps) > 1:
            _, old = self._maps.popitem(last=False)
            self._bytes -= len(old)
            _unmap(old)

    def close(self) -> None:
        for mapping in self._maps.values():
            _unmap(mapping)
        self._maps.clear()
        self._bytes = 0


def _unmap(mapping: mmap.mmap) -> None:
    """Unmap now, or, while arrays over it live, when the last of them goes."""
    with contextlib.suppress(BufferError):
        mapping.close()


def _attach(reference: stage_pb2.SharedMemory, nbytes: int) -> mmap.mmap:
    path = f"/proc/{reference.pid}/fd/{reference.fd}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise SharedMemoryUnavailable(f"cannot open the sender's shared tensor: {e}") from None
    try:
        stat = os.fstat(fd)
        if stat.st_ino != reference.inode or stat.st_size < max(nbytes, 1):
            raise SharedMemoryUnavailable(
                f"{path} is not the shared tensor the push names (inode {stat.st_ino}, "
                f"{stat.st_size} bytes; expected inode {reference.inode}, {nbytes} bytes)"
            )
        return mmap.mmap(fd, stat.st_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
