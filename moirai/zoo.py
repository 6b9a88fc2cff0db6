"""The bundled models: real CNN architectures shipped by `onnx`, and generated transformers.

**CNNs.** The `onnx` package ships the "light" versions of the ONNX model zoo's classic models
in `onnx/backend/test/data/light/`: the real topology at 224×224 (ResNet-50, Inception v1/v2,
DenseNet-121, ShuffleNet, SqueezeNet, VGG-19, AlexNet, ZFNet-512), exported from Caffe2 at
opset 9 / IR 3, with every weight produced by a `ConstantOfShape` node filled with 0.02 from a
shape initializer. They are useless for accuracy, faithful for placement: shapes, FLOPs and
weight sizes are those of the real networks (e.g. VGG-19's 575 MB, ResNet-50's 102 MB), and
ONNX Runtime folds the constants at load time just as it would hold real weights. They were
exported at batch 1; `with_symbolic_batch` makes that dimension symbolic, for dynamic batching.

**Transformers**, generated with `onnx.helper` in the operator patterns that exporters emit and
ONNX Runtime fuses — decomposed LayerNorm (ReduceMean/Sub/Pow/Sqrt/Div), GELU, attention with
separate or packed Q/K/V MatMuls, a scaled, masked Softmax:

- `bert_encoder`: BERT-base-like (word and position embeddings, padding mask from an
  `attention_mask` input, post-LayerNorm blocks, GELU as the Erf pattern), at opset 12 in
  exactly the subgraph ONNX Runtime's AttentionFusion matches. ONNX Runtime 1.2x/1.3x fuses
  the LayerNorms (into SkipLayerNormalization), GELU and the Q·Kᵀ scaling, but its level-1
  MatMulAddFusion first rewrites every 3-D MatMul+Add into Reshape/Gemm/Reshape, which
  pre-empts AttentionFusion and BiasGelu; the groups follow what the backend really does;
- `gpt2_decoder`: GPT-2-small-like (pre-LayerNorm blocks, packed QKV split in three, a causal
  mask, GELU as the tanh pattern, LM head tied to the token embedding).

Both take `input_ids` of shape (batch, sequence) with a symbolic batch dimension, like real
exports: pass `input_shapes(name)` to `load_model`/`build_costgraph`. Weights are drawn from
N(0, 0.02²) with a fixed seed (the initialisation BERT and GPT-2 use), so outputs stay finite;
generating BERT-base takes a few seconds. `get(name)` writes a generated model once into the
cache directory (`$MOIRAI_CACHE`, else `$XDG_CACHE_HOME/moirai`, else `~/.cache/moirai`) with
its weights as external data beside it.
"""

from __future__ import annotations

import copy
import math
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from moirai import cachedir
from moirai.errors import ModelError

# Part of a generated model's cache file name: bump it whenever a builder's output changes.
GENERATOR_VERSION = 3
IR_VERSION = 8
_LIGHT_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
_LIGHT = {
    "alexnet": "light_bvlc_alexnet",
    "densenet121": "light_densenet121",
    "inception_v1": "light_inception_v1",
    "inception_v2": "light_inception_v2",
    "resnet50": "light_resnet50",
    "shufflenet": "light_shufflenet",
    "squeezenet": "light_squeezenet",
    "vgg19": "light_vgg19",
    "zfnet512": "light_zfnet512",
}


# ----------------------------------------------------------------- builders
class _Builder:
    """Collects nodes and initializers under readable, unique names."""

    def __init__(self, seed: int, opset: int) -> None:
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.rng = np.random.default_rng(seed)

    def weight(self, name: str, *shape: int) -> str:
        data = self.rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        self.initializers.append(numpy_helper.from_array(data, name))
        return name

    def const(self, name: str, value: np.ndarray | float | list[int]) -> str:
        array = np.asarray(value, dtype=np.float32 if isinstance(value, float) else None)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, **attrs: object) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attrs))
        return name

    def linear(self, x: str, name: str, n_in: int, n_out: int) -> str:
        w = self.weight(f"{name}.weight", n_in, n_out)
        b = self.const(f"{name}.bias", np.zeros(n_out, np.float32))
        return self.op("Add", [self.op("MatMul", [x, w], f"{name}/MatMul"), b], f"{name}/Add")

    def layer_norm(self, x: str, name: str, hidden: int) -> str:
        """The decomposed LayerNorm of exports before opset 17 (fused by LayerNormFusion)."""
        mean = self.op("ReduceMean", [x], f"{name}/mean", axes=[-1])
        centred = self.op("Sub", [x, mean], f"{name}/sub")
        square = self.op("Pow", [centred, self.const(f"{name}.two", 2.0)], f"{name}/pow")
        var = self.op("ReduceMean", [square], f"{name}/var", axes=[-1])
        eps = self.op("Add", [var, self.const(f"{name}.eps", 1e-5)], f"{name}/add_eps")
        std = self.op("Sqrt", [eps], f"{name}/sqrt")
        norm = self.op("Div", [centred, std], f"{name}/div")
        gamma = self.const(f"{name}.weight", np.ones(hidden, np.float32))
        beta = self.const(f"{name}.bias", np.zeros(hidden, np.float32))
        scaled = self.op("Mul", [norm, gamma], f"{name}/mul")
        return self.op("Add", [scaled, beta], f"{name}/add")

    def gelu_erf(self, x: str, name: str) -> str:
        """x · ½(1 + erf(x/√2)) (fused by GeluFusion)."""
        scaled = self.op("Div", [x, self.const(f"{name}.sqrt2", math.sqrt(2.0))], f"{name}/div")
        erf = self.op("Erf", [scaled], f"{name}/erf")
        one = self.op("Add", [erf, self.const(f"{name}.one", 1.0)], f"{name}/add")
        product = self.op("Mul", [x, one], f"{name}/mul")
        return self.op("Mul", [product, self.const(f"{name}.half", 0.5)], f"{name}/mul_half")

    def gelu_tanh(self, x: str, name: str) -> str:
        """½x(1 + tanh(√(2/π)(x + 0.044715x³))) (fused by FastGeluFusion)."""
        cube = self.op("Pow", [x, self.const(f"{name}.three", 3.0)], f"{name}/pow")
        small = self.op("Mul", [cube, self.const(f"{name}.coef", 0.044715)], f"{name}/mul_coef")
        inner = self.op("Add", [x, small], f"{name}/add_cube")
        root = self.const(f"{name}.sqrt_2_pi", math.sqrt(2.0 / math.pi))
        tanh = self.op("Tanh", [self.op("Mul", [inner, root], f"{name}/mul_root")], f"{name}/tanh")
        one = self.op("Add", [tanh, self.const(f"{name}.one", 1.0)], f"{name}/add_one")
        half = self.op("Mul", [x, self.const(f"{name}.half", 0.5)], f"{name}/mul_half")
        return self.op("Mul", [half, one], f"{name}/mul")

    def heads(self, x: str, name: str, n_heads: int, head_dim: int, key: bool = False) -> str:
        """(B, S, H) → (B, heads, S, d), or (B, heads, d, S) for keys."""
        shape = self.const(f"{name}.shape", np.array([0, 0, n_heads, head_dim], np.int64))
        split = self.op("Reshape", [x, shape], f"{name}/reshape")
        return self.op(
            "Transpose", [split], f"{name}/transpose", perm=[0, 2, 3, 1] if key else [0, 2, 1, 3]
        )

    def attention(
        self, q: str, k: str, v: str, mask: str, name: str, hidden: int, n_heads: int
    ) -> str:
        """softmax(QKᵀ/√d + mask)V over heads, merged back to (B, S, H)."""
        d = hidden // n_heads
        q = self.heads(q, f"{name}/q", n_heads, d)
        k = self.heads(k, f"{name}/k", n_heads, d, key=True)
        v = self.heads(v, f"{name}/v", n_heads, d)
        scores = self.op("MatMul", [q, k], f"{name}/qk")
        scaled = self.op("Div", [scores, self.const(f"{name}.scale", math.sqrt(d))], f"{name}/div")
        masked = self.op("Add", [scaled, mask], f"{name}/mask")
        probs = self.op("Softmax", [masked], f"{name}/softmax", axis=3)
        context = self.op("MatMul", [probs, v], f"{name}/context")
        merged = self.op("Transpose", [context], f"{name}/merge", perm=[0, 2, 1, 3])
        shape = self.const(f"{name}.merge_shape", np.array([0, 0, hidden], np.int64))
        return self.op("Reshape", [merged, shape], f"{name}/merge_reshape")

    def model(
        self, name: str, inputs: list[onnx.ValueInfoProto], output: str, seq: int, hidden_out: int
    ) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            name,
            inputs,
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", seq, hidden_out])],
            self.initializers,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", self.opset)],
            producer_name="moirai.zoo",
            # The newest IR the `onnx` package writes can be newer than the ONNX Runtime that
            # serves the model reads (onnxruntime-gpu 1.31 stops at IR 13); opsets <= 17 need 8.
            ir_version=IR_VERSION,
        )
        onnx.checker.check_model(model)
        return model


def _ids(name: str, seq: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", seq])


def bert_encoder(
    layers: int = 12,
    hidden: int = 768,
    heads: int = 12,
    seq: int = 128,
    vocab: int = 30522,
    max_positions: int = 512,
    seed: int = 0,
) -> onnx.ModelProto:
    """A BERT-base-like encoder (defaults: BERT-base, 110 M parameters): inputs `input_ids`
    and `attention_mask` (batch, seq), output `last_hidden_state` (batch, seq, hidden)."""
    b = _Builder(seed, opset=12)
    positions = b.const("position_ids", np.arange(seq, dtype=np.int64)[None, :])
    words = b.op("Gather", [b.weight("embeddings.word", vocab, hidden), "input_ids"], "embed/word")
    where = b.op(
        "Gather",
        [b.weight("embeddings.position", max_positions, hidden), positions],
        "embed/position",
    )
    x = b.layer_norm(b.op("Add", [words, where], "embed/add"), "embed/norm", hidden)
    # Padding mask (B, S) → additive (B, 1, 1, S): 0 where attended, -10000 where padded.
    mask = b.op("Unsqueeze", ["attention_mask"], "mask/unsqueeze_1", axes=[1])
    mask = b.op("Unsqueeze", [mask], "mask/unsqueeze_2", axes=[2])
    mask = b.op("Cast", [mask], "mask/cast", to=TensorProto.FLOAT)
    mask = b.op("Sub", [b.const("mask.one", 1.0), mask], "mask/invert")
    mask = b.op("Mul", [mask, b.const("mask.min", -10000.0)], "mask/scale")
    for i in range(layers):
        p = f"layer{i}"
        q = b.linear(x, f"{p}/attention/query", hidden, hidden)
        k = b.linear(x, f"{p}/attention/key", hidden, hidden)
        v = b.linear(x, f"{p}/attention/value", hidden, hidden)
        context = b.attention(q, k, v, mask, f"{p}/attention", hidden, heads)
        out = b.linear(context, f"{p}/attention/output", hidden, hidden)
        x = b.layer_norm(
            b.op("Add", [out, x], f"{p}/attention/residual"), f"{p}/attention/norm", hidden
        )
        up = b.gelu_erf(b.linear(x, f"{p}/ffn/up", hidden, 4 * hidden), f"{p}/ffn/gelu")
        down = b.linear(up, f"{p}/ffn/down", 4 * hidden, hidden)
        x = b.layer_norm(b.op("Add", [down, x], f"{p}/ffn/residual"), f"{p}/ffn/norm", hidden)
    b.op("Identity", [x], "last_hidden_state")
    return b.model(
        "bert_encoder",
        [_ids("input_ids", seq), _ids("attention_mask", seq)],
        "last_hidden_state",
        seq,
        hidden,
    )


def gpt2_decoder(
    layers: int = 12,
    hidden: int = 768,
    heads: int = 12,
    seq: int = 128,
    vocab: int = 50257,
    max_positions: int = 1024,
    seed: int = 0,
) -> onnx.ModelProto:
    """A GPT-2-small-like decoder (defaults: GPT-2 small, 124 M parameters): input
    `input_ids` (batch, seq), output `logits` (batch, seq, vocab)."""
    b = _Builder(seed, opset=17)
    wte = b.weight("wte", vocab, hidden)
    positions = b.const("position_ids", np.arange(seq, dtype=np.int64)[None, :])
    x = b.op(
        "Add",
        [
            b.op("Gather", [wte, "input_ids"], "embed/token"),
            b.op("Gather", [b.weight("wpe", max_positions, hidden), positions], "embed/position"),
        ],
        "embed/add",
    )
    # Causal mask (1, 1, S, S): 0 on and below the diagonal, -10000 above.
    causal = np.triu(np.full((seq, seq), -10000.0, np.float32), k=1)[None, None]
    mask = b.const("causal_mask", causal)
    for i in range(layers):
        p = f"h{i}"
        qkv = b.linear(b.layer_norm(x, f"{p}/ln_1", hidden), f"{p}/attn/c_attn", hidden, 3 * hidden)
        sizes = b.const(f"{p}/attn.split", np.array([hidden] * 3, np.int64))
        split = helper.make_node(
            "Split", [qkv, sizes], [f"{p}/attn/{t}" for t in "qkv"], name=f"{p}/attn/split", axis=-1
        )
        b.nodes.append(split)
        context = b.attention(*split.output, mask, f"{p}/attn", hidden, heads)
        out = b.linear(context, f"{p}/attn/c_proj", hidden, hidden)
        x = b.op("Add", [x, out], f"{p}/attn/residual")
        up = b.gelu_tanh(
            b.linear(b.layer_norm(x, f"{p}/ln_2", hidden), f"{p}/mlp/c_fc", hidden, 4 * hidden),
            f"{p}/mlp/gelu",
        )
        x = b.op(
            "Add", [x, b.linear(up, f"{p}/mlp/c_proj", 4 * hidden, hidden)], f"{p}/mlp/residual"
        )
    x = b.layer_norm(x, "ln_f", hidden)
    # The LM head reuses the token embedding: a folded Transpose, i.e. a weight in a node.
    head = b.op("Transpose", [wte], "lm_head/weight", perm=[1, 0])
    b.op("MatMul", [x, head], "logits")
    return b.model("gpt2_decoder", [_ids("input_ids", seq)], "logits", seq, vocab)


_GENERATED: dict[str, tuple[Callable[[], onnx.ModelProto], dict[str, list[int]]]] = {
    "bert_base": (bert_encoder, {"input_ids": [1, 128], "attention_mask": [1, 128]}),
    "gpt2_small": (gpt2_decoder, {"input_ids": [1, 128]}),
}


# ------------------------------------------------------------------- access
def names() -> list[str]:
    """Every bundled model, CNNs first."""
    return [*_LIGHT, *_GENERATED]


def input_shapes(name: str) -> dict[str, list[int]] | None:
    """Static input shapes to load `name` with (None: its inputs are static already)."""
    _check(name)
    return _GENERATED[name][1] if name in _GENERATED else None


def get(name: str) -> Path:
    """The ONNX file of a bundled model; generated ones are written to the cache once."""
    _check(name)
    if name in _LIGHT:
        return _LIGHT_DIR / f"{_LIGHT[name]}.onnx"
    path = cache_dir() / f"{name}-v{GENERATOR_VERSION}.onnx"
    if not path.exists():
        save(_GENERATED[name][0](), path)
    return path


def with_symbolic_batch(model: onnx.ModelProto, name: str = "batch") -> onnx.ModelProto:
    """A copy of a model exported at a fixed batch size (the CNNs here, at 1) whose batch is
    symbolic: the first dimension of every input and output is `name`, and every Reshape whose
    target shape is a constant starting with the old batch size copies that dimension from its
    input instead (0), as exporters with dynamic axes write it. What else the model computes
    from the batch size it was exported at stays as it was."""
    model = copy.deepcopy(model)
    graph = model.graph
    weights = {t.name for t in graph.initializer}
    inputs = [v for v in graph.input if v.name not in weights]
    batch = inputs[0].type.tensor_type.shape.dim[0].dim_value if inputs else 0
    for value in (*inputs, *graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].dim_param = name
    del graph.value_info[:]  # shapes inferred at the old batch size
    shapes = {n.input[1] for n in graph.node if n.op_type == "Reshape" and len(n.input) > 1}
    for i, init in enumerate(graph.initializer):
        if init.name in shapes:
            target = numpy_helper.to_array(init).copy()
            if target.ndim == 1 and len(target) and target[0] == batch:
                target[0] = 0
                graph.initializer[i].CopyFrom(numpy_helper.from_array(target, init.name))
    onnx.checker.check_model(model)
    return model


def save(model: onnx.ModelProto, path: Path) -> None:
    """Write a model with its weights as external data (`<name>.data` beside it). Both files
    are written in a private directory and renamed into place, data first, so that a
    concurrent reader never sees half a model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = f"{path.name}.data"
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".tmp-") as tmp:
        onnx.save(
            model,
            Path(tmp, path.name),
            save_as_external_data=True,
            location=data,
            size_threshold=1024,
        )
        Path(tmp, data).replace(path.parent / data)
        Path(tmp, path.name).replace(path)


def matmul_chain(
    path: Path, size: int = 14000, layers: int = 3, *, dense: bool = True, seed: int = 0
) -> Path:
    """x(1, size) → MatMul → ... → y through `layers` size×size fp32 weights, written as
    external data (`<name>.data`, each weight at a 4 KiB boundary) one block of rows at a time,
    never whole in memory: the large model of the tests and `bench/largemodels.py` (three
    14000² weights are 2.35 GB). Weights are N(0, 1/size), so values keep their scale. With
    `dense=False` only every 64th row is non-zero (scaled up to match) and the rest of the data
    file is a hole: no disk used and nothing to write, which changes nothing that placement,
    memory or serving depend on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = f"{path.name}.data"
    rng = np.random.default_rng(seed)
    row_bytes = size * 4
    stride = 1 if dense else 64
    block = max(1, (64 << 20) // row_bytes)  # rows written at a time: at most 64 MiB
    initializers, nodes, offset = [], [], 0
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".tmp-") as tmp:
        with Path(tmp, data).open("wb") as f:
            for layer in range(layers):
                offset = -(-offset // 4096) * 4096
                for first in range(0, size, block if dense else stride):
                    rows = min(block, size - first) if dense else 1
                    values = rng.standard_normal((rows, size)) * math.sqrt(stride / size)
                    f.seek(offset + first * row_bytes)
                    f.write(values.astype(np.float32).tobytes())
                weight = onnx.TensorProto(
                    name=f"w{layer}", dims=[size, size], data_type=TensorProto.FLOAT
                )
                weight.data_location = TensorProto.EXTERNAL
                for key, value in (("location", data), ("offset", offset), ("length", size**2 * 4)):
                    weight.external_data.add(key=key, value=str(value))
                initializers.append(weight)
                previous = "x" if layer == 0 else f"h{layer - 1}"
                output = "y" if layer == layers - 1 else f"h{layer}"
                nodes.append(helper.make_node("MatMul", [previous, f"w{layer}"], [output]))
                offset += size**2 * 4
            f.truncate(offset)
        graph = helper.make_graph(
            nodes,
            f"matmul_chain_{size}x{layers}",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, size])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, size])],
            initializers,
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION
        )
        onnx.save(model, Path(tmp, path.name))
        Path(tmp, data).replace(path.parent / data)
        Path(tmp, path.name).replace(path)
    return path


def cache_dir() -> Path:
    return cachedir.cache_dir("zoo")


def _check(name: str) -> None:
    if name not in names():
        raise ModelError(f"unknown zoo model {name!r}; bundled models are {', '.join(names())}")
