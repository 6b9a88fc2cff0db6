"""The codec on its own: responses of OIP servers other than the gateway, which may answer with
typed contents instead of raw contents."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from stage_server import codec
from stage_server.client import AsyncInferenceClient
from stage_server.errors import InvalidInput
from stage_server.protos import grpc_predict_v2_pb2 as oip


def typed_response() -> oip.ModelInferResponse:
    """A response as Triton's or KServe's Python servers may send it: typed contents only."""
    response = oip.ModelInferResponse(model_name="m")
    y = response.outputs.add(name="y", datatype="FP32", shape=[2, 2])
    y.contents.fp32_contents.extend([1.0, 2.0, 3.0, 4.0])
    n = response.outputs.add(name="n", datatype="INT64", shape=[3])
    n.contents.int64_contents.extend([-1, 0, 2**40])
    b = response.outputs.add(name="b", datatype="BOOL", shape=[2])
    b.contents.bool_contents.extend([True, False])
    return response


def test_typed_output_contents_decode() -> None:
    """zip(strict=True) over no raw contents raised a ValueError."""
    got = codec.decode_infer_response(typed_response().SerializeToString())
    np.testing.assert_array_equal(got["y"], np.array([[1, 2], [3, 4]], np.float32))
    assert got["y"].dtype == np.float32
    np.testing.assert_array_equal(got["n"], np.array([-1, 0, 2**40], np.int64))
    np.testing.assert_array_equal(got["b"], [True, False])


def test_raw_output_contents_decode_as_before() -> None:
    y = np.arange(6, dtype=np.float32).reshape(2, 3)
    payload = codec.encode_infer_response("m", "", {"y": y})
    np.testing.assert_array_equal(codec.decode_infer_response(payload)["y"], y)


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (b"\xff\xff\xff\xff\x0f", "malformed"),
        (
            typed_response().SerializeToString() + b"\x32\x04abcd",  # one raw entry, 3 outputs
            "raw_output_contents has 1 entries for 3 outputs",
        ),
        (
            oip.ModelInferResponse(
                outputs=[oip.ModelInferResponse.InferOutputTensor(name="s", datatype="BF16")]
            ).SerializeToString(),
            "output 's': datatype 'BF16' is not supported",
        ),
        (
            oip.ModelInferResponse(
                outputs=[oip.ModelInferResponse.InferOutputTensor(name="s", datatype="BYTES")]
            ).SerializeToString(),
            "output 's': contents.bytes_contents holds 0 values, but shape .. needs 1",
        ),
    ],
    ids=["garbage", "raw-count", "bf16", "bytes"],
)
def test_responses_that_do_not_add_up(payload: bytes, needle: str) -> None:
    with pytest.raises(InvalidInput, match=needle):
        codec.decode_infer_response(payload)


async def test_client_reads_an_oip_server_that_answers_typed_contents() -> None:
    """`moirai infer` against such a server ended in a ValueError traceback."""

    async def infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return typed_response().SerializeToString()

    handler = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService",
        {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)},
    )
    server = grpc.aio.server(handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = AsyncInferenceClient(f"127.0.0.1:{port}")
    try:
        got = await client.infer("m", {"x": np.zeros(2, np.float32)}, timeout_s=10)
        assert got["y"].tolist() == [[1, 2], [3, 4]]
    finally:
        await client.close()
        await server.stop(None)
