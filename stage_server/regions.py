"""Clients' shared memory: the Open Inference Protocol's system shared-memory extension.

A client on the same host may hand its tensors over in shared memory instead of in the request,
as with Triton (`tritonclient.utils.shared_memory`, `perf_analyzer --shared-memory system`): it
creates a POSIX shared-memory object (`/dev/shm/<key>`), registers a region of it under a name
(`SystemSharedMemoryRegister`, or `POST /v2/systemsharedmemory/region/<name>/register`), and then
names the region, a byte size and an offset in an input's parameters (`shared_memory_region`,
`shared_memory_byte_size`, `shared_memory_offset`), or in a requested output's, where the front
end then writes that output instead of returning its bytes. A request then carries a few hundred
bytes whatever the size of its tensors: the front end reads the inputs where the client wrote
them (a view over the mapping, no copy) and copies each such output once.

The front end maps what a remote caller names, so the extension is off unless the endpoint was
started with `--allow-shared-memory` (every call is refused, PERMISSION_DENIED / 403, saying
so), and takes only a regular file directly in `/dev/shm`, owned by this server's user, not
through a symbolic link. Anyone allowed to call the endpoint can then read and write such files
through a model; turn it on for clients of the same host that are trusted as this user is. A
client that shrinks an object it registered (ftruncate) takes the server down at the next read
of the lost pages (SIGBUS), as with Triton: the mapping cannot be guarded against that.

A region's mapping lives until it is unregistered and the last request reading it is done
(arrays over it keep it alive), so unregistering never pulls memory from under a request.
"""

from __future__ import annotations

import mmap
import os
import re
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from stage_server.errors import AlreadyExists, InvalidInput, NotAllowed, NotFound

SHM_DIR = "/dev/shm"
_KEY = re.compile(r"/?[A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class Region:
    """A registered region: `byte_size` bytes at `offset` of the shared-memory object `key`."""

    name: str
    key: str
    offset: int
    byte_size: int
    view: memoryview


class SharedMemoryRegions:
    """The regions the clients of one front end registered, by name."""

    def __init__(self, allowed: bool = False) -> None:
        self.allowed = allowed
        self._regions: dict[str, Region] = {}
        self._lock = threading.Lock()

    def _check_allowed(self) -> None:
        if not self.allowed:
            raise NotAllowed(
                "shared memory is off on this endpoint: start it with --allow-shared-memory "
                "for clients on its host, or send tensors in the request"
            )

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        self._check_allowed()
        if not name:
            raise InvalidInput("shared memory region: give it a name")
        if not _KEY.fullmatch(key) or key.strip("/") in (".", ".."):
            raise InvalidInput(
                f"shared memory region {name!r}: key {key!r} is not the name of a POSIX "
                "shared-memory object (e.g. /input0: letters, digits, '_', '.', '-')"
            )
        if offset < 0 or byte_size <= 0:
            raise InvalidInput(
                f"shared memory region {name!r}: offset {offset} and byte_size {byte_size}: "
                "give an offset >= 0 and a byte_size > 0"
            )
        view = _map(name, key, offset, byte_size)
        with self._lock:
            if name in self._regions:
                raise AlreadyExists(
                    f"shared memory region {name!r} is registered already: unregister it first"
                )
            self._regions[name] = Region(name, key, offset, byte_size, view)

    def unregister(self, name: str = "") -> None:
        """Forget region `name`, or every region (`name` empty); an unknown name is no error,
        as in Triton."""
        self._check_allowed()
        with self._lock:
            if name:
                self._regions.pop(name, None)
            else:
                self._regions.clear()

    def status(self, name: str = "") -> list[Region]:
        """Region `name`, or every region (`name` empty)."""
        self._check_allowed()
        with self._lock:
            if not name:
                return list(self._regions.values())
            if name not in self._regions:
                raise NotFound(f"no shared memory region {name!r} is registered")
            return [self._regions[name]]

    def view(self, who: str, name: str, byte_size: int, offset: int = 0) -> memoryview:
        """`byte_size` bytes at `offset` of region `name`, for tensor `who` of a request."""
        self._check_allowed()
        region = self._regions.get(name)
        if region is None:
            raise InvalidInput(f"{who}: no shared memory region {name!r} is registered")
        if offset < 0 or byte_size < 0 or offset + byte_size > region.byte_size:
            raise InvalidInput(
                f"{who}: {byte_size} bytes at offset {offset} do not fit in shared memory "
                f"region {name!r} ({region.byte_size} bytes)"
            )
        return region.view[offset : offset + byte_size]


def _map(name: str, key: str, offset: int, byte_size: int) -> memoryview:
    """A writable view of `byte_size` bytes at `offset` of `/dev/shm/<key>`, checked."""
    path = os.path.join(SHM_DIR, key.lstrip("/"))
    with _opened(name, key, path) as fd:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            raise InvalidInput(
                f"shared memory region {name!r}: {path} is not a regular file of this server's user"
            )
        if offset + byte_size > info.st_size:
            raise InvalidInput(
                f"shared memory region {name!r}: {byte_size} bytes at offset {offset} pass the "
                f"end of {path} ({info.st_size} bytes)"
            )
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        mapping = mmap.mmap(fd, offset + byte_size - start, offset=start)
    return memoryview(mapping)[offset - start :]


@contextmanager
def _opened(name: str, key: str, path: str) -> Iterator[int]:
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise InvalidInput(
            f"shared memory region {name!r}: cannot open key {key!r} ({e.strerror}): create "
            "it first (shm_open), on this server's host"
        ) from None
    try:
        yield fd
    finally:
        os.close(fd)
