"""The same-host fast path's shared memory: large tensors handed over beside the push.

When the sender and the receiver of a push run on one host (`stage_server.samehost`), a large
tensor need not travel through the socket, where it would be copied into kernel buffers and out
again into freshly allocated memory. The sender writes it into an anonymous memory file
(`memfd_create`) and the push carries only a reference: the sender's pid, its descriptor of the
file and the file's inode. The receiver opens the file through `/proc/<pid>/fd/<fd>`, checks the
inode (so a descriptor number that was closed and reused can never hand over the wrong tensor),
maps it, and gives the stage a read-only numpy array over the mapping: no copy at all.

Memory is reused, which is what makes this fast: on a host where fresh memory costs a page fault
per 4 KiB (about 10 µs on the virtual machines measured), writing every tensor into a new file
costs more than the copy itself. So each connection's sender keeps a `Pool` of files and each
connection's receiver keeps its `Mappings` of them. A file goes back to the pool when the
receiver releases it: when the last array over it is garbage-collected (the stage ran, or the
request failed, expired or was cancelled and its state was dropped), the receiver sends a
release, and only then may the sender write the file again. Tensors larger than half the pool's
budget get a file of their own, closed at the release and never cached by the receiver.

Nothing outlives its use: the pool closes its files, and the receiver forgets its mappings,
when the connection ends (closed, broken, or its process gone); an array still alive then keeps
its mapping, and the kernel frees a file's memory with the last descriptor or mapping. The files
have no name anywhere, so nothing can be left behind in `/dev/shm`; while a connection lives,
its memory is bounded by the pool's budget plus the tensors still held by the receiver.

Opening another process's descriptor needs the same user and the same pid namespace (the
kernel's ptrace read check); where that fails (containers that do not share them), the receiver
raises `SharedMemoryUnavailable` and the sender falls back to inline bytes for that peer.
"""

from __future__ import annotations

import collections
import contextlib
import mmap
import os
import weakref
from collections.abc import Callable

import numpy as np

from stage_server import codec
from stage_server.errors import SharedMemoryUnavailable
from stage_server.protos import stage_pb2

SUPPORTED = hasattr(os, "memfd_create")
"""Whether this platform has memory files (Linux); elsewhere every tensor travels inline."""
POOL_BYTES = 256 << 20
"""Capacity of the idle files a connection's sender keeps for reuse, and of the mappings its
receiver keeps."""
_MIN_CAPACITY = 64 << 10
_PID = os.getpid()  # servers never fork after import; one system call less per tensor


def _capacity(nbytes: int) -> int:
    """Files come in powers of two, so that one fits the next tensor of about the same size."""
    return max(_MIN_CAPACITY, 1 << (nbytes - 1).bit_length())


class SharedTensor:
    """A memory file of the sender's holding one tensor while its push is in flight."""

    def __init__(self, capacity: int, pooled: bool) -> None:
        self.capacity = capacity
        self.pooled = pooled
        self._fd = os.memfd_create("moirai-tensor", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self._fd, capacity)
            self.inode = os.fstat(self._fd).st_ino
        except BaseException:
            os.close(self._fd)
            raise

    def write(self, array: np.ndarray) -> stage_pb2.SharedMemory:
        """Put `array` in the file; the reference the push carries."""
        data = codec.raw_bytes(array)
        written = 0
        while written < data.nbytes:  # pwrite may stop short of very large buffers
            written += os.pwrite(self._fd, data[written:], written)
        return stage_pb2.SharedMemory(pid=_PID, fd=self._fd, inode=self.inode, pooled=self.pooled)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Pool:
    """The sender's side of one connection: memory files, reused once their push is acked."""

    def __init__(self, budget: int = POOL_BYTES) -> None:
        self._budget = budget
        self._idle: dict[int, list[SharedTensor]] = collections.defaultdict(list)
        self._idle_bytes = 0

    def take(self, array: np.ndarray) -> tuple[SharedTensor, stage_pb2.SharedMemory]:
        """A file holding `array`, and its reference; give it back once the receiver released
        it."""
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

    def give_back(self, tensors: list[SharedTensor]) -> None:
        """The receiver is done with these: keep them for the next pushes, within budget."""
        for tensor in tensors:
            if tensor.pooled and self._idle_bytes + tensor.capacity <= self._budget:
                self._idle[tensor.capacity].append(tensor)
                self._idle_bytes += tensor.capacity
            else:
                tensor.close()

    def close(self) -> None:
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
