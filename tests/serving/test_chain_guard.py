"""What a chain port accepts from whoever reaches it: calls with the deployment's token only,
over gRPC and the same-host path; at a stage server, only the tensors the plan routes to the
stage named, deadlines no later than the server's timeout, and no more bytes than its cap (the
issue's case: thirty pushes of a megabyte with a ten-year deadline no longer pin 30 MB)."""

from __future__ import annotations

import asyncio
import struct

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper

from moirai.partition import build_plan
from moirai.stageplan import DeviceSpec, StagePlan
from stage_server import codec, samehost
from stage_server.chain import Peers, now_ms
from stage_server.errors import InvalidInput, Overloaded, Unauthenticated
from stage_server.serve import ChainOptions, start_chain, start_stage

from .conftest import Recorder, free_ports

pytestmark = pytest.mark.timeout(60)

N = 1 << 18  # 1 MiB of FP32
YEAR_MS = 365 * 24 * 3600 * 1000.0


def _add_model() -> tuple[object, StagePlan]:
    """y = x + z, one stage on cpu-0 that waits for both inputs."""
    info = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, N]) for n in "xzy"]
    graph = helper.make_graph([helper.make_node("Add", ["x", "z"], ["y"], name="Add_0")], "add",
                              info[:2], info[2:])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    plan = build_plan(model, {"Add_0": "cpu-0"}, [DeviceSpec("cpu-0", threads=1)])
    return model, plan


@pytest.mark.parametrize("same_host", [True, False], ids=["same-host", "grpc"])
async def test_the_chain_takes_calls_with_the_deployments_token_only(same_host: bool) -> None:
    _, plan = _add_model()
    recorder = Recorder()
    server = await start_chain(recorder, options=ChainOptions(token="s3cret"))
    address = {"cpu-0": f"127.0.0.1:{server.port}"}
    x = {"x": np.ones((1, N), np.float32)}
    stage = plan.stages[0].id
    try:
        for token in (None, "wrong"):
            peers = Peers(plan, address, same_host=same_host, token=token)
            with pytest.raises(Unauthenticated, match="needs its token"):
                await peers.push(stage, "r", x, now_ms() + 5000)
            with pytest.raises(Unauthenticated):  # failure reports travel over gRPC
                await peers.fail("cpu-0", "r", "CANCELLED", "", "gateway", now_ms() + 5000)
            await peers.close()
        peers = Peers(plan, address, same_host=same_host, token="s3cret")
        await peers.push(stage, "r", x, now_ms() + 5000)
        await peers.fail("cpu-0", "r", "CANCELLED", "", "gateway", now_ms() + 5000)
        await peers.close()
        async with grpc.aio.insecure_channel(address["cpu-0"]) as channel:  # health is open
            check = health_pb2_grpc.HealthStub(channel).Check
            reply = await check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(0)
    assert [d.request_id for d in recorder.deliveries] == ["r"]
    assert recorder.failures == [("r", "CANCELLED")]


@pytest.mark.skipif(not samehost.SUPPORTED, reason="no same-host fast path here")
async def test_a_same_host_caller_without_the_token_cannot_make_the_listener_buffer() -> None:
    """A first frame announcing a gigabyte is answered UNAUTHENTICATED and the connection closed,
    without reading it."""
    server = await start_chain(Recorder(), options=ChainOptions(token="s3cret"))
    try:
        reader, writer = await asyncio.open_unix_connection(samehost.socket_name(server.port))
        writer.write(struct.pack("<I", 1 << 30) + b"\0" * 1000)
        ack = await asyncio.wait_for(reader.read(), 20)  # up to the end: the server closed
        assert b"UNAUTHENTICATED\0the chain of this deployment needs its token" in ack
        writer.close()
    finally:
        await server.stop(0)


async def test_a_stage_server_takes_only_what_the_plan_routes_to_it() -> None:
    model, plan = _add_model()
    gateway = await start_chain(Recorder())
    (port,) = free_ports(1)
    addresses = {"cpu-0": f"127.0.0.1:{port}", "gateway": f"127.0.0.1:{gateway.port}"}
    server = await start_stage(model, plan, "cpu-0", addresses, port=port, same_host=False)
    peers = Peers(plan, addresses, same_host=False)
    stage = plan.stages[0].id
    ones = np.ones((1, N), np.float32)
    deadline = now_ms() + 5000
    try:
        refused = [
            ({"q": ones}, "s0 takes no tensor 'q': the plan routes x, z to it"),
            ({"x": ones.astype(np.float64)}, "tensor 'x' is FP64 [1, 262144], but the plan"),
            ({"x": ones[:, :8]}, "tensor 'x' is FP32 [1, 8], but the plan has FP32"),
            ({"x": np.array([["a"] * 8], object)}, "'x' is BYTES [1, 8], but the plan has FP32"),
        ]
        for tensors, message in refused:
            with pytest.raises(InvalidInput) as e:
                await peers.push(stage, "r", tensors, deadline)
            assert message in str(e.value)
        with pytest.raises(InvalidInput, match="cpu-0 takes no tensor 'x': the plan routes no"):
            await peers.push("cpu-0", "r", {"x": ones}, deadline)  # a device is no stage
        assert server.impl.held_bytes == 0 and not server.impl.pending
        await peers.push(stage, "r", {"x": ones}, deadline)
        assert server.impl.held_bytes == ones.nbytes
    finally:
        await peers.close()
        await server.stop(0)
        await gateway.stop(0)


async def test_thirty_pushes_with_a_ten_year_deadline_hold_no_more_than_the_cap() -> None:
    """Each push is half a request (x, not z), so the stage server keeps it waiting for the
    other half. With a cap of 5 MiB the sixth is refused; every deadline is brought forward to
    the server's timeout, after which the sweeper frees them all."""
    model, plan = _add_model()
    gateway = await start_chain(Recorder())
    (port,) = free_ports(1)
    addresses = {"cpu-0": f"127.0.0.1:{port}", "gateway": f"127.0.0.1:{gateway.port}"}
    options = ChainOptions(max_pending_bytes=5 << 20, timeout_s=1.0)
    server = await start_stage(model, plan, "cpu-0", addresses, port=port, chain=options)
    peers = Peers(plan, addresses)
    stage = plan.stages[0].id
    x = {"x": np.ones((1, N), np.float32)}
    outcomes = []
    try:
        for i in range(30):
            try:
                await peers.push(stage, f"r{i}", x, now_ms() + 10 * YEAR_MS)
                outcomes.append("held")
            except Overloaded as e:
                assert "--max-pending-bytes 5242880): retry later" in str(e)
                outcomes.append("refused")
            assert server.impl.held_bytes <= 5 << 20
        assert outcomes == ["held"] * 5 + ["refused"] * 25
        assert all(p.deadline_ms <= now_ms() + 1000.0 for p in server.impl.pending.values())
        for _ in range(200):  # the sweeper frees them once their (brought forward) deadline passed
            if not server.impl.pending:
                break
            await asyncio.sleep(0.05)
        assert server.impl.held_bytes == 0 and not server.impl.pending
        # A failure report with a ten-year deadline leaves a tombstone of the timeout at most.
        await peers.fail("cpu-0", "r99", "CANCELLED", "", "gateway", now_ms() + 10 * YEAR_MS)
        assert server.impl.cancelled["r99"] <= now_ms() + 1000.0
    finally:
        await peers.close()
        await server.stop(0)
        await gateway.stop(0)


async def test_a_pushed_string_tensor_counts_its_memory_against_the_cap() -> None:
    """Its strings, not only its pointers (`nbytes`): 20000 words of two letters take 160 KB of
    pointers and 1.2 MB of memory; with a cap of 1 MB the stage server refuses them."""
    k = 20000
    info = [helper.make_tensor_value_info("s", TensorProto.STRING, [1, k]),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])]  # fmt: skip
    nodes = [
        helper.make_node("LabelEncoder", ["s"], ["code"], domain="ai.onnx.ml", name="Code_0",
                         keys_strings=["ab"], values_int64s=[1], default_int64=0),
        helper.make_node("Cast", ["code"], ["f"], to=TensorProto.FLOAT, name="Cast_1"),
        helper.make_node("Add", ["f", "x"], ["y"], name="Add_2"),
    ]  # fmt: skip
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, k])
    graph = helper.make_graph(nodes, "words", info, [y])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=8)
    placement = dict.fromkeys(["Code_0", "Cast_1", "Add_2"], "cpu-0")
    plan = build_plan(model, placement, [DeviceSpec("cpu-0", threads=1)])
    words = {"s": np.array([["ab"] * k], dtype=object)}
    memory = codec.memory_bytes(words["s"])
    assert memory > 7 * words["s"].nbytes
    for cap, held in [(memory, memory), (1 << 20, 0)]:
        gateway = await start_chain(Recorder())
        (port,) = free_ports(1)
        addresses = {"cpu-0": f"127.0.0.1:{port}", "gateway": f"127.0.0.1:{gateway.port}"}
        options = ChainOptions(max_pending_bytes=cap)
        server = await start_stage(model, plan, "cpu-0", addresses, port=port, chain=options)
        peers = Peers(plan, addresses)
        try:
            if held:
                await peers.push(plan.stages[0].id, "r", words, now_ms() + 5000)
            else:
                with pytest.raises(Overloaded, match=r"and \d+ more would pass its limit"):
                    await peers.push(plan.stages[0].id, "r", words, now_ms() + 5000)
            assert server.impl.held_bytes == held
        finally:
            await peers.close()
            await server.stop(0)
            await gateway.stop(0)
