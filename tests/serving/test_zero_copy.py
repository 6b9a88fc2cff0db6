"""Stage outputs written by ONNX Runtime straight into shared memory and pushed without a copy:
the arena's lifetime rules, and whole chains against single-process ONNX Runtime."""

from __future__ import annotations

import asyncio

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from moirai.partition import build_plan
from moirai.stageplan import DeviceSpec, TensorSpec
from stage_server import codec, shm, wire
from stage_server.client import AsyncInferenceClient
from stage_server.sessions import StageSession

from .conftest import shared_memory_in_use

pytestmark = pytest.mark.timeout(180)

F32 = np.dtype(np.float32)


def _push(
    pool: shm.Pool, mappings: shm.Mappings, array: np.ndarray
) -> tuple[shm.SharedTensor, np.ndarray]:
    """Push `array` through `pool` to `mappings`: the sender's file, and the receiver's array."""
    sent, reference = pool.take(array)
    payload = wire.encode_push("r", "s", {"x": array}, 1.0, 1.0, shared={"x": reference})
    return sent, wire.decode_push(payload, mappings).tensors["x"]


def _files() -> int:
    return shared_memory_in_use()[0]


def test_an_output_is_pushed_in_its_own_file_and_reused_once_nothing_holds_it() -> None:
    before = shared_memory_in_use()
    arena, pool = shm.Arena(), shm.Pool()
    released: list[int] = []
    mappings = shm.Mappings(released.append)
    out = arena.empty(F32, (256, 128))
    out[:] = np.random.default_rng(0).random((256, 128))
    want = out.copy()
    sent, x = _push(pool, mappings, out)
    assert sent.arena is arena  # the file it lies in, not a copy in one of the pool's
    np.testing.assert_array_equal(x, want)
    del x
    assert released == [sent.inode]
    pool.give_back([sent])  # what the release frame does
    # The sender's array still holds the file: the next output gets another one.
    other = arena.empty(F32, (256, 128))
    second, y = _push(pool, mappings, other)
    assert second.inode != sent.inode
    del y, other
    pool.give_back([second])
    del out  # nothing holds either file now: the next outputs get them, whatever their shape
    again = [arena.empty(F32, (200, 128)), arena.empty(np.dtype(np.int64), (12000,))]
    taken = [pool.take(a)[0] for a in again]
    assert {t.inode for t in taken} == {sent.inode, second.inode}
    pool.give_back(taken)
    del again
    arena.close()
    pool.close()
    mappings.close()
    assert shared_memory_in_use() == before


def test_a_slice_of_an_output_keeps_its_file_from_being_written_again() -> None:
    """A batch's rows are slices of the batch's outputs; numpy makes a slice's base the array
    that owns the memory, so an output that was itself a view of another array could be
    collected before its slices, and its file written again under them (wrong answers with
    dynamic batching in the stage server's process)."""
    arena = shm.Arena()
    out = arena.empty(F32, (4, 1 << 14))
    out[:] = 1.0
    row = out[1:2]
    del out
    again = arena.empty(F32, (4, 1 << 14))  # must not be the file `row` reads
    again[:] = 2.0
    np.testing.assert_array_equal(row, 1.0)
    del row, again
    arena.close()


def test_a_file_pushed_to_two_peers_waits_for_both_and_a_failed_push_retires_it() -> None:
    before = shared_memory_in_use()
    arena = shm.Arena()
    a, b = shm.Pool(), shm.Pool()  # the connections to two peers
    mappings = shm.Mappings(lambda inode: None)
    out = arena.empty(F32, (1 << 16,))
    to_a, xa = _push(a, mappings, out)
    to_b, xb = _push(b, mappings, out)
    assert to_a is to_b
    del out, xa, xb
    a.give_back([to_a])
    fresh = arena.empty(F32, (1 << 16,))
    fresh_file, _ = b.take(fresh)
    assert fresh_file.inode != to_b.inode  # b's push still holds the first file
    b.give_back([to_b, fresh_file])
    del fresh
    # The receiver of a failed push may still read the file: it is closed, never reused.
    failed, _ = a.take(arena.empty(F32, (1 << 16,)))
    files = _files()
    a.give_back([failed], reuse=False)
    assert _files() < files
    later = [arena.empty(F32, (1 << 16,)) for _ in range(2)]
    taken = [a.take(x)[0] for x in later]
    assert failed.inode not in {t.inode for t in taken}
    del later
    arena.close()  # files still in a push close when they come back
    assert _files() > before[0]
    a.give_back(taken)
    a.close()
    b.close()
    mappings.close()
    assert shared_memory_in_use() == before


def _model(nodes: list[onnx.NodeProto], count: int, outputs: list[str]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "zero_copy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [count])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_large_static_outputs_are_written_into_the_arena_and_others_left_to_ort() -> None:
    before = shared_memory_in_use()
    count = 1 << 16  # 256 KiB of FP32
    model = _model(
        [
            helper.make_node("Neg", ["x"], ["big"]),
            helper.make_node("Abs", ["x"], ["unknown"]),
            helper.make_node("ReduceMax", ["x"], ["small"], keepdims=0),
        ],
        count,
        ["big", "unknown", "small"],
    )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    specs = [
        TensorSpec("big", "FP32", (count,)),
        TensorSpec("unknown", "FP32", (-1,)),
        TensorSpec("small", "FP32", ()),
    ]
    x = np.linspace(-1, 1, count, dtype=np.float32)
    want = session.run(None, {"x": x})
    arena, pool = shm.Arena(), shm.Pool()
    got = StageSession(session, specs, arena).run({"x": x})
    for array, expected in zip(got, want, strict=True):
        np.testing.assert_array_equal(array, expected)
    big, unknown, _ = got
    assert not big.flags.writeable  # the arena's, shared from now on
    taken = [pool.take(big)[0], pool.take(unknown)[0]]
    assert [t.arena for t in taken] == [arena, None]  # only `unknown` is copied into a file
    pool.give_back(taken)
    without = StageSession(session, specs, None).run({"x": x})  # no shared memory: ORT's arrays
    for array, expected in zip(without, want, strict=True):
        np.testing.assert_array_equal(array, expected)
    del got, big, unknown
    arena.close()
    pool.close()
    assert shared_memory_in_use() == before


def test_outputs_placed_in_a_clients_memory_are_written_there_when_they_fit() -> None:
    count = 1 << 16  # 256 KiB of FP32
    model = _model(
        [helper.make_node("Neg", ["x"], ["big"]), helper.make_node("Abs", ["x"], ["other"])],
        count,
        ["big", "other"],
    )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    specs = [TensorSpec("big", "FP32", (count,)), TensorSpec("other", "FP32", (count,))]
    x = np.linspace(-1, 1, count, dtype=np.float32)
    want = session.run(None, {"x": x})
    stage = StageSession(session, specs, None)
    memory = np.zeros(2 * count + 64, np.float32)
    skip = -memory.ctypes.data % codec.PLACE_ALIGNMENT
    place = memoryview(memory).cast("B")[skip:]
    big, other = stage.run({"x": x}, {"big": place})
    np.testing.assert_array_equal(big, want[0])
    np.testing.assert_array_equal(other, want[1])
    assert np.shares_memory(big, memory) and not big.flags.writeable
    assert not np.shares_memory(other, memory)  # not asked for: ONNX Runtime's own
    codec.write_shared("big", big, place)  # what the front end does: nothing left to copy
    # Too small a place, or one not aligned: ONNX Runtime's own array, for the front end to copy.
    for where in (place[: 4 * count - 4], place[4:]):
        (big, _) = stage.run({"x": x}, {"big": where})
        np.testing.assert_array_equal(big, want[0])
        assert not np.shares_memory(big, memory)


def test_dynamic_outputs_go_to_the_arena_once_their_input_shapes_were_seen() -> None:
    """An output of open size is ONNX Runtime's the first time at given input shapes, then
    written into the arena; one whose size depends on the data (NonZero) is never guessed
    again once a guess failed, and every answer stays right."""
    before = shared_memory_in_use()
    model = _model(
        [helper.make_node("Neg", ["x"], ["big"]), helper.make_node("NonZero", ["x"], ["nz"])],
        1,
        ["big", "nz"],
    )
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "n"
    model.graph.output[1].type.tensor_type.elem_type = TensorProto.INT64
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    arena = shm.Arena()
    stage = StageSession(
        session, [TensorSpec("big", "FP32", (-1,)), TensorSpec("nz", "INT64", (1, -1))], arena
    )
    count = 1 << 16  # 256 KiB of FP32; NonZero's int64 indices: up to 512 KiB

    def run(x: np.ndarray) -> list[np.ndarray]:
        got = stage.run({"x": x})
        np.testing.assert_array_equal(got[0], -x)
        np.testing.assert_array_equal(got[1], np.stack(np.nonzero(x)))
        return got

    ones = np.ones(count, np.float32)
    first = run(ones)
    assert all(a.flags.writeable for a in first)  # ONNX Runtime's own arrays
    second = run(ones)
    assert not any(a.flags.writeable for a in second)  # both guessed, both in the arena
    half = ones.copy()
    half[::2] = 0  # the same input shape, half the indices: the guess for `nz` fails
    third = run(half)
    assert all(a.flags.writeable for a in third)  # run again with ONNX Runtime's allocation
    fourth = run(ones)
    assert not fourth[0].flags.writeable and fourth[1].flags.writeable  # never guessed again
    assert run(np.ones(count // 2, np.float32))[0].flags.writeable  # a new batch size
    del first, second, third, fourth
    arena.close()
    assert shared_memory_in_use() == before


@pytest.mark.parametrize(
    ("count", "requests", "concurrency"),
    [(16 << 20, 2, 1), (1 << 18, 16, 8)],
    ids=["64MiB", "1MiB-concurrent"],
)
async def test_chains_of_large_tensors_copy_only_the_gateways_inputs(
    cluster,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    count: int,
    requests: int,
    concurrency: int,
) -> None:
    """x -> Neg -> a; Abs(a) -> b; Mul(a, b) -> c; Add(a, c) -> y, on cpu-0, cpu-1, cpu-2 and
    cpu-1 again, so `a` goes to two stages of cpu-1 (one connection, two pushes of one file) and
    one of cpu-2: the outputs equal single-process ORT's, requests in flight at once never see
    each other's tensors, and on the same-host path the only tensor written into shared memory
    is the gateway's input (the stages' outputs are pushed where ORT wrote them); with the front
    end in the first stage's process, not even that (it reaches the stage in memory)."""
    mode = request.node.callspec.params["cluster"]
    writes: list[int] = []
    write = shm.SharedTensor.write

    def counted(self: shm.SharedTensor, array: np.ndarray) -> object:
        writes.append(array.nbytes)
        return write(self, array)

    monkeypatch.setattr(shm.SharedTensor, "write", counted)
    model = _model(
        [
            helper.make_node("Neg", ["x"], ["a"], name="Neg_0"),
            helper.make_node("Abs", ["a"], ["b"], name="Abs_1"),
            helper.make_node("Mul", ["a", "b"], ["c"], name="Mul_2"),
            helper.make_node("Add", ["a", "c"], ["y"], name="Add_3"),
        ],
        count,
        ["y"],
    )
    devices = [DeviceSpec(f"cpu-{i}", threads=1) for i in range(3)]
    assignment = {"Neg_0": "cpu-0", "Abs_1": "cpu-1", "Mul_2": "cpu-2", "Add_3": "cpu-1"}
    plan = build_plan(model, assignment, devices)
    assert [s.device for s in plan.stages] == ["cpu-0", "cpu-1", "cpu-2", "cpu-1"]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    c = await cluster(model, plan)
    client = AsyncInferenceClient(c.grpc_url)
    semaphore = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        x = np.linspace(-i - 1, i + 1, count, dtype=np.float32)
        async with semaphore:
            got = await client.infer(plan.model_name, {"x": x}, timeout_s=120)
        np.testing.assert_array_equal(got["y"], session.run(None, {"x": x})[0])

    try:
        await asyncio.gather(*(one(i) for i in range(requests)))
    finally:
        await client.close()
    assert writes == ([count * 4] * requests if mode == "same-host" else [])
