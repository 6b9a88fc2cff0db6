"""Fixtures: small models (a tiny BERT encoder generated like the zoo's, and the zoo's
SqueezeNet), so the whole suite stays within seconds."""

from __future__ import annotations

import pytest
from profiling_support import ModelFile

from moirai import zoo


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
