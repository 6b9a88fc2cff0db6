"""The batcher's rules, Triton's, checked step by step in front of a scripted data plane: a
stand-in `infer` that records each batch and answers it only when the test says so (the real
chain behind the batcher is tested in test_batching.py). Nothing here waits on a clock: the
delays that should not pass are minutes long, and the tests only let the event loop run."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from moirai.errors import MoiraiError
from moirai.stageplan import TensorSpec
from stage_server.batchconfig import BatchingConfig, check_batchable
from stage_server.batching import Batcher
from stage_server.errors import DeadlineExceeded, InvalidInput, StageFailed, Unavailable

pytestmark = pytest.mark.timeout(60)

LONG_US = 600_000_000  # ten minutes: a delay no test waits out


class Plane:
    """A data plane that doubles `x` into `y` (and `z` = x + 1), one call per batch, each held
    until the test releases it."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, np.ndarray], Sequence[str] | None, float | None]] = []
        self.release: list[asyncio.Future[BaseException | None]] = []
        self.cancelled = 0

    async def infer(
        self,
        inputs: Mapping[str, np.ndarray],
        requested: Sequence[str] | None,
        timeout_s: float | None,
    ) -> dict[str, np.ndarray]:
        self.calls.append((dict(inputs), requested, timeout_s))
        gate = asyncio.get_running_loop().create_future()
        self.release.append(gate)
        try:
            error = await gate
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if error is not None:
            raise error
        x = inputs["x"]
        outputs = {"y": x * 2, "z": x + 1}
        return {k: v for k, v in outputs.items() if requested is None or k in requested}

    def answer(self, index: int = -1, error: BaseException | None = None) -> None:
        self.release[index].set_result(error)

    def rows(self) -> list[int]:
        return [len(call[0]["x"]) for call in self.calls]


def batcher(
    plane: Plane, slots: int = 1, registry: CollectorRegistry | None = None, **config: object
) -> Batcher:
    return Batcher(
        plane.infer,
        BatchingConfig(**config),  # type: ignore[arg-type]
        slots=slots,
        registry=registry or CollectorRegistry(),
    )


def x(rows: int, value: float = 0.0, width: int = 3) -> dict[str, np.ndarray]:
    return {"x": (np.full((rows, width), value) + np.arange(rows)[:, None]).astype(np.float32)}


async def settle() -> None:
    """Let every task that can run, run."""
    for _ in range(10):
        await asyncio.sleep(0)


async def submit(b: Batcher, *requests: dict[str, np.ndarray], **kw: object) -> list[asyncio.Task]:
    tasks = [asyncio.create_task(b.infer(r, **kw)) for r in requests]  # type: ignore[arg-type]
    await settle()
    return tasks


async def test_a_preferred_size_goes_at_once_and_the_rest_waits_for_the_delay() -> None:
    plane = Plane()
    b = batcher(plane, max_batch_size=8, preferred_batch_sizes=(4,), max_queue_delay_us=LONG_US)
    first = await submit(b, *(x(1, i) for i in range(4)))
    assert plane.rows() == [4]
    rest = await submit(b, x(1, 10), x(1, 11))
    assert plane.rows() == [4] and b.queued == 2  # 2 is neither preferred nor full
    plane.answer(0)
    for i, task in enumerate(first):
        np.testing.assert_array_equal((await task)["y"], x(1, i)["x"] * 2)
    assert b.queued == 2
    for task in rest:
        task.cancel()


async def test_the_largest_preferred_size_reachable_is_sent() -> None:
    plane = Plane()
    b = batcher(plane, max_batch_size=8, preferred_batch_sizes=(2, 4), max_queue_delay_us=LONG_US)
    busy = await submit(b, x(4))  # preferred: sent, and holds the only slot
    tasks = await submit(b, *(x(1, i) for i in range(5)))
    assert plane.rows() == [4] and b.queued == 5
    plane.answer()
    await busy[0]
    await settle()
    assert plane.rows() == [4, 4]  # not 2, and not all 5: 5 is no preferred size
    assert b.queued == 1
    for task in tasks:
        task.cancel()


async def test_a_full_batch_or_one_that_cannot_grow_goes_at_once() -> None:
    plane = Plane()
    b = batcher(plane, slots=3, max_batch_size=8, max_queue_delay_us=LONG_US)
    tasks = await submit(b, x(3), x(3), x(3))  # 6 rows, and the third does not fit
    assert plane.rows() == [6]
    tasks += await submit(b, x(5))  # 3 + 5 = 8: full
    assert plane.rows() == [6, 8]
    for task in tasks:
        task.cancel()


async def test_no_delay_sends_what_is_queued_when_a_slot_frees() -> None:
    plane = Plane()
    b = batcher(plane, slots=1, max_batch_size=8)
    tasks = await submit(b, x(1, 0))
    assert plane.rows() == [1]  # alone: nothing to wait for
    tasks += await submit(b, *(x(2, i) for i in range(1, 4)))
    assert plane.rows() == [1] and b.queued == 3  # the only slot is busy
    plane.answer(0)
    await settle()
    assert plane.rows() == [1, 6]
    plane.answer(1)
    results = [await t for t in tasks]
    for i, result in enumerate(results):
        want = x(1 if i == 0 else 2, i)["x"]
        np.testing.assert_array_equal(result["y"], want * 2)
        np.testing.assert_array_equal(result["z"], want + 1)


async def test_requests_of_other_shapes_or_datatypes_are_not_mixed() -> None:
    plane = Plane()
    b = batcher(plane, slots=1, max_batch_size=8)
    busy = await submit(b, x(8))  # holds the only slot while the others queue
    wide = {"x": np.zeros((2, 5), np.float32)}
    ints = {"x": np.zeros((1, 3), np.int64)}
    tasks = await submit(b, x(1), wide, x(2), ints, wide)
    for _ in range(4):
        plane.answer()
        await settle()
    await asyncio.gather(*busy, *tasks)
    sent = [(c[0]["x"].shape, c[0]["x"].dtype.name) for c in plane.calls]
    # Oldest first: the float rows of width 3 (1 + 2), then width 5 (2 + 2), then the ints.
    assert sent == [
        ((8, 3), "float32"), ((3, 3), "float32"), ((4, 5), "float32"), ((1, 3), "int64"),
    ]  # fmt: skip


async def test_each_request_gets_what_it_asked_for() -> None:
    plane = Plane()
    b = batcher(plane, max_batch_size=4, preferred_batch_sizes=(2,), max_queue_delay_us=LONG_US)
    only_y = asyncio.create_task(b.infer(x(1, 5), ["y"]))
    only_z = asyncio.create_task(b.infer(x(1, 6), ["z"]))
    await settle()
    assert plane.calls[0][1] == ("y", "z")  # the union, in order
    plane.answer()
    assert list(await only_y) == ["y"] and list(await only_z) == ["z"]
    np.testing.assert_array_equal((await only_z)["z"], x(1, 6)["x"] + 1)


async def test_sizes_the_batch_dimension_cannot_take_are_invalid_input() -> None:
    b = batcher(Plane(), max_batch_size=4)
    with pytest.raises(InvalidInput, match=r"batch size 5 .* max_batch_size 4"):
        await b.infer(x(5))
    with pytest.raises(InvalidInput, match="batch size 0"):
        await b.infer(x(0))
    with pytest.raises(InvalidInput, match="first dimensions differ"):
        await b.infer({"x": np.zeros((2, 3), np.float32), "m": np.zeros((3, 3), np.float32)})
    with pytest.raises(InvalidInput, match="scalar"):
        await b.infer({"x": np.float32(1)})
    assert b.queued == 0


async def test_a_deadline_passing_in_the_queue_fails_it_and_it_never_runs() -> None:
    plane = Plane()
    b = batcher(plane, max_batch_size=8, max_queue_delay_us=LONG_US)
    with pytest.raises(DeadlineExceeded, match="in the batch queue"):
        await b.infer(x(1), timeout_s=0.01)
    assert plane.calls == [] and b.queued == 0


async def test_a_deadline_passing_in_a_batch_fails_that_request_alone() -> None:
    plane = Plane()
    b = batcher(plane, max_batch_size=2, max_queue_delay_us=LONG_US)
    short = asyncio.create_task(b.infer(x(1, 1), timeout_s=0.01))
    long = asyncio.create_task(b.infer(x(1, 2), timeout_s=60))
    await settle()
    assert plane.rows() == [2]
    assert plane.calls[0][2] > 1  # the batch has the longest deadline of its requests
    with pytest.raises(DeadlineExceeded, match="in its batch"):
        await short
    plane.answer()
    np.testing.assert_array_equal((await long)["y"], x(1, 2)["x"] * 2)


async def test_a_request_cancelled_in_the_queue_leaves_it() -> None:
    plane = Plane()
    b = batcher(plane, max_batch_size=4, max_queue_delay_us=LONG_US)
    gone = (await submit(b, x(1, 9)))[0]
    gone.cancel()
    await settle()
    assert b.queued == 0
    kept = await submit(b, x(2, 1), x(2, 2))
    assert plane.rows() == [4]  # without the cancelled row
    plane.answer()
    for value, task in zip((1, 2), kept, strict=True):
        np.testing.assert_array_equal((await task)["y"], x(2, value)["x"] * 2)


async def test_a_request_cancelled_in_a_sent_batch_loses_its_rows_alone() -> None:
    plane = Plane()
    b = batcher(plane, max_batch_size=3, max_queue_delay_us=LONG_US)
    tasks = await submit(b, x(1, 1), x(1, 2), x(1, 3))
    assert plane.rows() == [3]
    tasks[1].cancel()
    await settle()
    assert plane.cancelled == 0  # the others still wait for the batch
    plane.answer()
    np.testing.assert_array_equal((await tasks[0])["y"], x(1, 1)["x"] * 2)
    np.testing.assert_array_equal((await tasks[2])["y"], x(1, 3)["x"] * 2)
    with pytest.raises(asyncio.CancelledError):
        await tasks[1]


async def test_a_batch_whose_requests_are_all_gone_is_cancelled_on_the_chain() -> None:
    plane = Plane()
    b = batcher(plane, max_batch_size=2, max_queue_delay_us=LONG_US)
    tasks = await submit(b, x(1), x(1))
    for task in tasks:
        task.cancel()
    await settle()
    assert plane.cancelled == 1 and b.in_flight == 0


async def test_a_failed_batch_fails_each_of_its_requests() -> None:
    plane = Plane()
    b = batcher(plane, max_batch_size=2, max_queue_delay_us=LONG_US)
    tasks = await submit(b, x(1), x(1))
    plane.answer(error=StageFailed("stage s0 on cpu-0 failed: boom"))
    for task in tasks:
        with pytest.raises(StageFailed, match="boom"):
            await task


async def test_outputs_that_do_not_follow_the_batch_fail_clearly() -> None:
    async def infer(inputs, requested, timeout_s):
        return {"y": np.zeros((1, 3), np.float32)}

    b = Batcher(infer, BatchingConfig(2, (), LONG_US), registry=CollectorRegistry())
    tasks = await submit(b, x(1), x(1))
    for task in tasks:
        with pytest.raises(StageFailed, match="do not follow its batch dimension"):
            await task


async def test_closing_fails_what_is_queued() -> None:
    plane = Plane()
    b = batcher(plane, max_batch_size=8, max_queue_delay_us=LONG_US)
    tasks = await submit(b, x(1))
    await b.close()
    with pytest.raises(Unavailable):
        await tasks[0]
    with pytest.raises(Unavailable):
        await b.infer(x(1))


async def test_metrics_count_batches_rows_and_queue_time() -> None:
    plane = Plane()
    registry = CollectorRegistry()
    b = batcher(
        plane, registry=registry, max_batch_size=4, preferred_batch_sizes=(3,),
        max_queue_delay_us=LONG_US,
    )  # fmt: skip
    tasks = await submit(b, x(1), x(2))
    plane.answer()
    await asyncio.gather(*tasks)
    assert registry.get_sample_value("moirai_batch_size_count") == 1
    assert registry.get_sample_value("moirai_batch_size_sum") == 3
    assert registry.get_sample_value("moirai_batch_requests_sum") == 2
    assert registry.get_sample_value("moirai_batch_queue_seconds_count") == 2
    assert registry.get_sample_value("moirai_batch_queued_requests") == 0


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"max_batch_size": -1}, "--max-batch-size -1"),
        ({"max_batch_size": 4, "preferred_batch_sizes": (8,)}, "--preferred-batch-sizes 8"),
        ({"preferred_batch_sizes": (2,)}, "need --max-batch-size"),
        ({"max_batch_size": 4, "max_queue_delay_us": -5}, "--max-queue-delay-us -5"),
    ],
)
def test_settings_that_make_no_sense_are_one_line_errors(config: dict, needle: str) -> None:
    with pytest.raises(MoiraiError, match=needle):
        BatchingConfig(**config)


def test_config_round_trips_through_its_flags() -> None:
    config = BatchingConfig(8, (8, 4), 2000)
    assert config.preferred_batch_sizes == (4, 8)
    assert config.to_args() == [
        "--max-batch-size", "8", "--preferred-batch-sizes", "4,8", "--max-queue-delay-us", "2000",
    ]  # fmt: skip
    assert BatchingConfig().to_args() == []


def test_only_a_model_with_an_open_batch_dimension_batches() -> None:
    open_ = [TensorSpec("x", "FP32", (-1, 3))]
    check_batchable("m", open_, [TensorSpec("y", "FP32", (-1,))])
    with pytest.raises(MoiraiError, match=r"input 'x' has a fixed first dimension \(1\)"):
        check_batchable("m", [TensorSpec("x", "FP32", (1, 3))], open_)
    with pytest.raises(MoiraiError, match="output 'y' has no dimensions"):
        check_batchable("m", open_, [TensorSpec("y", "FP32", ())])
