"""The same-host fast path: a tensor handed over in shared memory instead of inside the push.

When the sender and the receiver of a push run on one host (`moirai serve`: every server on
loopback), a large tensor need not travel through gRPC at all, where it is copied several times
into freshly allocated memory. The sender writes it once into an anonymous memory file
(`memfd_create`) and the push carries only a reference: the sender's pid, its descriptor of the
file and the file's inode. While the push is in flight, the receiver opens the file through
`/proc/<pid>/fd/<fd>`, checks the inode (so a descriptor number that was closed and reused can
never hand over the wrong tensor), maps it read-only and gives the stage a numpy array over the
mapping, with no copy at all.

Cleanup needs no bookkeeping, which is the point of this design: the file has no name anywhere,
the sender closes its descriptor as soon as the push returns (delivered or failed), the receiver
closes its descriptor right after mapping, and the kernel frees the memory when the last mapping
goes, which is when the request's arrays are dropped: after the stage ran, or when the request
failed, expired or was cancelled and its state was freed. A crash of either process frees its
side with the process. Nothing can be left behind in `/dev/shm` or elsewhere.

Opening another process's descriptor needs the same user and the same pid namespace (the
kernel's ptrace read check); where that fails (containers that do not share them, another host
behind a loopback proxy), the receiver raises `SharedMemoryUnavailable` and the sender falls back
to inline bytes for that peer for good.
"""

from __future__ import annotations

import contextlib
import mmap
import os

import numpy as np

from stage_server import codec
from stage_server.errors import SharedMemoryUnavailable
from stage_server.protos import stage_pb2

SUPPORTED = hasattr(os, "memfd_create") and hasattr(mmap, "MAP_POPULATE")
"""Whether this platform has the fast path (Linux); elsewhere every tensor travels inline."""
_PID = os.getpid()  # servers never fork after import; one system call less per tensor


class SharedTensor:
    """The sender's side: a tensor's bytes in a memory file, open until `close`."""

    def __init__(self, name: str, array: np.ndarray) -> None:
        data = codec.raw_bytes(array)
        self._fd = os.memfd_create(f"moirai-{name}", os.MFD_CLOEXEC)
        try:
            written = 0
            while written < data.nbytes:  # write() may stop short of very large buffers
                written += os.write(self._fd, data[written:])
            self.reference = stage_pb2.SharedMemory(
                pid=_PID, fd=self._fd, inode=os.fstat(self._fd).st_ino
            )
        except BaseException:
            os.close(self._fd)
            raise

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def attach(reference: stage_pb2.SharedMemory, nbytes: int) -> mmap.mmap:
    """The receiver's side: a read-only mapping of `nbytes` shared by the sender.

    The mapping is populated at once (one system call instead of a page fault per page) and
    unmapped when the last array over it is garbage-collected."""
    path = f"/proc/{reference.pid}/fd/{reference.fd}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise SharedMemoryUnavailable(f"cannot open the sender's shared tensor: {e}") from None
    try:
        stat = os.fstat(fd)
        if stat.st_ino != reference.inode or stat.st_size != nbytes:
            raise SharedMemoryUnavailable(
                f"{path} is not the shared tensor the push names (inode {stat.st_ino}, "
                f"{stat.st_size} bytes; expected inode {reference.inode}, {nbytes} bytes)"
            )
        return mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
