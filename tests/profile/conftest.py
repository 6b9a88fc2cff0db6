"""Fixtures: small models (a tiny BERT encoder generated like the zoo's, and the zoo's
SqueezeNet) and quick profiling settings, so the whole suite stays within seconds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from moirai import zoo
from moirai.graph import InputShapes
from moirai.profile.measured import Settings

FAST = Settings(warmup=1, repeats=3)


@dataclass(frozen=True)
class ModelFile:
    path: Path
    input_shapes: InputShapes | None


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> ModelFile:
    """Two BERT layers of width 64 over 16 tokens: every fusion pattern of the real one."""
    path = tmp_path_factory.mktemp("models") / "tiny_bert.onnx"
    zoo.save(
        zoo.bert_encoder(layers=2, hidden=64, heads=2, seq=16, vocab=100, max_positions=32), path
    )
    return ModelFile(path, {"input_ids": [1, 16], "attention_mask": [1, 16]})


@pytest.fixture(scope="session")
def squeezenet() -> ModelFile:
    return ModelFile(zoo.get("squeezenet"), None)
