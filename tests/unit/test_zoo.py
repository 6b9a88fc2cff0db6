"""moirai.zoo: the bundled CNNs load; the generated transformers run and fuse as intended."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from moirai import zoo
from moirai.errors import ModelError
from moirai.fusion import CPU, CUDA, fusion_groups
from moirai.graph import build_graph, load_model

TINY = {"layers": 2, "hidden": 32, "heads": 2, "seq": 8, "vocab": 100, "max_positions": 16}


def test_names() -> None:
    names = zoo.names()
    assert names[:9] == [
        "alexnet",
        "densenet121",
        "inception_v1",
        "inception_v2",
        "resnet50",
        "shufflenet",
        "squeezenet",
        "vgg19",
        "zfnet512",
    ]
    assert names[9:] == ["bert_base", "gpt2_small"]


@pytest.mark.parametrize("name", zoo.names()[:9])
def test_light_models_load_with_static_shapes(name: str) -> None:
    assert zoo.input_shapes(name) is None
    graph = build_graph(load_model(zoo.get(name)))
    assert len(graph.inputs) == 1 and graph.tensors[graph.inputs[0]].shape == (1, 3, 224, 224)
    assert not graph.unknown_shapes


def test_unknown_name() -> None:
    with pytest.raises(ModelError, match="unknown zoo model 'gpt5'; bundled models are alexnet"):
        zoo.get("gpt5")


def _run(path: Path, shapes: dict[str, list[int]]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=[CPU])
    feeds = {name: np.ones(shape, np.int64) for name, shape in shapes.items()}
    return session.run(None, feeds)[0]


@pytest.mark.parametrize(
    ("builder", "shapes", "output"),
    [
        (zoo.bert_encoder, {"input_ids": [2, 8], "attention_mask": [2, 8]}, (2, 8, 32)),
        (zoo.gpt2_decoder, {"input_ids": [2, 8]}, (2, 8, 100)),
    ],
    ids=["bert", "gpt2"],
)
def test_generated_transformers_run_and_fuse(builder, shapes, output, tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    zoo.save(builder(**TINY), path)
    assert (tmp_path / "m.onnx.data").exists()  # weights as external data
    result = _run(path, shapes)
    assert result.shape == output and np.isfinite(result).all()
    priced = load_model(path)  # the symbolic batch priced at 1
    dims = [d.dim_value for d in priced.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, shapes["input_ids"][1]]
    loaded = load_model(path, shapes)
    graph = build_graph(loaded)
    groups = fusion_groups(loaded, graph, [CPU, CUDA])
    types = [[graph.node[n].op_type for n in g.ops] for g in groups]
    # Every LayerNorm (2 per layer, plus the embedding's or the final one) is one group.
    norms = [t for t in types if t.count("ReduceMean") == 2 and "Sqrt" in t]
    assert len(norms) == 2 * TINY["layers"] + 1
    gelu = ["Erf"] if builder is zoo.bert_encoder else ["Tanh"]
    assert sum(all(op in t for op in gelu) and "Mul" in t for t in types) == TINY["layers"]
    assert len(groups) < len(graph.nodes) / 2


def test_generated_models_are_deterministic() -> None:
    a = zoo.gpt2_decoder(**TINY).SerializeToString()
    b = zoo.gpt2_decoder(**TINY).SerializeToString()
    assert a == b != zoo.gpt2_decoder(**{**TINY, "seed": 1}).SerializeToString()


def test_get_materialises_generated_models_once(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MOIRAI_CACHE", str(tmp_path))
    calls = []

    def tiny():
        calls.append(1)
        return zoo.bert_encoder(**TINY)

    monkeypatch.setitem(zoo._GENERATED, "bert_base", (tiny, zoo._GENERATED["bert_base"][1]))
    path = zoo.get("bert_base")
    assert path == tmp_path / "zoo" / f"bert_base-v{zoo.GENERATOR_VERSION}.onnx"
    assert zoo.get("bert_base") == path and len(calls) == 1
    files = sorted(p.name for p in path.parent.iterdir())
    assert files == [path.name, f"{path.name}.data"]  # no temporary left behind
    assert zoo.input_shapes("bert_base") == {"input_ids": [1, 128], "attention_mask": [1, 128]}


def test_a_cnn_with_its_batch_made_symbolic_answers_each_row_as_batch_1() -> None:
    model = zoo.with_symbolic_batch(onnx.load(str(zoo.get("resnet50"))))
    dims = [d.dim_param or d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 1000]
    session = ort.InferenceSession(model.SerializeToString(), providers=[CPU])
    name = session.get_inputs()[0].name
    x = np.random.default_rng(0).random((2, 3, 224, 224), dtype=np.float32)
    both = session.run(None, {name: x})[0]
    assert both.shape == (2, 1000)
    for row in range(2):
        alone = session.run(None, {name: x[row : row + 1]})[0]
        np.testing.assert_allclose(both[row : row + 1], alone, rtol=1e-4, atol=1e-6)
