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
  carry, `stage_server.wire`), answered in order by one ack frame, `A` alone for success or
  `A<code>\\0<message>`, so the sender keeps a FIFO of waiting pushes and needs no ids;
- tensors of `SHARED_MIN_BYTES` and more travel in shared memory (`stage_server.shm`): a stage
  output already lies in a memory file of the server's arena, anything else is written into a
  file of the connection's pool; the receiver's stage reads them where they lie, and when the
  last array over a file is gone the receiver sends a release frame, `R<u64 inode>`, which lets
  the sender write the file again; both ends let go of everything when the connection ends.

When the servers of a deployment share a chain token (`stage_server.auth`), a connection's first
frame is a hello carrying it; a listener with a token answers any other first frame with
UNAUTHENTICATED and closes the connection. Until then it reads no frame longer than a hello, and
after it none longer than its limit (the pushes it could hold), so a caller cannot make it buffer
more.

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
import struct
import sys
from collections.abc import Callable

from stage_server import auth, shm
from stage_server.errors import (
    ServingError,
    TooLarge,
    Unauthenticated,
    Unavailable,
    from_code,
    status_of,
)

SUPPORTED = sys.platform == "linux"
"""Abstract Unix sockets are Linux's; elsewhere every push takes gRPC."""
SHARED_MIN_BYTES = 128 << 10
"""Tensors from this size on travel in shared memory. Below it, the release frame and the
mapping's bookkeeping cost more than copying the bytes through the socket; above it, a frame
no longer fits one read of the receiver's transport (256 KiB) and inline bytes cost several
times more. Measured, CPU of both ends per push: 144 µs inline against 165 µs shared at 64 KiB,
about even at 96-128 KiB, 270 against 155 µs at 240 KiB and 850 against 160 µs at 255 KiB."""
_LENGTH = struct.Struct("<I")


def socket_name(port: int) -> str:
    """The abstract Unix socket of the chain port `port` in this network namespace."""
    return f"\0moirai-chain-{port}"


_ACK = b"A"
_RELEASE = b"R"
_INODE = struct.Struct("<Q")


def _ack(error: BaseException | None) -> bytes:
    if error is None:
        return _LENGTH.pack(1) + _ACK
    code = status_of(error)[0].name
    message = str(error) if isinstance(error, ServingError) else f"{type(error).__name__}: {error}"
    body = _ACK + f"{code}\0{message}".encode()
    return _LENGTH.pack(len(body)) + body


class _Frames(asyncio.Protocol):
    """Length-prefixed frames, each handed to `frame` as soon as it is complete.

    Frames are handled right in `data_received`, not in a reading coroutine: no task wakes up
    per frame, which on the chain's small pushes is a good part of their cost."""

    def __init__(self, max_frame: int = 1 << 62) -> None:
        self.transport: asyncio.Transport | None = None
        self.max_frame = max_frame
        """The longest frame read: a longer one ends the connection (`oversized`)."""
        self._partial = bytearray()  # the start of a frame not yet complete
        self._expected = 0  # its whole length once its header is in, else 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self._partial:
            self._partial += data
            if not self._expected and len(self._partial) >= _LENGTH.size:
                self._expected = _LENGTH.size + _LENGTH.unpack_from(self._partial)[0]
                if self._expected - _LENGTH.size > self.max_frame:
                    self._oversized(self._expected - _LENGTH.size)
                    return
            if not self._expected or len(self._partial) < self._expected:
                return  # a large frame arriving in pieces
            data = bytes(self._partial)
            self._partial = bytearray()
            self._expected = 0
        pos = 0
        while len(data) - pos >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(data, pos)
            if length > self.max_frame:
                self._oversized(length)
                return
            end = pos + _LENGTH.size + length
            if end > len(data):
                break
            self.frame(data[pos + _LENGTH.size : end])
            if self.transport is not None and self.transport.is_closing():
                return  # the frame ended the connection
            pos = end
        if pos < len(data):
            self._partial = bytearray(data[pos:])
            if len(self._partial) >= _LENGTH.size:
                self._expected = _LENGTH.size + _LENGTH.unpack_from(self._partial)[0]
                if self._expected - _LENGTH.size > self.max_frame:
                    self._oversized(self._expected - _LENGTH.size)

    def frame(self, payload: bytes) -> None:
        raise NotImplementedError

    def oversized(self, length: int) -> None:
        """A frame over `max_frame` is announced; the connection ends after this."""

    def _oversized(self, length: int) -> None:
        self._partial = bytearray()
        self._expected = 0
        self.oversized(length)
        if self.transport is not None:
            self.transport.close()


class _Receiving(_Frames):
    """A listener's connection: decode and deliver each push, ack it in order."""

    def __init__(self, listener: Listener) -> None:
        super().__init__(auth.HELLO_MAX_BYTES if listener.token else listener.max_frame)
        self._listener = listener
        self._mappings = shm.Mappings(self._release)
        self._first = True

    def _release(self, inode: int) -> None:
        """No array over this file of the sender's is left: it may write the file again."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_LENGTH.pack(1 + _INODE.size) + _RELEASE + _INODE.pack(inode))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._listener.connections.add(self)

    def frame(self, payload: bytes) -> None:
        assert self.transport is not None
        if self._first:
            self._first = False
            if auth.check_hello(payload, self._listener.token):
                self.max_frame = self._listener.max_frame
                return  # a hello is not acked
            if self._listener.token is not None:
                self.transport.write(_ack(Unauthenticated(self._refusal())))
                self.transport.close()
                return
        try:
            self._listener.receive(payload, self._mappings)
            self.transport.write(_ack(None))
        except Exception as error:  # every failure goes back to its sender
            self.transport.write(_ack(error))

    @staticmethod
    def _refusal() -> str:
        return (
            "the chain of this deployment needs its token (the servers' MOIRAI_CHAIN_TOKEN or "
            "--chain-token-file differ)"
        )

    def oversized(self, length: int) -> None:
        assert self.transport is not None
        if self._first and self._listener.token is not None:
            error: ServingError = Unauthenticated(self._refusal())
        else:
            error = TooLarge(
                f"a push of {length} bytes is over the {self.max_frame} this server holds"
            )
        self.transport.write(_ack(error))

    def connection_lost(self, exc: Exception | None) -> None:
        self._listener.connections.discard(self)
        self._mappings.close()


class Listener:
    """The receiving side: serves pushes on the Unix socket of a chain port."""

    def __init__(
        self,
        receive: Callable[[bytes, shm.Mappings], None],
        token: str | None = None,
        max_frame: int = 1 << 62,
    ) -> None:
        """`receive` decodes and delivers one push with the connection's mappings of the
        sender's shared memory (`ChainServicer.receive`); what it raises goes back to the
        sender with its status code. `token`: the chain token a connection must present;
        `max_frame`: the longest push read."""
        self.receive = receive
        self.token = token.encode() if token is not None else None
        self.max_frame = max_frame
        self.connections: set[_Receiving] = set()
        self._server: asyncio.AbstractServer | None = None

    async def start(self, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _Receiving(self), socket_name(port))

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.close()
        await self._server.wait_closed()


class Connection(_Frames):
    """The sending side to one peer: pushes in order, each waiting for its ack."""

    def __init__(self) -> None:
        super().__init__()
        # Per push sent and not yet acked: its waiter, and the inodes of its shared tensors.
        self._waiting: collections.deque[tuple[asyncio.Future[None], list[int]]]
        self._waiting = collections.deque()
        # By inode, once per push of the file not yet released (an arena file may be in
        # several pushes at once).
        self._shared: dict[int, list[shm.SharedTensor]] = {}
        self.pool = shm.Pool()
        self.closed = False

    @classmethod
    async def open(cls, port: int, token: str | None = None) -> Connection | None:
        """A connection to the chain port `port` on this host, or None when nothing listens;
        with the chain `token`, it says hello with it first."""
        try:
            _, connection = await asyncio.get_running_loop().create_unix_connection(
                cls, socket_name(port)
            )
        except OSError:
            return None
        if token is not None and connection.transport is not None:
            hello = auth.hello(token)
            connection.transport.writelines([_LENGTH.pack(len(hello)), hello])
        return connection

    async def push(
        self, payload: bytes, timeout_s: float, shared: list[shm.SharedTensor] | None = None
    ) -> None:
        """Send one push and wait for its ack (at most `timeout_s`); raise the peer's error.

        The push's files from `pool.take` (`shared`) belong to the connection from now on: they
        go back when the receiver releases them, which is usually long after the ack and may be
        after this call gave up."""
        shared = shared or []
        if self.closed or self.transport is None:
            self.pool.give_back(shared, reuse=False)
            raise Unavailable("the connection is closed")
        for tensor in shared:
            self._shared.setdefault(tensor.inode, []).append(tensor)
        ack = asyncio.get_running_loop().create_future()
        self._waiting.append((ack, [tensor.inode for tensor in shared]))
        self.transport.writelines([_LENGTH.pack(len(payload)), payload])
        await asyncio.wait_for(ack, timeout_s)

    def frame(self, payload: bytes) -> None:
        kind, body = payload[:1], payload[1:]
        if kind == _RELEASE and len(body) == _INODE.size:
            self._give_back(_INODE.unpack(body)[0])
            return
        if kind != _ACK or not self._waiting:  # the peer is confused: stop talking to it
            self._lose(Unavailable("the peer sent a frame this connection does not expect"))
            return
        ack, inodes = self._waiting.popleft()
        if body:  # the push failed: the receiver holds none of its files, but may still send
            for inode in inodes:  # releases of those it read, so none is written again
                self._give_back(inode, reuse=False)
        if ack.done():  # its push gave up (deadline); the ack still arrives in order
            return
        if body:
            code, _, message = body.decode(errors="replace").partition("\0")
            ack.set_exception(from_code(code, message))
        else:
            ack.set_result(None)

    def _give_back(self, inode: int, reuse: bool = True) -> None:
        tensors = self._shared.get(inode)
        if tensors:  # at most once per push, however it is released
            self.pool.give_back([tensors.pop()], reuse)
            if not tensors:
                del self._shared[inode]

    def connection_lost(self, exc: Exception | None) -> None:
        self._lose(Unavailable(f"connection lost ({exc or 'closed by the peer'})"))

    def _lose(self, error: ServingError) -> None:
        self.closed = True
        while self._waiting:
            ack, _ = self._waiting.popleft()
            if not ack.done():
                ack.set_exception(error)
        for tensors in self._shared.values():  # the receiver may still read them
            self.pool.give_back(tensors, reuse=False)
        self._shared.clear()
        self.pool.close()
        if self.transport is not None:
            self.transport.close()

    async def close(self) -> None:
        self._lose(Unavailable("the connection is closed"))
