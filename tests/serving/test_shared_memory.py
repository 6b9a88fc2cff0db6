"""Clients' shared memory (Triton's system shared-memory extension, `stage_server.regions`):
tritonclient registers regions of POSIX shared memory, sends inputs there and asks for outputs
there, over gRPC and HTTP; bad regions are refused in one line and the server serves on."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from multiprocessing import shared_memory

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc.aio as tgrpc
import tritonclient.http.aio as thttp
from tritonclient.utils import InferenceServerException

from stage_server.settings import EndpointConfig

from . import models
from .conftest import split_plan

ALLOWED = EndpointConfig(allow_shared_memory=True)


@pytest.fixture
def segments() -> Iterator[object]:
    """`segments(nbytes)`: a new POSIX shared-memory object, and its key; removed after."""
    made: list[shared_memory.SharedMemory] = []

    def make(nbytes: int) -> tuple[shared_memory.SharedMemory, str]:
        segment = shared_memory.SharedMemory(f"moirai-test-{uuid.uuid4().hex[:12]}", True, nbytes)
        made.append(segment)
        return segment, "/" + segment.name

    yield make
    for segment in made:
        segment.close()
        segment.unlink()


def _client(module, url):
    return module.InferenceServerClient(url)


@pytest.mark.parametrize("module", [tgrpc, thttp], ids=["grpc", "http"])
async def test_inputs_and_outputs_in_shared_memory_equal_ort(cluster, segments, module) -> None:
    model = models.mlp(width=32, depth=3, batch=4)
    c = await cluster(model, split_plan(model, 2), endpoint=ALLOWED)
    x = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    segment, key = segments(2 * x.nbytes)
    np.ndarray(x.shape, x.dtype, segment.buf)[:] = x
    client = _client(module, c.grpc_url if module is tgrpc else c.http_url)
    try:
        await client.register_system_shared_memory("io", key, 2 * x.nbytes)
        status = await client.get_system_shared_memory_status(**_as_json(module))
        assert _regions(status) == {"io": (key, 2 * x.nbytes)}
        inp = module.InferInput("x", list(x.shape), "FP32")
        inp.set_shared_memory("io", x.nbytes)
        out = module.InferRequestedOutput("y")
        out.set_shared_memory("io", want.nbytes, offset=x.nbytes)
        for _ in range(3):  # the same region again and again
            await client.infer("mlp", [inp], outputs=[out])
            got = np.ndarray(want.shape, want.dtype, segment.buf, offset=x.nbytes)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
            np.ndarray(want.shape, want.dtype, segment.buf, offset=x.nbytes)[:] = 0
        # An input in shared memory beside one in the request's output bytes.
        plain = module.InferRequestedOutput("y")
        result = await client.infer("mlp", [inp], outputs=[plain])
        np.testing.assert_allclose(result.as_numpy("y"), want, rtol=1e-5, atol=1e-6)
        with pytest.raises(InferenceServerException, match="registered already"):
            await client.register_system_shared_memory("io", key, 8)
        await client.unregister_system_shared_memory("io")
        status = await client.get_system_shared_memory_status(**_as_json(module))
        assert _regions(status) == {}
        with pytest.raises(InferenceServerException, match="no shared memory region 'io'"):
            await client.infer("mlp", [inp])
    finally:
        await client.close()


async def test_large_outputs_are_written_into_shared_memory_aligned_or_not(
    cluster, segments
) -> None:
    """A one-stage plan's quick stage writes a large output straight into the client's region
    (fused), or the front end copies it there (misaligned, or a stage in another process): the
    same answer, request after request."""
    model = models.mlp(width=256, depth=2, batch=128)  # a 128 KiB output
    c = await cluster(model, split_plan(model, 1), endpoint=ALLOWED)
    x = np.random.default_rng(0).standard_normal((128, 256)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    segment, key = segments(x.nbytes + want.nbytes + 4)
    np.ndarray(x.shape, x.dtype, segment.buf)[:] = x
    client = _client(tgrpc, c.grpc_url)
    try:
        await client.register_system_shared_memory("io", key, x.nbytes + want.nbytes + 4)
        inp = tgrpc.InferInput("x", list(x.shape), "FP32")
        inp.set_shared_memory("io", x.nbytes)
        for offset in (x.nbytes, x.nbytes + 4):
            out = tgrpc.InferRequestedOutput("y")
            out.set_shared_memory("io", want.nbytes, offset=offset)
            for _ in range(12):  # the first runs in a task; once known quick, right away
                await client.infer("mlp", [inp], outputs=[out])
                got = np.ndarray(want.shape, want.dtype, segment.buf, offset=offset)
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
                got[:] = 0
                del got
        await client.unregister_system_shared_memory("io")
    finally:
        await client.close()


def _as_json(module) -> dict[str, bool]:
    return {"as_json": True} if module is tgrpc else {}


def _regions(status) -> dict[str, tuple[str, int]]:
    entries = status.get("regions", {}).values() if isinstance(status, dict) else status
    return {r["name"]: (r["key"], int(r["byte_size"])) for r in entries}


async def test_refused_regions_say_why_and_the_server_serves_on(cluster, segments) -> None:
    model = models.mlp(width=32, depth=3)
    c = await cluster(model, split_plan(model, 1), endpoint=ALLOWED)
    x = np.ones((1, 32), np.float32)
    _, key = segments(x.nbytes)
    os.symlink(f"/dev/shm/{key[1:]}", f"/dev/shm/{key[1:]}-link")
    client = tgrpc.InferenceServerClient(c.grpc_url)
    try:
        for name, bad_key, size, offset, says in [
            ("a", "/../etc/passwd", 8, 0, "is not the name of a POSIX shared-memory object"),
            ("b", "/moirai-no-such-key", 8, 0, "cannot open key"),
            ("c", key, x.nbytes + 1, 0, "pass the end of"),
            ("d", key, 8, x.nbytes, "pass the end of"),
            ("e", f"{key}-link", 8, 0, "cannot open key"),  # a symbolic link: not followed
        ]:
            with pytest.raises(InferenceServerException, match=says):
                await client.register_system_shared_memory(name, bad_key, size, offset)
        await client.register_system_shared_memory("x", key, x.nbytes)
        for size, offset, says in [
            (x.nbytes - 4, 0, "shared_memory_byte_size is 124, but FP32 \\[1, 32\\] needs 128"),
            (x.nbytes, 4, "do not fit in shared memory region 'x'"),
        ]:
            inp = tgrpc.InferInput("x", [1, 32], "FP32")
            inp.set_shared_memory("x", size, offset)
            with pytest.raises(InferenceServerException, match=says) as e:
                await client.infer("mlp", [inp])
            assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
        inp = tgrpc.InferInput("x", [1, 32], "FP32")
        inp.set_data_from_numpy(x)
        result = await client.infer("mlp", [inp])
        assert result.as_numpy("y").shape == (1, 32)
    finally:
        os.unlink(f"/dev/shm/{key[1:]}-link")
        await client.close()


async def test_shared_memory_is_refused_unless_allowed(cluster, segments) -> None:
    model = models.mlp(width=32, depth=3)
    c = await cluster(model, split_plan(model, 1))
    _, key = segments(128)
    client = tgrpc.InferenceServerClient(c.grpc_url)
    http = thttp.InferenceServerClient(c.http_url)
    try:
        with pytest.raises(InferenceServerException, match="--allow-shared-memory") as e:
            await client.register_system_shared_memory("x", key, 128)
        assert e.value.status() == str(grpc.StatusCode.PERMISSION_DENIED)
        inp = tgrpc.InferInput("x", [1, 32], "FP32")
        inp.set_shared_memory("x", 128)
        with pytest.raises(InferenceServerException, match="--allow-shared-memory"):
            await client.infer("mlp", [inp])
        with pytest.raises(InferenceServerException, match="--allow-shared-memory") as e:
            await http.register_system_shared_memory("x", key, 128)
        assert e.value.status() == "403"
        assert "system_shared_memory" not in (await http.get_server_metadata())["extensions"]
    finally:
        await client.close()
        await http.close()


def test_the_flag_reaches_the_children_of_serve() -> None:
    """`moirai serve --allow-shared-memory` hands the flag on to the front end's process."""
    import argparse

    from stage_server.settings import add_arguments, from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = from_args(parser.parse_args(["--allow-shared-memory"]))
    assert config.allow_shared_memory and "--allow-shared-memory" in config.to_args()
    assert from_args(parser.parse_args(config.to_args())) == config
    assert "--allow-shared-memory" not in EndpointConfig().to_args()


@pytest.mark.parametrize("module", [tgrpc, thttp], ids=["grpc", "http"])
async def test_string_tensors_in_shared_memory_are_length_prefixed(
    cluster, segments, module
) -> None:
    """A BYTES input in a client's region, in Triton's form (each element a 4-byte length then
    its bytes, as tritonclient's serialize_byte_tensor writes it), and a BYTES output written
    there in the same form."""
    from tritonclient.utils import serialize_byte_tensor

    model = models.strings()
    c = await cluster(model, split_plan(model, 2), endpoint=ALLOWED)
    inputs = models.string_inputs(5, seed=2)
    upper, _ = ort.InferenceSession(model.SerializeToString()).run(None, inputs)
    city = serialize_byte_tensor(inputs["city"]).item()
    want = serialize_byte_tensor(upper).item()
    segment, key = segments(len(city) + len(want) + 64)
    segment.buf[: len(city)] = city
    client = _client(module, c.grpc_url if module is tgrpc else c.http_url)
    try:
        await client.register_system_shared_memory("io", key, len(city) + len(want) + 64)
        city_in = module.InferInput("city", [5, 1], "BYTES")
        city_in.set_shared_memory("io", len(city))
        age_in = module.InferInput("age", [5, 1], "FP32")
        age_in.set_data_from_numpy(inputs["age"])
        out = module.InferRequestedOutput("upper")
        out.set_shared_memory("io", len(want) + 64, offset=len(city))
        result = await client.infer("strings", [city_in, age_in], outputs=[out])
        assert bytes(segment.buf[len(city) : len(city) + len(want)]) == want
        assert result.as_numpy("score") is None  # only what was asked for
        # One byte short of the input's elements: refused in one line, naming it.
        city_in.set_shared_memory("io", len(city) - 1)
        with pytest.raises(InferenceServerException, match="input 'city'"):
            await client.infer("strings", [city_in, age_in], outputs=[out])
        await client.unregister_system_shared_memory("io")
    finally:
        await client.close()
