"""The chain's pieces without models: the push wire format against protobuf, shared memory, the
same-host fast path and its fallbacks."""

from __future__ import annotations

import asyncio
import itertools
import logging

import numpy as np
import pytest

from moirai.stageplan import DeviceSpec, Stage, StagePlan
from stage_server import chain, samehost, shm, wire
from stage_server.chain import Delivery, Peers, now_ms
from stage_server.errors import (
    InvalidInput,
    NotFound,
    SharedMemoryUnavailable,
    Unavailable,
)
from stage_server.protos import stage_pb2
from stage_server.serve import ChainHandle, start_chain

from .conftest import shared_memory_in_use

pytestmark = pytest.mark.timeout(60)

TENSORS = {
    "a": np.arange(12, dtype=np.float32).reshape(3, 4),
    "b": np.array([True, False, True]),
    "c": np.arange(6, dtype=np.int64)[::2],  # not contiguous
    "d": np.zeros((0, 5), np.float16),
}


def test_timings_made_here_and_received_encoded_count_once() -> None:
    """A timing that left this process and came back encoded is the tuple it was made as."""
    here, other = wire.Timing("s0", "compute", 1.5), wire.Timing("s1", "queue", 0.25)
    received = wire.decode_push(wire.encode_push("r", "s1", {}, 1e12, 5.0, [here], "s0")).timings
    assert wire.decode_timings((here, other, *received)) == [here, other]


def test_pushes_read_by_protobuf_and_protobuf_pushes_read_back() -> None:
    timings = [wire.Timing("s0", "compute", 1.5), wire.Timing("s0", "transfer", 0.25, "a")]
    payload = wire.encode_push("r1", "s1", TENSORS, 1e12, 5.0, timings, "s0")
    parsed = stage_pb2.PushRequest.FromString(payload)
    assert (parsed.request_id, parsed.stage, parsed.origin) == ("r1", "s1", "s0")
    assert (parsed.deadline_unix_ms, parsed.sent_unix_ms) == (1e12, 5.0)
    assert [(t.stage, t.kind, t.tensor, t.ms) for t in parsed.timings] == [
        ("s0", "compute", "", 1.5),
        ("s0", "transfer", "a", 0.25),
    ]
    for t in parsed.tensors:
        want = TENSORS[t.name]
        assert list(t.shape) == list(want.shape)
        assert t.data == np.ascontiguousarray(want).tobytes()

    # Fields in protobuf's order (tensors before timings), plus a field this version lacks.
    unknown = b"\xfa\x01\x03abc"  # field 31, length-delimited
    push = wire.decode_push(parsed.SerializeToString() + unknown)
    assert (push.request_id, push.stage, push.origin, push.sent_ms) == ("r1", "s1", "s0", 5.0)
    assert wire.decode_timings(push.timings) == [
        wire.Timing(t.stage, t.kind, t.ms, t.tensor) for t in parsed.timings
    ]
    for name, want in TENSORS.items():
        np.testing.assert_array_equal(push.tensors[name], want)
        assert push.tensors[name].dtype == want.dtype


@pytest.mark.parametrize(
    "payload",
    [
        b"\x1a\x05\x0a\x01",  # a tensor field running past the end
        b"\x1a\x02\x0a\x01",  # a tensor whose name runs past its field
        b"\x0f",  # wire type 7
        b"\x1a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",  # overlong varint
        wire.encode_push("r", "s", {"x": np.zeros(4, np.float32)}, 1.0, 1.0)[:-3],
    ],
)
def test_malformed_pushes_are_invalid_input(payload: bytes) -> None:
    with pytest.raises(InvalidInput):
        wire.decode_push(payload)


def test_shared_tensors_are_read_in_place_released_reused_and_nothing_left() -> None:
    rng = np.random.default_rng(0)
    first, second = (rng.random((256, 128)).astype(np.float32) for _ in range(2))
    before = shared_memory_in_use()
    released: list[int] = []
    pool, mappings = shm.Pool(), shm.Mappings(released.append)
    sent, reference = pool.take(first)
    push = wire.decode_push(
        wire.encode_push("r", "s", {"x": first}, 1.0, 1.0, shared={"x": reference}), mappings
    )
    x = push.tensors["x"]
    np.testing.assert_array_equal(x, first)
    assert not x.flags.writeable and not x.flags.owndata  # the sender's file, mapped
    del push
    assert released == []  # x still reads the file
    del x
    assert released == [reference.inode]
    pool.give_back([sent])  # what the release frame does
    again, reference_again = pool.take(second)  # the same file, written again
    assert (reference_again.fd, reference_again.inode) == (reference.fd, reference.inode)
    view = mappings.read(reference_again, second.nbytes)  # the cached mapping
    assert view.tobytes() == second.tobytes()
    mappings.close()  # an array still over it keeps its mapping until it goes
    assert view.tobytes() == second.tobytes()
    del view
    pool.give_back([again])
    pool.close()
    assert shared_memory_in_use() == before


def test_a_file_given_back_after_its_pool_closed_is_closed() -> None:
    """A push that gave up before it was sent gives its file back, possibly after its
    connection ended and closed the pool: kept as idle then, nothing would ever close it."""
    before = shared_memory_in_use()
    pool = shm.Pool()
    sent, _ = pool.take(np.ones(1 << 16, np.float32))
    pool.close()
    pool.give_back([sent])
    assert shared_memory_in_use() == before


def test_a_shared_tensor_is_only_read_when_it_is_the_one_named() -> None:
    pool = shm.Pool()
    sent, reference = pool.take(np.ones(1024, np.float32))
    wrong = stage_pb2.SharedMemory()
    wrong.CopyFrom(reference)
    wrong.inode += 1  # as if the descriptor had been closed and its number reused
    with pytest.raises(SharedMemoryUnavailable, match="not the shared tensor"):
        shm.Mappings(print).read(wrong, 4096)
    with pytest.raises(SharedMemoryUnavailable, match="not the shared tensor"):
        shm.Mappings(print).read(reference, 1 << 20)  # larger than the file
    sent.close()
    with pytest.raises(SharedMemoryUnavailable, match="cannot open"):
        shm.Mappings(print).read(reference, 4096)
    ones = {"x": np.ones(1024)}
    with pytest.raises(SharedMemoryUnavailable, match="same-host path only"):
        wire.decode_push(wire.encode_push("r", "s", ones, 1, 1, (), "", {"x": reference}))


class _Recorder:
    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []

    def deliver(self, delivery: Delivery) -> None:
        if delivery.stage == "missing":
            raise NotFound("stage 'missing' is not here")
        self.deliveries.append(delivery)

    def failed(self, request_id: str, code: str, message: str, deadline_ms: float) -> None:
        pass


def _plan() -> StagePlan:
    return StagePlan(
        model_name="m",
        devices=(DeviceSpec("dev"),),
        inputs=(),
        outputs=(),
        tensors={},
        stages=(Stage("s", "dev", (), (), ()), Stage("missing", "dev", (), (), ())),
        routing={},
    )


async def _serve(handler: _Recorder, port: int = 0) -> tuple[ChainHandle, str]:
    server = await start_chain(handler, port=port)
    return server, f"127.0.0.1:{server.port}"


@pytest.mark.parametrize("same_host", [True, False], ids=["same-host", "grpc"])
async def test_pushes_arrive_and_errors_come_back_with_their_code(same_host: bool) -> None:
    handler = _Recorder()
    server, address = await _serve(handler)
    peers = Peers(_plan(), {"dev": address}, same_host=same_host)
    big = np.arange(1 << 16, dtype=np.float32)  # 256 KiB: shared memory on the same host
    try:
        await peers.push("s", "r", {"big": big, "small": big[:3]}, now_ms() + 5000, origin="g")
        with pytest.raises(NotFound, match="missing"):
            await peers.push("missing", "r", {}, now_ms() + 5000)
        with pytest.raises(InvalidInput):
            await peers.push("s", "r", {"bad": np.array([1 + 2j])}, now_ms() + 5000)
    finally:
        await peers.close()
        await server.stop(0)
    (delivery,) = handler.deliveries
    assert (delivery.request_id, delivery.origin) == ("r", "g")
    np.testing.assert_array_equal(delivery.tensors["big"], big)
    np.testing.assert_array_equal(delivery.tensors["small"], big[:3])
    kinds = {(t.kind, t.tensor) for t in wire.decode_timings(delivery.timings)}
    assert kinds == {("transfer", "big"), ("transfer", "small")}


async def test_a_push_racing_the_chains_close_leaves_no_connection_open() -> None:
    """A push still opening its same-host connection when its server stops (a request the
    stop cancelled, a push after a deadline) must not leave that connection, and the files
    it would carry, open for good: `Peers.close` had already passed its peer."""
    handler = _Recorder()
    server, address = await _serve(handler)
    peers = Peers(_plan(), {"dev": address})
    big = np.arange(1 << 16, dtype=np.float32)
    try:
        push = asyncio.ensure_future(peers.push("s", "r", {"big": big}, now_ms() + 5000))
        await asyncio.sleep(0)  # the push is opening its connection
        await peers.close()
        with pytest.raises(Unavailable, match="closed"):
            await push
        with pytest.raises(Unavailable, match="closed"):
            await peers.push("s", "r2", {"big": big}, now_ms() + 5000)
        for _ in range(100):  # the listener hears of closed connections on a later turn
            if not server.listener.connections:
                break
            await asyncio.sleep(0.01)
        assert not server.listener.connections
        assert handler.deliveries == []
    finally:
        await server.stop(0)


class _Refusing(_Recorder):
    """Refuses pushes to the stage 'missing', keeping their tensors (as a receiver may, for a
    while, after its answer)."""

    def __init__(self) -> None:
        super().__init__()
        self.refused: list[Delivery] = []

    def deliver(self, delivery: Delivery) -> None:
        if delivery.stage == "missing":
            self.refused.append(delivery)
        super().deliver(delivery)


async def test_files_of_failed_pushes_are_never_rewritten_and_nothing_is_left() -> None:
    before = shared_memory_in_use()
    handler = _Refusing()
    server, address = await _serve(handler)
    peers = Peers(_plan(), {"dev": address})
    big = np.arange(1 << 16, dtype=np.float32)  # 256 KiB: shared memory
    try:
        for i in range(4):
            with pytest.raises(NotFound):
                await peers.push("missing", "r", {"big": big - i}, now_ms() + 5000)
            await peers.push("s", f"r{i}", {"big": big + i}, now_ms() + 5000)
    finally:
        await peers.close()
        await server.stop(0)
    for i, (refused, delivered) in enumerate(zip(handler.refused, handler.deliveries, strict=True)):
        np.testing.assert_array_equal(refused.tensors["big"], big - i)
        np.testing.assert_array_equal(delivered.tensors["big"], big + i)
    del refused, delivered
    handler.refused.clear()
    handler.deliveries.clear()
    assert shared_memory_in_use() == before


async def test_a_peer_that_cannot_map_shared_memory_gets_inline_bytes(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(self: shm.Mappings, reference: stage_pb2.SharedMemory, nbytes: int) -> bytes:
        raise SharedMemoryUnavailable("not in this pid namespace")

    monkeypatch.setattr(shm.Mappings, "read", refuse)
    handler = _Recorder()
    server, address = await _serve(handler)
    peers = Peers(_plan(), {"dev": address})
    big = np.arange(1 << 16, dtype=np.float32)
    try:
        with caplog.at_level(logging.INFO, logger="stage_server.chain"):
            for _ in range(2):
                await peers.push("s", "r", {"big": big}, now_ms() + 5000)
    finally:
        await peers.close()
        await server.stop(0)
    assert [m for m in caplog.messages if "cannot map shared memory" in m]  # once, then inline
    assert len([m for m in caplog.messages if "cannot map" in m]) == 1
    for delivery in handler.deliveries:
        np.testing.assert_array_equal(delivery.tensors["big"], big)


async def test_same_host_connection_loss_is_unavailable_and_the_path_recovers() -> None:
    handler = _Recorder()
    server, address = await _serve(handler)
    peers = Peers(_plan(), {"dev": address})
    x = {"x": np.ones(4, np.float32)}
    try:
        await peers.push("s", "r", x, now_ms() + 5000)
        await server.stop(0)
        with pytest.raises(Unavailable):
            for _ in range(3):  # the first push may still find the old connection open
                await peers.push("s", "r", x, now_ms() + 5000)
        server, _ = await _serve(handler, int(address.rsplit(":", 1)[1]))
        await asyncio.sleep(chain.RECONNECT_S)
        await peers.push("s", "r2", x, now_ms() + 5000)
    finally:
        await peers.close()
        await server.stop(0)
    assert handler.deliveries[-1].request_id == "r2"


def test_only_loopback_peers_take_the_fast_path() -> None:
    assert chain.loopback_port("127.0.0.1:8001") == 8001
    assert chain.loopback_port("localhost:8001") == 8001
    assert chain.loopback_port("[::1]:8001") == 8001
    assert chain.loopback_port("10.0.0.3:8001") is None
    assert chain.loopback_port("stage-cpu-0.moirai.svc:8001") is None


def test_frames_are_found_however_the_bytes_arrive() -> None:
    """Frames split anywhere, several in one read, empty ones and one larger than a read."""

    class Collect(samehost._Frames):
        def __init__(self) -> None:
            super().__init__()
            self.frames: list[bytes] = []

        def frame(self, payload: bytes) -> None:
            self.frames.append(payload)

    frames = [b"", b"a", b"hello", bytes(range(256)) * 1000, b"", b"end"]
    stream = b"".join(samehost._LENGTH.pack(len(f)) + f for f in frames)
    splits = [[], [1], [2, 3, 4], list(range(1, 40)), [7, 100, 5000, 255_000], [len(stream) - 1]]
    for cuts in splits:
        collect = Collect()
        for a, b in itertools.pairwise([0, *cuts, len(stream)]):
            collect.data_received(stream[a:b])
        assert collect.frames == frames, cuts
