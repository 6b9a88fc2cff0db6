"""Keep freed memory for reuse in a server process, so large tensors cost no page faults.

A stage server or gateway allocates and frees buffers of the request's tensor sizes on every
request, in gRPC, protobuf, numpy and ONNX Runtime alike. glibc's malloc serves each large one
with a fresh `mmap` and unmaps it on `free`, so every request pays a page fault per 4 KiB of every
large buffer; on the virtual machines measured that is most of the cost of a large tensor
(bench/runtime.py, 16 MiB: the gateway's CPU per request 55 ms, 30 ms with this). Serving
buffers up to `MMAP_THRESHOLD_BYTES` (glibc's largest) from the heap and keeping up to
`KEEP_FREED_BYTES` of freed memory at its top lets the next request reuse the same pages.
Larger buffers still get their own mappings: turning `mmap` off altogether (glibc.malloc.mmap_max
0) saves more at 64 MiB, but leaves a thread's arena no way to serve a buffer larger than
itself.

The price is memory: a server may hold that much freed memory. `GLIBC_TUNABLES` set in the
environment (glibc.malloc.mmap_threshold, glibc.malloc.trim_threshold) takes precedence;
elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import os

KEEP_FREED_BYTES = 1 << 30
MMAP_THRESHOLD_BYTES = 32 << 20
"""glibc's largest: buffers up to this size come from the heap."""
_M_TRIM_THRESHOLD = -1  # mallopt parameters, <malloc.h>
_M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Tune this process's malloc (module docstring); whether it was tuned."""
    if "GLIBC_TUNABLES" in os.environ:
        return False
    try:
        # The process's own symbols, not `ctypes.util.find_library`: that runs `ldconfig` in a
        # child process, and a fork after gRPC started its threads breaks gRPC's poller.
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES)
    )
