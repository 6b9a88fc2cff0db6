"""The analytic cost model: a roofline per kernel, so a cost graph needs no hardware.

Each fusion unit of a group on the device's execution provider (`Group.kernels_for`) runs as
about one kernel. Its time on a device is

    max(flops / peak_flops, bytes / memory_bandwidth) + launch overhead

where `bytes` are what a fused kernel moves through memory: the activations entering and
leaving the unit and the weights it reads (a Gather only the rows it returns: an embedding
lookup does not stream the whole table) — intermediates inside a fusion stay in registers or
cache, which is exactly what fusing buys. The overhead (framework dispatch plus kernel launch)
is larger on a GPU (`launch_overhead_ms` of the device, default 10 µs) than on a CPU (2 µs);
it is what keeps a GPU from winning on tiny operators. Units that are only folded constants cost
nothing; units of pure view operators (Reshape, Squeeze, ...) cost only the overhead.

FLOPs per operator (multiply and add count as two):

    Conv            2 · |out| · C_in/groups · |kernel|   (+ |out| with bias)
    ConvTranspose   2 · |in| · C_out/groups · |kernel|
    MatMul          2 · |out| · K;   Gemm  |out| · (2K + 1)
    pooling         |out| · |kernel|;  global pooling, reductions: |in|
    Softmax 5, LayerNormalization 8, BatchNormalization 2 ... per element (`_PER_ELEMENT`)
    data movement   0 (Transpose, Concat, Gather, Slice, Cast, ...)
    anything else   1 per output element

**Efficiency.** The peaks are FP32 figures; a kernel reaches a fraction of them, its device's
`efficiency`, so the roofline term is divided by it (the launch overhead is not). A devices file
may set it per device (`efficiency:` in (0, 1]); otherwise it comes from the kind and threads:

    CPU   1 / (1 + s·(threads − 1)), s = 0.22      GPU   1

The CPU figure is Amdahl's law: one core reaches its peak, and each further thread adds less.
Measured on this project's 2-core AMD EPYC (AVX2; peak from the base clock, `local_devices`),
ONNX Runtime level all, batch 1, whole-model time against the analytic sum at one thread
(measured/analytic; a group's time is its share of the profiled run, scaled to the run's
thread CPU time so that other users of the machine do not count):

    squeezenet 0.95   resnet50 0.94   inception_v1 1.64   shufflenet 0.74   densenet121 0.97
    alexnet 1.14      bert_base 1.02  gpt2_small 1.05     (median 1.0)

Per group (CNNs only: when this was measured, the profiler still misplaced transformers' fused
Gemm kernels among their groups), compute-bound groups 1.11 (IQR 0.98-1.22, 322 groups of 6 CNNs),
memory-bound ones 0.58 (IQR 0.39-1.13, 442 groups: at batch 1 the activations stay in cache,
faster than the DRAM figure); the outliers are LRN and the groups beside it (inception_v1,
alexnet: 30-50x their roofline; ONNX Runtime's LRN is a naive kernel, between layout conversions)
and shufflenet's tiny kernels. So one thread needs no factor. Two threads against one, the best of
15 alternating runs each: parallel efficiency squeezenet 0.82, shufflenet 0.54, resnet50 0.91,
inception_v1 0.84, densenet121 0.72 (median 0.82, so s = 1/0.82 − 1 = 0.22; medians of the runs,
under other users' load, give 0.74). Beyond two threads s is an extrapolation: the 20-thread Xeon
of `examples/devices` gets 0.19 of its 3.2 TFLOP/s, so ResNet-50 takes 14.3 ms there instead of
2.9, and SqueezeNet 2.2 ms instead of 0.48, where the bare peak made it beat the A100 (0.71 ms) on
SqueezeNet, ShuffleNet and Inception v1. Measure a device and set its `efficiency` to do better
than the extrapolation.

The GPU keeps 1: against the H100 measurements in `bench/results/validation-h100.json` (8 CNNs,
every group timed on the GPU), the analytic total is measured/analytic 0.79-2.50, median 1.30,
but launches dominate it, and a least-squares fit of measured = kernels · o + roofline / e over
the 8 gives o = 9.7 µs (the default is 10) and e = 1.37: no factor under 1 fits (cuDNN's TF32
beats the FP32 peak on VGG-19). The model ranks devices and operators rather than predicting
wall-clock time to the percent; measured profiling does that.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from moirai.devices import DeviceSpec
from moirai.fusion import Group
from moirai.graph import Node, OpGraph

DEFAULT_LAUNCH_OVERHEAD_MS = {"gpu": 0.01, "cpu": 0.002}
CPU_SERIAL_FRACTION = 0.22
"""Amdahl's serial fraction of a batch-1 kernel on CPU threads (module docstring)."""

_VIEW_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout"})
_MOVEMENT_OPS = _VIEW_OPS | {
    "Transpose",
    "Concat",
    "Split",
    "Slice",
    "Gather",
    "GatherElements",
    "GatherND",
    "ScatterElements",
    "ScatterND",
    "Expand",
    "Tile",
    "Pad",
    "Cast",
    "Shape",
    "Size",
    "DepthToSpace",
    "SpaceToDepth",
    "ConstantOfShape",
    "Constant",
}
_PER_ELEMENT = {
    # transcendental element-wise functions
    **dict.fromkeys(
        ("Exp", "Log", "Tanh", "Sigmoid", "Erf", "Sqrt", "Pow", "Reciprocal", "Sin", "Cos"), 4
    ),
    **dict.fromkeys(("Softplus", "Elu", "Selu", "Gelu", "Mish", "HardSwish", "HardSigmoid"), 4),
    "Softmax": 5,
    "LogSoftmax": 5,
    "BatchNormalization": 2,
    "LayerNormalization": 8,
    "InstanceNormalization": 8,
    "GroupNormalization": 8,
}
_GATHERS = frozenset({"Gather", "GatherElements", "GatherND"})
_POOLS = frozenset({"MaxPool", "AveragePool", "LpPool"})
_INPUT_SIZED = frozenset(
    {"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "ArgMax", "ArgMin", "TopK"}
)


@dataclass(frozen=True)
class Work:
    flops: float
    bytes: int


def node_flops(graph: OpGraph, node: Node) -> float:
    """Floating-point operations of one node (see the module docstring)."""
    if node.constant or node.op_type in _MOVEMENT_OPS:
        return 0.0
    t = graph.tensors
    out = t[node.outputs[0]].numel if node.outputs else 0
    first = t[node.inputs[0]] if node.inputs else None
    op = node.op_type
    if op in ("Conv", "ConvTranspose") and len(node.inputs) >= 2:
        weight = t[node.inputs[1]].shape
        if weight is None or first is None:
            return float(out)
        per_output = math.prod(weight[1:])
        bias = out if len(node.inputs) > 2 else 0
        if op == "Conv":
            return 2.0 * out * per_output + bias
        return 2.0 * first.numel * per_output + bias
    if op == "MatMul" and first is not None and first.shape:
        return 2.0 * out * first.shape[-1]
    if op == "Gemm" and first is not None and first.shape and len(first.shape) == 2:
        k = first.shape[0] if node.attributes.get("transA") else first.shape[1]
        return out * (2.0 * k + 1)
    if op in _POOLS:
        kernel = node.attributes.get("kernel_shape") or []
        return float(out * math.prod(kernel))
    if op == "LRN":
        return float(out * (2 * int(node.attributes.get("size", 1)) + 3))
    if op in _INPUT_SIZED or op.startswith("Reduce"):
        return float(first.numel if first is not None else out)
    return float(out * _PER_ELEMENT.get(op, 1))


def kernel_work(graph: OpGraph, ops: Sequence[str]) -> Work:
    """FLOPs and memory traffic of a set of nodes run as one fused kernel."""
    inside = set(ops)
    nodes = [graph.node[n] for n in ops]
    computing = [n for n in nodes if not n.constant]
    flops = sum(node_flops(graph, n) for n in computing)
    if all(n.op_type in _VIEW_OPS for n in computing):
        return Work(flops, 0)
    produced = {t for n in computing for t in n.outputs}
    read: dict[str, int] = {}
    for n in computing:
        for i, t in enumerate(n.inputs):
            if t in produced:
                continue
            nbytes = graph.tensors[t].nbytes
            if i == 0 and n.op_type in _GATHERS:  # a lookup reads the rows it returns
                nbytes = min(nbytes, sum(graph.tensors[o].nbytes for o in n.outputs))
            read[t] = max(read.get(t, 0), nbytes)
    outputs = set(graph.outputs)
    written = sum(
        graph.tensors[t].nbytes
        for t in produced
        if t in outputs or any(c not in inside for c in graph.consumers.get(t, ()))
    )
    return Work(flops, sum(read.values()) + written)


@dataclass(frozen=True)
class AnalyticProfile:
    """Roofline estimates from the devices' peak figures (module docstring)."""

    name: str = "analytic"

    def compute_ms(
        self, graph: OpGraph, groups: Sequence[Group], devices: Sequence[DeviceSpec]
    ) -> list[Mapping[str, float]]:
        return [
            {device.name: self.group_ms(graph, group, device) for device in devices}
            for group in groups
        ]

    def group_ms(self, graph: OpGraph, group: Group, device: DeviceSpec) -> float:
        overhead = device.launch_overhead_ms
        if overhead is None:
            overhead = DEFAULT_LAUNCH_OVERHEAD_MS[device.kind]
        reached = efficiency(device)
        total = 0.0
        for kernel in group.kernels_for(device.provider):
            if all(graph.node[n].constant for n in kernel):
                continue
            work = kernel_work(graph, kernel)
            seconds = max(
                work.flops / device.peak_flops, work.bytes / device.memory_bandwidth_bytes_per_s
            )
            total += seconds * 1000.0 / reached + overhead
        return total


def efficiency(device: DeviceSpec) -> float:
    """The fraction of its peaks that `device` reaches: its own, else the default for its kind
    and threads (module docstring); a CPU without a thread count is taken as one thread."""
    if device.efficiency is not None:
        return device.efficiency
    if device.kind == "cpu":
        return 1.0 / (1.0 + CPU_SERIAL_FRACTION * ((device.threads or 1) - 1))
    return 1.0
