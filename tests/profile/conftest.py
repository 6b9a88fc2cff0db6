"""Fixtures: small models (a tiny BERT encoder generated like the zoo's, the zoo's SqueezeNet,
and a LayerNorm before a projection), so the whole suite stays within seconds."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from profiling_support import ModelFile

from moirai import zoo
from moirai.profile import turns


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> ModelFile:
    """Two BERT layers of width 64 over 16 tokens: every fusion pattern of the real one."""
    path = tmp_path_factory.mktemp("models") / "tiny_bert.onnx"
    model = zoo.bert_encoder(layers=2, hidden=64, heads=2, seq=16, vocab=100, max_positions=32)
    model.ir_version = 8  # readable by older ONNX Runtimes too (e.g. a GPU build)
    zoo.save(model, path)
    return ModelFile(path, {"input_ids": [1, 16], "attention_mask": [1, 16]})


@pytest.fixture(scope="session")
def squeezenet() -> ModelFile:
    return ModelFile(zoo.get("squeezenet"), None)


@pytest.fixture(scope="session")
def layernorm_matmul(tmp_path_factory: pytest.TempPathFactory) -> ModelFile:
    """x[1, 128, 256] → LayerNormalization → MatMul (256 × 1024) → Add → y: a transformer's
    projection, which ONNX Runtime runs as Reshape → Gemm → Reshape (MatMulAddFusion)."""
    rng = np.random.default_rng(0)
    weights = {
        "ln.scale": (256,),
        "ln.bias": (256,),
        "w": (256, 1024),
        "b": (1024,),
    }
    graph = helper.make_graph(
        [
            helper.make_node("LayerNormalization", ["x", "ln.scale", "ln.bias"], ["h"], name="ln"),
            helper.make_node("MatMul", ["h", "w"], ["m"], name="matmul"),
            helper.make_node("Add", ["m", "b"], ["y"], name="add"),
        ],
        "layernorm_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 128, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 128, 1024])],
        [
            numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
            for name, shape in weights.items()
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = tmp_path_factory.mktemp("models") / "layernorm_matmul.onnx"
    onnx.save(model, path)
    return ModelFile(path, None)


class _Unloaded(turns.Machine):
    """No load counters: every turn counts as quiet."""

    def waited_ms(self) -> float | None:
        return None

    def busy_s(self) -> dict[int, float] | None:
        return None


@pytest.fixture(autouse=True)
def unloaded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests run on busy machines: whether a profile was measured under load is left out of
    them (a contended profile is measured again where a test expects a cache hit); the tests of
    `moirai.profile.turns` give the turns their own counters."""
    monkeypatch.setattr(turns, "Machine", _Unloaded)
