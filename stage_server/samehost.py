"""The chain's same-host fast path: pushes over a Unix socket, large tensors in shared memory.

gRPC is the chain's general transport, but in Python each unary call costs about half a
millisecond of CPU on each side (measured: bench/results/runtime.md), which on a plan of many
small stages is as much as the stages' own compute; and a large tensor is copied several times
into freshly allocated memory on its way through it. When the sender and the receiver share a
host (`moirai serve`, where every server listens on loopback), neither is necessary:

- every chain port also listens on a Unix socket in the abstract namespace, named after the port
  (`socket_name`). Abstract sockets belong to the network namespace, exactly like the loopback
  address the sender would otherwise dial, have no file to clean up, and vanish with their
  process. A push is one frame, `<u32 length><PushRequest bytes>` (the very bytes gRPC would
  carry, `stage_server.wire`), answered by one ack frame in order, `<u32 length><code>\\0<message>`
  with an empty code for success, so the sender keeps a FIFO of waiting pushes and needs no ids;
- tensors of `SHARED_MIN_BYTES` and more travel in shared memory (`stage_server.shm`): the
  sender writes them into memory files of the connection's pool, the receiver copies them out
  before it acks, and the ack returns the files to the pool; both ends free everything when the
  connection ends.

A push keeps the chain's semantics: it carries the request's deadline and waits for its ack at
most until then; the receiver's errors come back with their status code; a broken connection is
UNAVAILABLE, like an unreachable gRPC peer. A peer that cannot map the sender's memory (not the
same user or pid namespace) answers FAILED_PRECONDITION, and gets inline bytes from then on.
`stage_server.chain.Peers` picks the fast path for loopback peers that accept a connection, and
gRPC for everything else.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import struct
import sys
from collections.abc import Callable

from stage_server import shm
from stage_server.errors import ServingError, Unavailable, from_code, status_of

log = logging.getLogger(__name__)

SUPPORTED = sys.platform == "linux"
"""Abstract Unix sockets are Linux's; elsewhere every push takes gRPC."""
SHARED_MIN_BYTES = 64 << 10
"""Tensors from this size on travel in shared memory: below it, the four system calls on each
side cost more than copying the bytes through the socket (measured: 64 KiB is already faster)."""
_LENGTH = struct.Struct("<I")
_DRAIN_ABOVE = 1 << 20  # bytes buffered for the socket before a push waits for it to drain
_READ_LIMIT = 16 << 20
"""How much a receiving connection buffers before it pauses the socket: asyncio's default
(64 KiB) would read a large inline push (a peer that cannot map shared memory) in thousands of
pause/resume round trips."""


def socket_name(port: int) -> str:
    """The abstract Unix socket of the chain port `port` in this network namespace."""
    return f"\0moirai-chain-{port}"


def _ack(error: BaseException | None) -> bytes:
    if error is None:
        return _LENGTH.pack(0)
    code = status_of(error)[0].name
    message = str(error) if isinstance(error, ServingError) else f"{type(error).__name__}: {error}"
    body = f"{code}\0{message}".encode()
    return _LENGTH.pack(len(body)) + body


class Listener:
    """The receiving side: serves pushes on the Unix socket of a chain port."""

    def __init__(self, receive: Callable[[bytes, shm.Mappings], None]) -> None:
        """`receive` decodes and delivers one push with the connection's mappings of the
        sender's shared memory (`ChainServicer.receive`); what it raises goes back to the
        sender with its status code."""
        self._receive = receive
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.StreamWriter] = set()

    async def start(self, port: int) -> None:
        self._server = await asyncio.start_unix_server(
            self._serve, socket_name(port), limit=_READ_LIMIT
        )

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        mappings = shm.Mappings()
        try:
            while True:
                (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
                payload = await reader.readexactly(length)
                try:
                    self._receive(payload, mappings)
                    writer.write(_ack(None))
                except Exception as error:  # every failure goes back to its sender
                    writer.write(_ack(error))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the sender went away
        finally:
            self._connections.discard(writer)
            mappings.close()
            writer.close()

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._connections):
            writer.close()
        await self._server.wait_closed()


class Connection:
    """The sending side to one peer: pushes in order, each waiting for its ack."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        # Per push sent and not yet acked: its waiter, and the pool's files it uses.
        self._waiting: collections.deque[tuple[asyncio.Future[None], list[shm.SharedTensor]]]
        self._waiting = collections.deque()
        self.pool = shm.Pool()
        self._acks = asyncio.get_running_loop().create_task(self._read_acks(reader))
        self.closed = False

    @classmethod
    async def open(cls, port: int) -> Connection | None:
        """A connection to the chain port `port` on this host, or None when nothing listens."""
        try:
            reader, writer = await asyncio.open_unix_connection(socket_name(port))
        except OSError:
            return None
        return cls(reader, writer)

    async def push(
        self, payload: bytes, timeout_s: float, shared: list[shm.SharedTensor] | None = None
    ) -> None:
        """Send one push and wait for its ack (at most `timeout_s`); raise the peer's error.

        The push's files from `pool` (`shared`) go back to it at the ack, which may come after
        this call gave up: until then the receiver may still read them."""
        if self.closed:
            for tensor in shared or ():
                tensor.close()
            raise Unavailable("the connection is closed")
        ack = asyncio.get_running_loop().create_future()
        self._waiting.append((ack, shared or []))
        self._writer.writelines([_LENGTH.pack(len(payload)), payload])
        if self._writer.transport.get_write_buffer_size() > _DRAIN_ABOVE:
            await self._writer.drain()
        await asyncio.wait_for(ack, timeout_s)

    async def _read_acks(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
                body = await reader.readexactly(length) if length else b""
                ack, shared = self._waiting.popleft()
                self.pool.give_back(shared)
                if ack.done():  # its push gave up (deadline); the ack still arrives in order
                    continue
                if body:
                    code, _, message = body.decode(errors="replace").partition("\0")
                    ack.set_exception(from_code(code, message))
                else:
                    ack.set_result(None)
        except (asyncio.IncompleteReadError, ConnectionError, IndexError) as e:
            self._fail(Unavailable(f"connection lost ({type(e).__name__})"))
        finally:
            self.closed = True
            self._writer.close()

    def _fail(self, error: ServingError) -> None:
        while self._waiting:
            ack, shared = self._waiting.popleft()
            for tensor in shared:
                tensor.close()
            if not ack.done():
                ack.set_exception(error)
        self.pool.close()

    async def close(self) -> None:
        self.closed = True
        self._writer.close()
        self._acks.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._acks
        self._fail(Unavailable("the connection is closed"))
