"""Step 2 of the pipeline: fusion-aware coarsening — the tasks the solvers place.

ONNX Runtime fuses operators when it loads a model (Conv+BatchNorm+Relu into one FusedConv,
the Erf pattern into Gelu, the mean/variance pattern into LayerNormalization...). A placement
that cut through such a fusion would forbid it, so the groups are taken from the backend itself
rather than guessed: a session is created for the provider with level `ORT_ENABLE_EXTENDED` (and
for the CPU also `ORT_ENABLE_ALL`, what stage servers run: see "The all level" below) and
`optimized_model_filepath`, and each node of the optimised graph is mapped back to the original
nodes it replaced. Tensor names at fusion boundaries survive optimisation, so an optimised node
*claims* the original nodes found by walking back from its outputs through original producers,
stopping at every tensor that still exists in the optimised graph::

    x ─► Conv ─► BatchNormalization ─► Relu ─► y        original
    x ─► FusedConv ──────────────────────────► y        optimised (CPU)
         claims {Conv, BatchNormalization, Relu, and the folded weight producers}

An original node claimed by exactly one optimised node belongs to it. A node claimed by none was
folded or eliminated (Constant, Shape chains on static shapes, Identity, Dropout) and a node
claimed by several was eliminated in front of several consumers; neither is computed by a fused
kernel, so each joins the unit of its first consumer. The result, per provider, is a set of
*fusion units*, each about one kernel launch on that provider.

**The all level (CPU).** Stage servers and the measured profiler run level `ORT_ENABLE_ALL`,
where the CPU provider's NCHWc transformer rewrites convolutions (and the pooling, Concat,
Resize and per-channel Mul/Add around them) into the blocked layout, with ReorderInput/
ReorderOutput at the layout's borders, and lets an NCHWc Conv take in the Add after it (as a
fourth, "Sum" input) and then an activation. ResNet's Conv+BN, Sum and Relu become one kernel,
which the extended level keeps as three. The transformer renames every tensor inside the layout
(`reorder_token_N`), so the claim walk cannot run on the all-level graph as it is;
`restore_layout` first maps it onto the extended graph:

    extended   r9 ─► Conv n10 ─► r11 ─► Sum n14 ─► r14 ─► Relu n15 ─► r15 ─► FusedConv n16
    all        t9 ─► Conv "r11_nchwc" (Sum input, activation Relu) ─► t15 ─► Conv "r18_nchwc"

- each all-level node comes from one extended node: the same name (for an unnamed node, as
  ONNX Runtime leaves the nodes of a function body it inlines, HardSwish's HardSigmoid and
  Mul: the extended node of its operator that computes its first output), or for an NCHWc node
  `<tensor>[_bn|_mul|_add]_nchwc[_token_N]`, the producer of `<tensor>` (ONNX Runtime names
  its nodes so), of a compatible operator;
- input i of an all-level node is input i of the node it comes from (the fourth input of an
  NCHWc Conv that took in an Add is that Add's other input), and a Reorder's output is its
  input: so each token gets the extended tensor it holds, and an NCHWc node's output becomes
  whatever its consumers read (t15 is r15, since "r18_nchwc" comes from n16, which reads r15);
- Reorder nodes are dropped: they only convert layouts, computing nothing of the model (one
  that took in a Transpose to or from channels-last, `channels_last=1`, holds two tensors of
  the extended graph, named by its neighbours; the Transpose joins the group of the Conv);
- a node outside the layout that the extended graph does not have, and whose outputs are
  extended tensors, is a fusion of the all level's own and is kept as it is (a float16
  model's `SimplifiedLayerNormalization`: the CPU provider wraps float16 nodes in casts, and
  only the all level, having removed the casts between them, fuses the norm).

The restored graph then goes through the claim walk like any other. Every step checks what it
assumes (one extended tensor per token, an output at or after the node it comes from, through
nodes whose other results only they read, each tensor computed once) and raises `LayoutError`
otherwise; the CPU then keeps the extended level's fusions, with a warning, which is what
Moirai did before this mapping.

What groups cannot guarantee: a stage's session sees its border tensors as plain (NCHW) inputs,
so a cut inside a layout region costs a Reorder pair, and an Add whose *other* input crosses the
border is no longer taken in by its Conv (ONNX Runtime fuses it only when both inputs are NCHWc
tensors of the same session), nor, since that Add's output is then plain too, the Add of each
following identity block. In ResNet-50 only a cut right before a projection block keeps all 65
NCHWc fusions; other cuts at group borders lose 2 to 10 (each a Conv whose Add and Relu then run
apart). Pricing such cuts is the cost model's business, not the grouping's.

Fusions differ by execution provider — ConvActivationFusion and GemmActivationFusion run for CPU
only — so the units of every provider present are merged (union-find) into groups: whatever
device a task lands on, no fusion of its provider is split. Each group keeps its units per
provider (`Group.kernels`), so a cost model charges a device for its own provider's launches.
Merging can make the group graph cyclic (A's fusion and B's fusion interleave), so strongly
connected components are contracted. A tensor that cannot cross a stage border (a sequence, a
string, a tensor of unknown rank) also keeps its producer and its consumers in one group.

CUDA without onnxruntime-gpu (this project's default install): the CUDA units are those of a
CPU session with the CPU-only transformers disabled (`_CPU_ONLY_TRANSFORMERS`, the list in
ONNX Runtime's `graph_transformer_utils.cc`). The CUDA-only level-2 transformers of ONNX Runtime
1.2x/1.3x have nothing to do on standard ONNX inference graphs — BiasDropoutFusion (dropout is
already eliminated at inference) and GroupQueryAttentionFusion (it rewrites contrib attention
operators that only the offline transformer optimiser produces) — so no rule table is needed to
add CUDA-only fusions. What the emulation cannot see is the CUDA provider declining a node (no
CUDA kernel: it falls back to CPU, where CPU fusions then apply). Where onnxruntime-gpu is
installed the CUDA provider itself is asked: the backend is the source of truth. Any other
provider that is not installed gets the CPU provider's extended-level units, with a warning. The
CUDA units always come from the extended level: the NCHWc transformer is the CPU provider's.

Very large graphs can be coarsened further (`max_tasks`): an edge u→v can be contracted without
creating a cycle when u has one successor or v has one predecessor (chains and trees); the
lightest such pair goes first. When none is left, two groups adjacent in a topological order
are merged, which is always safe.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort

from moirai.dag import topological_order
from moirai.devices import CPU, CUDA
from moirai.errors import ModelError, MoiraiError, one_line
from moirai.graph import OpGraph
from moirai.stageplan import border_problem
from moirai.weights import optimised_model_without_weights, ort_session

log = logging.getLogger(__name__)

# Level-2 transformers that ONNX Runtime registers for the CPU provider but not for CUDA
# (onnxruntime/core/optimizer/graph_transformer_utils.cc).
_CPU_ONLY_TRANSFORMERS = (
    "ConvActivationFusion",
    "GemmActivationFusion",
    "MatMulIntegerToFloatFusion",
    "DynamicQuantizeMatMulFusion",
    "MatMulNBitsFusion",
    "QDQS8ToU8Transformer",
    "Avx2WeightS8ToU8Transformer",
)


_NCHWC = "com.microsoft.nchwc"
_REORDERS = frozenset({"ReorderInput", "ReorderOutput"})
# (NCHWc operator, extended-graph operator) pairs that the NCHWc transformer converts besides
# operators of one type: per-channel affine operators become depthwise convolutions.
_NCHWC_FROM = frozenset(
    {
        ("Conv", "FusedConv"),
        ("Conv", "BatchNormalization"),
        ("Conv", "Mul"),
        ("Conv", "Add"),
        ("Upsample", "Resize"),
    }
)

Kernels = tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Group:
    """A task: original nodes (canonical names, topological order) that stay together."""

    ops: tuple[str, ...]
    kernels: Mapping[str, Kernels]
    """Per execution provider, the fusion units the group is made of: each runs as about one
    kernel on that provider (a CPU FusedConv is one unit, CUDA's Conv and Relu are two)."""

    def kernels_for(self, provider: str) -> Kernels:
        """The units on `provider`; one unit of all ops for a provider not analysed."""
        return self.kernels.get(provider) or (self.ops,)


# ------------------------------------------------------------ per provider
def _claims(model: onnx.ModelProto, graph: OpGraph, provider: str) -> list[set[str]] | None:
    """For each node of ONNX Runtime's optimised graph for `provider`, the original nodes that
    it alone claims (see the module docstring). Nodes in no set were folded or eliminated.
    None, said in one line, when ONNX Runtime cannot optimise the model for the provider."""
    levels = [ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED]
    if provider == CPU:
        levels.append(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    try:
        optimised, *layout = _optimised_graphs(model, provider, levels)
    except ModelError as e:
        log.warning("%s: each node is a task of its own, so a cut may split a fusion", e)
        return None
    if layout:
        try:
            optimised = restore_layout(optimised, layout[0])
        except LayoutError as e:
            log.warning("CPU fusions from the extended level only: %s", e)
    return [c for c in claimed_nodes(graph, optimised) if c]


def _optimised_graphs(
    model: onnx.ModelProto, provider: str, levels: Sequence[ort.GraphOptimizationLevel]
) -> list[onnx.GraphProto]:
    """`optimised_graph` at each level, the sessions built at once (ONNX Runtime builds them
    outside the GIL; for a large model each reads every weight). Where ONNX Runtime refuses the
    model with the shapes ONNX inferred, it is asked again with its own (`value_info` dropped):
    ONNX Runtime runs what it can type itself."""
    with ThreadPoolExecutor(len(levels)) as pool:
        try:
            return list(pool.map(lambda level: optimised_graph(model, provider, level), levels))
        except ModelError as e:
            bare = onnx.ModelProto()
            bare.CopyFrom(model)
            del bare.graph.value_info[:]
            found = list(pool.map(lambda level: optimised_graph(bare, provider, level), levels))
            log.warning("%s; with its own shapes it can: fusions taken from those", e)
            return found


class LayoutError(ValueError):
    """The all-level graph does not map back onto the extended one (names or structure that
    the NCHWc transformer is not known to produce)."""


def restore_layout(extended: onnx.GraphProto, optimised: onnx.GraphProto) -> onnx.GraphProto:
    """The CPU provider's all-level graph in the extended graph's tensor names, without its
    Reorder nodes, so that the claim walk applies to it (module docstring, "The all level").
    Raises `LayoutError` where the mapping is not certain."""
    producer = {t: n for n in extended.node for t in n.output}
    known = set(producer) | {i.name for i in extended.input}
    constants = {t.name for t in extended.initializer} | {t.name for t in optimised.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in extended.node:
        for t in node.input:
            consumers.setdefault(t, []).append(node)
    # ONNX Runtime names no node of a function body it inlines (HardSwish: HardSigmoid, Mul).
    by_name = {n.name: n for n in extended.node if n.name}
    outputs = {o.name for o in extended.output}
    same = _UnionFind(
        itertools.chain(known, (t for n in optimised.node for t in [*n.input, *n.output] if t))
    )
    # the nodes kept, each with the extended node it was made from (None: a fusion of the all
    # level's own, already in extended tensor names)
    counterpart: dict[int, onnx.NodeProto | None] = {}
    for i, node in enumerate(optimised.node):
        if node.domain == _NCHWC and node.op_type in _REORDERS:
            # One that took in a Transpose to or from channels-last (`channels_last`) holds
            # another tensor on each side; its neighbours name them.
            if not any(a.name == "channels_last" and a.i for a in node.attribute):
                same.merge((node.input[0], node.output[0]))
            continue
        if _own_fusion(node, by_name, producer, known):
            counterpart[i] = None
            continue
        origin = counterpart[i] = _counterpart(node, by_name, producer)
        pairs = list(zip(node.input, origin.input, strict=False))
        if node.op_type == "Conv" and len(node.input) > 3 and len(origin.input) <= 3:
            # The NCHWc Conv took in the Add after it: its fourth input is the Add's other one.
            pairs.append((node.input[3], _summed_with(origin, consumers)))
        for pair in pairs:
            if all(pair) and not constants.intersection(pair):
                same.merge(pair)
    names: dict[str, str] = {}
    for members in same.classes():
        found = [t for t in members if t in known]
        if len(found) > 1:
            raise LayoutError(f"tensors {', '.join(sorted(found))} would be one")
        if found:
            names.update(dict.fromkeys(members, found[0]))
    restored = onnx.GraphProto()
    restored.CopyFrom(optimised)
    del restored.node[:]
    written: set[str] = set()
    for i, node in enumerate(optimised.node):
        if i not in counterpart:
            continue
        copy = restored.node.add()
        copy.CopyFrom(node)
        origin = counterpart[i]
        made = origin.output if origin is not None else ()
        for j, t in enumerate(node.output):
            name = names.get(t, t)
            if j < len(made):
                if name not in known:
                    name = made[j]  # no consumer says otherwise: what it was made from
                if not _downstream(made[j], name, consumers, outputs):
                    raise LayoutError(f"{node.name} would compute {name}, not after {origin.name}")
            if name in written:
                raise LayoutError(f"two nodes compute {name}")
            written.add(name)
            copy.output[j] = name
        copy.input[:] = [names.get(t, t) for t in node.input]
    return restored


def _own_fusion(
    node: onnx.NodeProto,
    by_name: Mapping[str, onnx.NodeProto],
    producer: Mapping[str, onnx.NodeProto],
    known: set[str],
) -> bool:
    """Whether an all-level node is a fusion the extended level does not make, outside the
    NCHWc layout, computing extended tensors: kept as it is, the claim walk maps it like any
    other (a float16 model's `SimplifiedLayerNormalization`, fused once the casts that the CPU
    provider wraps around float16 nodes are removed)."""
    return (
        _same_node(node, by_name, producer) is None
        and node.domain != _NCHWC
        and all(t in known for t in node.output if t)
    )


def _same_node(
    node: onnx.NodeProto,
    by_name: Mapping[str, onnx.NodeProto],
    producer: Mapping[str, onnx.NodeProto],
) -> onnx.NodeProto | None:
    """The extended graph's node of the same name; for an unnamed node (ONNX Runtime names no
    node of a function body it inlines: HardSwish's HardSigmoid and Mul), the extended node of
    the same operator that computes its first output."""
    if node.name:
        return by_name.get(node.name)
    origin = producer.get(node.output[0]) if node.output else None
    return origin if origin is not None and origin.op_type == node.op_type else None


def _counterpart(
    node: onnx.NodeProto,
    by_name: Mapping[str, onnx.NodeProto],
    producer: Mapping[str, onnx.NodeProto],
) -> onnx.NodeProto:
    """The extended graph's node that an all-level node was made from: the same node
    (`_same_node`), or for an NCHWc node `<tensor>[_bn|_mul|_add]_nchwc[_token_N]`, the
    producer of `<tensor>`."""
    origin = _same_node(node, by_name, producer)
    if origin is None and node.domain == _NCHWC and "_nchwc" in node.name:
        tensor = node.name[: node.name.rindex("_nchwc")]
        while tensor not in producer and "_" in tensor:
            tensor = tensor.rpartition("_")[0]
        origin = producer.get(tensor)
    if origin is None:
        raise LayoutError(f"{node.op_type} node {node.name!r} matches no extended node")
    if node.op_type != origin.op_type and (node.op_type, origin.op_type) not in _NCHWC_FROM:
        raise LayoutError(f"{node.op_type} node {node.name!r} was made from {origin.op_type}")
    return origin


def _summed_with(conv: onnx.NodeProto, consumers: Mapping[str, list[onnx.NodeProto]]) -> str:
    """The other input of the Add (or two-input Sum) that consumes `conv`'s output alone."""
    after = consumers.get(conv.output[0], [])
    if len(after) != 1 or after[0].op_type not in ("Add", "Sum") or len(after[0].input) != 2:
        raise LayoutError(f"the Sum input of {conv.name!r} follows no Add")
    add = after[0]
    return add.input[1] if add.input[0] == conv.output[0] else add.input[0]


def _downstream(
    start: str,
    end: str,
    consumers: Mapping[str, list[onnx.NodeProto]],
    outputs: set[str],
    limit: int = 4,
) -> bool:
    """Whether `end` is `start` or is computed from it by at most `limit` nodes whose every
    other result only they read: what an NCHWc kernel can take in (an Add, an activation, the
    HardSigmoid and Mul of an inlined HardSwish, which both read `start`)."""
    region: list[onnx.NodeProto] = []
    made = [start]
    for tensor in made:  # grows as it goes: breadth first, and never past `end`
        if tensor == end:
            continue
        if tensor in outputs or not consumers.get(tensor):
            return False  # read outside: no kernel takes it in
        for node in consumers[tensor]:
            if not any(node is n for n in region):
                region.append(node)
                made.extend(t for t in node.output if t and t not in made)
        if len(region) > limit:
            return False
    return end in made


def claimed_nodes(graph: OpGraph, optimised: onnx.GraphProto) -> list[set[str]]:
    """For each node of an optimised graph, in its order, the original nodes of `graph` that it
    alone claims (see the module docstring); empty for a node that claims none alone. Measured
    profiling maps ONNX Runtime's per-node timings back to original nodes with it."""
    materialised = {i.name for i in optimised.input} | {t.name for t in optimised.initializer}
    for node in optimised.node:
        materialised.update(node.input)
        materialised.update(node.output)
    claims: list[set[str]] = []
    for node in optimised.node:
        claimed: set[str] = set()
        stack = [t for t in node.output if t in graph.producer]
        while stack:
            producer = graph.producer[stack.pop()]
            if producer in claimed:
                continue
            claimed.add(producer)
            stack.extend(
                t
                for t in graph.node[producer].inputs
                if t not in materialised and t in graph.producer
            )
        claims.append(claimed)
    times_claimed = Counter(n for claimed in claims for n in claimed)
    return [{n for n in claimed if times_claimed[n] == 1} for claimed in claims]


def optimised_graph(
    model: onnx.ModelProto,
    provider: str,
    level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
) -> onnx.GraphProto:
    """ONNX Runtime's optimised graph of `model` for `provider` at `level`, without weights."""
    disabled: list[str] = []
    if provider not in ort.get_available_providers():
        if provider != CUDA:
            log.warning("%s is not installed: using the CPU provider's fusions for it", provider)
        else:
            disabled = list(_CPU_ONLY_TRANSFORMERS)
        provider = CPU
    with tempfile.TemporaryDirectory(prefix="moirai-fusion-") as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        written = optimised_model_without_weights(options, Path(tmp))
        # Packing weights for the CPU's matrix kernels would be wasted work here.
        options.add_session_config_entry("session.disable_prepacking", "1")
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        try:
            ort_session(
                model,
                options,
                list(dict.fromkeys([provider, CPU])),
                disabled_optimizers=disabled,
            )
        except Exception as e:  # ORT raises its own exception types, without a common base
            raise ModelError(
                f"ONNX Runtime cannot load the model with {provider}: {one_line(e)}"
            ) from None
        return onnx.load(written, load_external_data=False).graph


# ----------------------------------------------------------------- grouping
def fusion_groups(model: onnx.ModelProto, graph: OpGraph, providers: Iterable[str]) -> list[Group]:
    """Groups that split no fusion of any of `providers` and form a DAG, in topological
    order."""
    units = {}
    for provider in dict.fromkeys(providers):
        claims = _claims(model, graph, provider)
        units[provider] = _units(graph, claims) if claims is not None else _alone(graph)
    merged = _UnionFind(n.name for n in graph.nodes)
    for provider_units in units.values():
        for unit in provider_units:
            merged.merge(unit)
    for tensor in _unservable(model, graph):
        merged.merge([graph.producer[tensor], *graph.consumers[tensor]])
    blocks = merged.classes()
    components = _contract_cycles(graph, blocks)
    return _as_groups(graph, [[n for b in c for n in blocks[b]] for c in components], units)


def _unservable(model: onnx.ModelProto, graph: OpGraph) -> list[str]:
    """Tensors passed between nodes that cannot cross a stage border: sequences, optionals,
    maps, strings and tensors of unknown rank (`moirai.stageplan.border_problem`, the check a
    stage plan makes too), as the model's value types say (a tensor they do not type is left to the
    stage plan). Their producer and consumers stay in one group, so that no placement cuts them
    (simple/test_sequence_model1, node/test_affine_grid_2d_expanded)."""
    g = model.graph
    types = {v.name: v.type for v in (*g.value_info, *g.input, *g.output)}
    out = []
    for tensor in graph.producer:
        if tensor not in graph.consumers:
            continue
        value = types.get(tensor)
        if value is not None and border_problem(value) is not None:
            out.append(tensor)
    return out


def _alone(graph: OpGraph) -> list[tuple[str, ...]]:
    """Units when ONNX Runtime cannot say its fusions: every node on its own."""
    return [(n.name,) for n in graph.nodes]


def _units(graph: OpGraph, claims: list[set[str]]) -> list[tuple[str, ...]]:
    """One provider's fusion units: its claims, plus every unclaimed node (folded, eliminated)
    joined to the unit of its first consumer."""
    union = _UnionFind(n.name for n in graph.nodes)
    attached: set[str] = set()
    for claimed in claims:
        union.merge(claimed)
        attached.update(claimed)
    order = _index(graph)
    for node in reversed(graph.nodes):
        consumers = [c for t in node.outputs for c in graph.consumers.get(t, ())]
        if node.name not in attached and consumers:
            union.merge((node.name, min(consumers, key=order.__getitem__)))
    return union.classes()


def coarsen(
    graph: OpGraph,
    groups: Sequence[Group],
    max_tasks: int,
    weight: Callable[[Sequence[str]], float] = len,
) -> list[Group]:
    """Merge groups until at most `max_tasks` remain, never creating a cycle (module
    docstring); the pairs lightest by `weight` (of their node names) go first. Fusion units
    are kept whole."""
    if max_tasks < 1:
        raise MoiraiError(f"max_tasks (--max-tasks) is {max_tasks}: it must be >= 1")
    if len(groups) <= max_tasks:
        return list(groups)
    merged = _coarsen(graph, [g.ops for g in groups], max_tasks, weight)
    units: dict[str, list[tuple[str, ...]]] = {}
    for group in groups:
        for provider, kernels in group.kernels.items():
            units.setdefault(provider, []).extend(kernels)
    return _as_groups(graph, [[n for i in m for n in groups[i].ops] for m in merged], units)


def _as_groups(
    graph: OpGraph, blocks: Sequence[Sequence[str]], units: Mapping[str, Sequence[tuple[str, ...]]]
) -> list[Group]:
    """Groups of `blocks` in topological order, each with the units inside it."""
    order = _index(graph)
    where = {n: b for b, block in enumerate(blocks) for n in block}
    inside: list[dict[str, list[tuple[str, ...]]]] = [{p: [] for p in units} for _ in blocks]
    for provider, provider_units in units.items():
        for unit in provider_units:
            inside[where[unit[0]]][provider].append(unit)
    return [
        Group(
            ops=tuple(sorted(blocks[b], key=order.__getitem__)),
            kernels={p: tuple(sorted(k, key=lambda u: order[u[0]])) for p, k in inside[b].items()},
        )
        for b in _topological(graph, blocks)
    ]


def _index(graph: OpGraph) -> dict[str, int]:
    return {n.name: i for i, n in enumerate(graph.nodes)}


class _UnionFind:
    def __init__(self, items: Iterable[str]) -> None:
        self.parent = {i: i for i in items}

    def find(self, item: str) -> str:
        root = item
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[item] != root:
            self.parent[item], item = root, self.parent[item]
        return root

    def merge(self, items: Iterable[str]) -> None:
        roots = [self.find(i) for i in items]
        for other in roots[1:]:
            self.parent[other] = roots[0]

    def classes(self) -> list[tuple[str, ...]]:
        """Members of each class in the order of the items, classes ordered by first member."""
        out: dict[str, list[str]] = {}
        for item in self.parent:
            out.setdefault(self.find(item), []).append(item)
        return [tuple(members) for members in out.values()]


# Graph algorithms on "blocks": disjoint sets of node names covering the graph.
def _successors(graph: OpGraph, blocks: Sequence[Iterable[str]]) -> list[set[int]]:
    where = {n: b for b, block in enumerate(blocks) for n in block}
    succs: list[set[int]] = [set() for _ in blocks]
    for node in graph.nodes:
        dst = where[node.name]
        for t in node.inputs:
            if t in graph.producer and (src := where[graph.producer[t]]) != dst:
                succs[src].add(dst)
    return succs


def _contract_cycles(graph: OpGraph, blocks: Sequence[Iterable[str]]) -> list[list[int]]:
    """The strongly connected components of the block graph, as lists of block indices
    (Tarjan's algorithm, iterative)."""
    succs = _successors(graph, blocks)
    index: dict[int, int] = {}
    low: dict[int, int] = {}
    on_stack: set[int] = set()
    stack: list[int] = []
    components: list[list[int]] = []
    counter = itertools.count()
    for root in range(len(blocks)):
        if root in index:
            continue
        work = [(root, iter(sorted(succs[root])))]
        index[root] = low[root] = next(counter)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = next(counter)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(succs[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    components.append(component)
    return components


def _topological(graph: OpGraph, blocks: Sequence[Iterable[str]]) -> list[int]:
    """Indices of `blocks` in a topological order, ties broken by the position of a block's
    first node."""
    succs = _successors(graph, blocks)
    order = _index(graph)
    first = [min(order[n] for n in block) for block in blocks]
    out = topological_order(range(len(blocks)), dict(enumerate(succs)), first.__getitem__)
    assert out is not None, "block graph has a cycle after contraction"
    return out


def _coarsen(
    graph: OpGraph,
    blocks: Sequence[Sequence[str]],
    max_tasks: int,
    weight: Callable[[Sequence[str]], float],
) -> list[list[int]]:
    """Merge blocks until at most `max_tasks` remain, never creating a cycle (module
    docstring); returns the merged blocks as lists of block indices."""
    members: dict[int, list[int]] = {b: [b] for b in range(len(blocks))}
    mass = {b: float(weight(block)) for b, block in enumerate(blocks)}
    succs = dict(enumerate(_successors(graph, blocks)))
    preds: dict[int, set[int]] = {b: set() for b in members}
    for b, s in succs.items():
        for d in s:
            preds[d].add(b)
    version = dict.fromkeys(members, 0)
    heap: list[tuple[float, int, int, int, int]] = []

    def push_edges(b: int) -> None:
        for u, v in [(p, b) for p in preds[b]] + [(b, s) for s in succs[b]]:
            heapq.heappush(heap, (mass[u] + mass[v], u, v, version[u], version[v]))

    def merge(u: int, v: int) -> None:
        members[u] += members.pop(v)
        mass[u] += mass.pop(v)
        for d in succs.pop(v):
            preds[d].discard(v)
            if d != u:
                preds[d].add(u)
                succs[u].add(d)
        for p in preds.pop(v):
            succs[p].discard(v)
            if p != u:
                succs[p].add(u)
                preds[u].add(p)
        succs[u].discard(u)
        preds[u].discard(u)
        version[u] += 1
        del version[v]
        push_edges(u)

    for b in members:
        push_edges(b)
    while len(members) > max_tasks:
        while heap:
            _, u, v, vu, vv = heapq.heappop(heap)
            current = version.get(u) == vu and version.get(v) == vv and v in succs[u]
            if current and (len(succs[u]) == 1 or len(preds[v]) == 1):
                merge(u, v)
                break
        else:
            alive = list(members)
            merged = [[n for i in members[b] for n in blocks[i]] for b in alive]
            chain = [alive[i] for i in _topological(graph, merged)]
            u, v = min(itertools.pairwise(chain), key=lambda p: mass[p[0]] + mass[p[1]])
            merge(u, v)
    return list(members.values())
