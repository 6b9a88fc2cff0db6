"""Measured profiling: the time of every fusion group on a real device, with ONNX Runtime.

For one device (a `Target`: the CPU provider with a thread count, or CUDA with a device id) and
one model, `measure_device` produces a `DeviceProfile` (`moirai.profile.document`): the fusion
groups of the device's provider (`moirai.fusion.fusion_groups`), each with its median time per
run, its spread, how it was timed, and its memory.

**Sessions as the stage servers build them.** Every session comes from `moirai.sessions`
(its options and providers), so the profile times what serving runs — graph optimisation level
`ORT_ENABLE_ALL`, which on the CPU includes the NCHWc layout transformer — on the device's
threads, pinned to as many cores as the local runtime pins a stage server to.

**Whole model, per-node profiler (the CPU path).** Two sessions run the whole model in turns,
`warmup` times untimed and then `repeats` times (more for a quick model: the timed runs last
`min_seconds`, by default 1 s, up to `MAX_REPEATS`): a plain one, whose wall-clock time per run less
one session call's overhead (timed on a one-node model) is `run_ms`, and one with ONNX Runtime's
profiler on (`enable_profiling`), whose JSON trace has one "Node" event per kernel run, named
`<optimised node name>_kernel_time`, with its duration in µs. Taking the times from the plain
session keeps the profiler's own cost (about 20 µs per kernel) out of the totals; taking the
split from the trace says where the time went. Turns alternate so that both see the same
machine, busy or not.

Trace events name nodes of ONNX Runtime's optimised graph, which the profiled session also
writes out (`optimized_model_filepath`). They map back to the original (canonical) nodes the way
the fusion groups were made, so there is one mapping: `moirai.fusion.restore_layout` puts the
all-level graph into the extended graph's tensor names (undoing the NCHWc renaming, dropping the
Reorder nodes), and the claim walk (`moirai.fusion.claimed_nodes`) gives each node the original
nodes between its outputs and the tensors that still exist. Some nodes claim nothing:

    x ─► Reshape ─► Gemm ─► Reshape ─► y    MatMulAddFusion on a 3-D input: the last Reshape
         (tensors new to the graph)         writes y and claims the MatMul and the Add; the
                                            Gemm, which does the work, claims nothing

- nodes joined through tensors that the original graph lacks are one replacement and stand
  together for what any of them claims: the Gemm's time goes to the MatMul and the Add, not to
  the LayerNorm that produced x;
- the Reorder nodes (layout conversions the optimiser added) and anything still unplaced join
  the node that produced their input (or, at a graph input, the first that consumes their
  output).

A kernel's time then goes to the group holding its original nodes (split by FLOPs in the rare
case it spans several, `moirai.profile.document.allocate`).

**Time between kernels.** The kernels of a run add up to less than the run: the executor
allocates, dispatches and frees between them. That difference is a cost per kernel launch, so
it is shared among the groups by their number of kernels. It is the median, over the timed
turns, of a plain run's time less the kernel sum of the profiled run right after it: the two
saw the same machine, so the estimate holds up on a busy one, where medians of the two series
taken apart can drift by more than the gap. (When the kernels add up to more than the plain run
— noise, or the profiler slowing them — groups are scaled down by the median ratio instead.)
Finally the groups are scaled together to add up to `run_ms` exactly: the trace says how the
time splits, the plain session how much there is. The one-off cost of
a session call (feeding inputs, fetching outputs) is kept apart as `call_overhead_ms`: a stage
pays it once per run whatever its size.

**Cutting into stages.** A stage is a session of its own, and the border between two stages
costs what the whole model does not pay: on the CPU, the NCHWc layout transformer converts a
tensor out of its blocked layout at the end of one session and back into it at the start of the
next, and every session allocates its outputs anew. Per cut that is a copy of the tensors that
cross it, far from free for a convolutional network's activations (ResNet-50 cut into 11 stages
on one core: 4.1 ms more per run than whole, 0.4 ms a cut), and invisible in a whole model's
trace. So the model is also cut into `CUT_STAGES` consecutive stages of its fusion groups and run
through them, in turns with the whole model: `cut_ms_per_mib` is what the cut runs take beyond
the whole one's, less a session call per extra stage, per MiB of tensors crossing the cuts. The
cost graph's links into and out of the device carry it (`moirai.profile.document.with_borders`),
so the solvers and the served prediction both price a border.

A group can also end up with no kernel of its own: its nodes were folded (constants), removed
(Identity, Dropout, static Reshape chains) or fused into a neighbouring group's kernel where
the fusion groups keep them apart (the NCHWc convolution takes in a residual Add and the Relu
after it; the groups do so too, except where `restore_layout` fell back to the extended level).
Such a group costs nothing of its own (`method: none`); its time is in that kernel.

**Group sub-models (the fallback, and the CUDA path).** A group is cut out of the model as its
own ONNX model (with `moirai.partition`: one stage per measured group, the rest of the model in
other stages that run once to feed them real tensors) and timed alone: wall time less the call
overhead. This is how a group is timed that computes something, whose results still exist in the
optimised graph, and that the trace mapping nevertheless left without time; and every group when
the model cannot run whole on the device (too large, or the whole session fails). On CUDA every
group is timed this way, because the CUDA provider's trace events time kernel *launches*, not
the GPU's work (release builds of ONNX Runtime have no CUPTI tracing). CUDA runs bind inputs and
outputs on the GPU (`IOBinding`) and synchronise, so the times hold the GPU's work without
host↔device copies; when the whole model ran, the group times are then scaled to add up to its
run time, which folds in launch overlap and per-kernel overhead the way the CPU path does.

**Statistics.** How much time a run takes (`run_ms`, a group sub-model's time) is the fastest
of the timed runs: on a shared machine every other run carries some of other work's
interference, and how much depends on the moment (a two-thread session loses a whole run's
worth when one of its threads waits for a busy core), so medians measured at different times
ranked devices by the load they met rather than by their speed, and a profile taken in a busy
minute stayed in the cache. The fastest run is what the device does, and it is stable from
idle to loaded. How that time splits among the groups comes from the medians of the trace's
per-run times, and the spread of each is their interquartile range (`spread_ms`); warm-up runs
are never counted.

**In turns with the other devices.** The fastest run guards against a busy moment, not a busy
window: a device timed alone, in a second when another process held the other core, kept that
second's time. So before the devices are profiled one by one, the whole model runs on every
device measured for it in turns (`time_in_turns`, `moirai.profile.turns`: at the highest
priority the process may take, for as long as the settings ask and then until each device had
quiet turns, at most `patience_seconds` more), and `run_ms` is the fastest run of those and of
the device's own runs. The profile records the load its turns met (`load`); one measured under
load throughout is `contended`, and `MeasuredProfile` measures it again the next time it is
asked for, keeping the better measurement. `MeasuredProfile`'s `together` names the devices to
time in turns (the planner's: every grouping of this machine's CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from moirai.costgraph import CostGraph
from moirai.devices import DeviceSpec, available_cores, pinned
from moirai.errors import one_line
from moirai.fusion import (
    CPU,
    Group,
    LayoutError,
    claimed_nodes,
    fusion_groups,
    optimised_graph,
    restore_layout,
)
from moirai.graph import InputShapes, OpGraph, build_graph, load_model, open_measured_sizes
from moirai.partition import build_plan
from moirai.profile.analytic import node_flops
from moirai.profile.cache import ProfileCache
from moirai.profile.document import (
    DeviceProfile,
    DocumentProfile,
    GroupTiming,
    Load,
    ProfileDocument,
    ProfileError,
    allocate,
)
from moirai.profile.links import DEFAULT_SIZES, LINK_METHOD_VERSION, LinkProbe
from moirai.profile.links import PATH as LINK_PATH
from moirai.profile.targets import Target, cpu_model, signature
from moirai.profile.turns import Contender, Timed, raised_priority, take_turns
from moirai.sessions import create_session, device_session, session_options
from moirai.stagecut import extract_stage
from moirai.stageplan import DeviceSpec as PlanDevice
from moirai.weights import model_digest, optimised_model_without_weights

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
METHOD_CHOICES = ("auto", "trace", "submodel")
_KERNEL_SUFFIX = "_kernel_time"
_OVERHEAD_CALLS = 50
MAX_REPEATS = 200
CUT_STAGES = 4
"""Stages the model is cut into to price a cut (module docstring, Cutting into stages)."""


@dataclass(frozen=True)
class Settings:
    warmup: int = 3
    repeats: int = 10
    method: str = "auto"
    """`auto` (trace on the CPU, sub-models on CUDA and as the fallback), `trace` (fail rather
    than fall back) or `submodel` (every group alone)."""
    min_seconds: float = 1.0
    """The whole model's timed runs last at least this long (more than `repeats` of a quick
    model, at most `MAX_REPEATS`), so that the fastest run is taken over a window longer than
    a busy moment of the machine."""
    patience_seconds: float = 10.0
    """How much longer the devices' turns may go on for quiet turns (`moirai.profile.turns`)."""

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.repeats < 1 or self.min_seconds < 0:
            raise ProfileError(
                "profiling needs --warmup >= 0, --repeats >= 1 and --min-seconds >= 0"
            )
        if self.patience_seconds < 0:
            raise ProfileError("profiling needs patience_seconds >= 0 (Settings)")
        if self.method not in METHOD_CHOICES:
            raise ProfileError(f"--method {self.method!r}: use one of {', '.join(METHOD_CHOICES)}")

    def runs_for(self, run_ms: float) -> int:
        """Timed runs of a model that takes `run_ms` a run (`min_seconds`)."""
        wanted = math.ceil(self.min_seconds * 1000.0 / max(run_ms, 1e-3))
        return max(self.repeats, min(MAX_REPEATS, wanted))


class _Every:
    """Progress said once per run or per group, reduced to the first, the last and one a
    second between: a quick model's 200 timed runs were 200 lines."""

    def __init__(self, say: Progress, seconds: float = 1.0) -> None:
        self._say = say
        self._seconds = seconds
        self._said: float | None = None

    def __call__(self, message: str, last: bool = False) -> None:
        now = time.monotonic()
        if last or self._said is None or now - self._said >= self._seconds:
            self._said = now
            self._say(message)


# ---------------------------------------------------------------- statistics
def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0


def _fastest(values: Sequence[float]) -> float:
    """The time of a run (module docstring, Statistics)."""
    return min(values) if values else 0.0


def _iqr(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[2] - q[0]


# --------------------------------------------------------------- running
def _pinned(target: Target) -> contextlib.AbstractContextManager[None]:
    """This thread (and the ONNX Runtime threads it creates) pinned to the target's cores
    (`_cores`), as the local runtime pins a stage server."""
    return pinned(_cores(target))


def random_strings(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random lowercase words of 1 to 12 letters in `shape` (an array of `str`, what ONNX
    Runtime takes for a `tensor(string)` input), for timing a model and for the demo's
    requests. Any strings are enough: ONNX's string operators (LabelEncoder, CategoryMapper,
    OneHotEncoder, StringNormalizer, TfIdfVectorizer) take every string, an unknown one mapping
    to their default, and their time follows the count of elements, hardly which strings they
    are; the demo compares the served answers with ONNX Runtime's on the same strings."""
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    count = int(np.prod(shape, dtype=np.int64))
    lengths = rng.integers(1, 13, count)
    words = ["".join(rng.choice(letters, n)) for n in lengths.tolist()]
    array = np.empty(count, object)
    array[:] = words
    return array.reshape(shape)


def _feeds(graph: OpGraph, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs to run the model with: N(0, 1) floats, zeros for integers (valid indices), random
    words for strings (`random_strings`)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name in graph.inputs:
        tensor = graph.tensors[name]
        shape = tensor.shape or ()
        if tensor.elem_type == TensorProto.STRING:
            feeds[name] = random_strings(rng, shape)
            continue
        dtype = helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[name] = np.zeros(shape, dtype=dtype)
    return feeds


class _Runner:
    """Runs one session on the target and times each run: wall time of `session.run` on the
    CPU; on CUDA, of `run_with_iobinding` with inputs and outputs on the GPU, synchronised."""

    def __init__(
        self,
        session: ort.InferenceSession,
        feeds: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        target: Target,
    ) -> None:
        self.session = session
        self.feeds = dict(feeds)
        self.outputs = list(outputs)
        self.binding: Any = None
        if target.kind == "gpu":
            self.binding = session.io_binding()
            for name, array in feeds.items():
                value = ort.OrtValue.ortvalue_from_numpy(array, "cuda", target.device_id)
                self.binding.bind_ortvalue_input(name, value)
            for name in outputs:
                self.binding.bind_output(name, "cuda", target.device_id)

    def run(self) -> float:
        started = time.perf_counter()
        if self.binding is None:
            self.session.run(self.outputs, self.feeds)
        else:
            self.session.run_with_iobinding(self.binding)
            self.binding.synchronize_outputs()
        return (time.perf_counter() - started) * 1000.0

    def results(self) -> list[np.ndarray]:
        """The outputs of one more run, on the host."""
        if self.binding is None:
            return list(self.session.run(self.outputs, self.feeds))
        self.session.run_with_iobinding(self.binding)
        return list(self.binding.copy_outputs_to_cpu())


def _session(model: onnx.ModelProto, target: Target) -> ort.InferenceSession:
    return create_session(model, target.plan_device)


def call_overhead_ms(target: Target, warmup: int = 10) -> float:
    """What one session call costs beyond its kernels: a one-node model, timed many times."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    model = helper.make_model(
        helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "call", [x], [y]),
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=8,  # what every ONNX Runtime of the last years reads
    )
    runner = _Runner(_session(model, target), {"x": np.zeros(1, np.float32)}, ["y"], target)
    for _ in range(warmup):
        runner.run()
    return _median([runner.run() for _ in range(_OVERHEAD_CALLS)])


# ------------------------------------------------------------ whole model
@dataclass
class _Whole:
    run_ms: list[float]
    """Wall time of each timed run of the plain session."""
    kernels: dict[str, list[float]] | None = None
    """Optimised node → its kernel time in each timed run (ms); None without a trace."""
    optimised: onnx.GraphProto | None = None
    """The profiled session's optimised graph, whose nodes the trace names."""
    restored: onnx.GraphProto | None = None
    """`optimised` in the original tensor names (`restored_graph`)."""


def _profiled_session(
    model: onnx.ModelProto, target: Target, workdir: Path
) -> ort.InferenceSession:
    options = session_options(target.threads)
    options.enable_profiling = True
    options.profile_file_prefix = str(workdir / "trace")
    optimised_model_without_weights(options, workdir)
    return device_session(model, options, target.plan_device)


def _run_whole(
    model: onnx.ModelProto,
    graph: OpGraph,
    target: Target,
    settings: Settings,
    feeds: Mapping[str, np.ndarray],
    workdir: Path,
    trace: bool,
    say: Progress,
) -> _Whole:
    outputs = list(graph.outputs)
    plain = _Runner(_session(model, target), feeds, outputs, target)
    profiled = _profiled_session(model, target, workdir) if trace else None
    warm: list[float] = []
    times: list[float] = []
    total = settings.warmup + settings.repeats
    every = _Every(say)
    i = 0
    while i < total:
        elapsed = plain.run()
        if profiled is not None:
            profiled.run(outputs, dict(feeds))
        (times if i >= settings.warmup else warm).append(elapsed)
        if i + 1 == settings.warmup:
            total = settings.warmup + settings.runs_for(min(warm))
        warming = " (warm-up)" if i < settings.warmup else ""
        every(f"whole model, run {i + 1}/{total}{warming}", last=i + 1 == total)
        i += 1
    whole = _Whole(times)
    if profiled is not None:
        trace_file = profiled.end_profiling()
        events = json.loads(Path(trace_file).read_text(encoding="utf-8"))
        Path(trace_file).unlink()
        whole.kernels = _parse_trace(events, settings.warmup)
        whole.optimised = onnx.load(workdir / "optimised.onnx", load_external_data=False).graph
        whole.restored = restored_graph(model, whole.optimised)
    return whole


def _parse_trace(events: list[dict[str, Any]], warmup: int) -> dict[str, list[float]]:
    """Per optimised node: its kernel time (ms) in each run after the warm-up."""
    runs = sorted(
        (e["ts"], e["ts"] + e["dur"])
        for e in events
        if e.get("cat") == "Session" and e.get("name") == "model_run"
    )[warmup:]
    kernels: dict[str, list[float]] = {}
    for e in events:
        name = e.get("name", "")
        if e.get("cat") != "Node" or not name.endswith(_KERNEL_SUFFIX):
            continue
        run = next((r for r, (start, end) in enumerate(runs) if start <= e["ts"] <= end), None)
        if run is None:
            continue
        node = name[: -len(_KERNEL_SUFFIX)]
        kernels.setdefault(node, [0.0] * len(runs))[run] += e["dur"] / 1000.0
    return kernels


# -------------------------------------------------- optimised → original nodes
def restored_graph(model: onnx.ModelProto, optimised: onnx.GraphProto) -> onnx.GraphProto:
    """ONNX Runtime's all-level CPU graph of `model` in the extended graph's tensor names, its
    Reorder nodes dropped (`moirai.fusion.restore_layout`, as the fusion groups see it); the
    graph as it is, with a warning, where that mapping is not certain."""
    extended = optimised_graph(model, CPU)
    try:
        return restore_layout(extended, optimised)
    except LayoutError as e:
        log.warning("kernel times mapped without undoing the NCHWc layout: %s", e)
        return optimised


def node_units(
    graph: OpGraph, optimised: onnx.GraphProto, restored: onnx.GraphProto
) -> dict[str, frozenset[str]]:
    """Every optimised node → the original nodes its time belongs to (module docstring);
    `restored` is `restored_graph` of `optimised`."""
    claims = dict(zip((n.name for n in restored.node), claimed_nodes(graph, restored), strict=True))
    replacement = _replacements(graph, restored)
    pooled: dict[str, set[str]] = {}
    for node, claimed in claims.items():
        pooled.setdefault(replacement[node], set()).update(claimed)
    units = {
        node: frozenset(claimed or pooled[replacement[node]])
        for node, claimed in claims.items()
        if claimed or pooled[replacement[node]]
    }
    producer = {t: node.name for node in optimised.node for t in node.output}
    for node in optimised.node:  # topological order: producers resolve first
        if node.name not in units:
            found = next((units[p] for t in node.input if (p := producer.get(t)) in units), None)
            if found is not None:
                units[node.name] = found
    consumers: dict[str, list[str]] = {}
    for node in optimised.node:
        for t in node.input:
            consumers.setdefault(t, []).append(node.name)
    for node in reversed(optimised.node):
        if node.name not in units:
            found = next(
                (units[c] for t in node.output for c in consumers.get(t, ()) if c in units), None
            )
            if found is not None:
                units[node.name] = found
    return units


def _replacements(graph: OpGraph, restored: onnx.GraphProto) -> dict[str, str]:
    """Each node of the restored graph → the first node of its replacement: the nodes joined
    through tensors that the original graph lacks, which together stand for the original nodes
    that any of them claims (module docstring)."""
    writer = {t: n.name for n in restored.node for t in n.output if t and t not in graph.tensors}
    links: dict[str, set[str]] = {n.name: set() for n in restored.node}
    for node in restored.node:
        for t in node.input:
            if t in writer:
                links[node.name].add(writer[t])
                links[writer[t]].add(node.name)
    first: dict[str, str] = {}
    for start in links:
        stack = [start]
        while stack:
            node = stack.pop()
            if node not in first:
                first[node] = start
                stack.extend(links[node])
    return first


# ------------------------------------------------------------ sub-models
def _run_submodels(
    model: onnx.ModelProto,
    graph: OpGraph,
    groups: Sequence[Group],
    measured: Sequence[int],
    target: Target,
    settings: Settings,
    feeds: Mapping[str, np.ndarray],
    say: Progress,
) -> dict[int, list[float]]:
    """Time each group of `measured` alone (module docstring); the other groups run once, in
    their own stages, to give the measured ones real inputs."""
    wanted = set(measured)
    plan = build_plan(
        model,
        {f"g{i}": f"d{i}" if i in wanted else "rest" for i in range(len(groups))},
        [PlanDevice(f"d{i}") for i in measured] + [PlanDevice("rest")],
        groups={f"g{i}": g.ops for i, g in enumerate(groups)},
    )
    uses: dict[str, int] = {t: len(c) for t, c in plan.routing.items()}
    env: dict[str, np.ndarray] = dict(feeds)
    out: dict[int, list[float]] = {}
    done = 0
    every = _Every(say)
    for stage in plan.stages:
        runner = _Runner(
            _session(extract_stage(model, plan, stage.id), target),
            {t: env[t] for t in stage.inputs},
            stage.outputs,
            target,
        )
        if stage.device != "rest":
            index = int(stage.device[1:])
            for _ in range(settings.warmup):
                runner.run()
            out[index] = times = [runner.run() for _ in range(settings.repeats)]
            done += 1
            every(
                f"group sub-model {done}/{len(measured)}: {_fastest(times):.3f} ms",
                last=done == len(measured),
            )
        env.update(zip(stage.outputs, runner.results(), strict=True))
        for t in stage.inputs:
            uses[t] -= 1
            if uses[t] == 0 and t not in feeds:
                del env[t]
    return out


def _cut_ms_per_mib(
    model: onnx.ModelProto,
    graph: OpGraph,
    groups: Sequence[Group],
    target: Target,
    settings: Settings,
    feeds: Mapping[str, np.ndarray],
    overhead: float,
    say: Progress,
) -> float:
    """What a cut between two stages costs on the target per MiB crossing it (module
    docstring, Cutting into stages); 0 when the model has no border to cut at."""
    parts = min(CUT_STAGES, len(groups))
    if parts < 2:
        return 0.0
    # Consecutive runs of groups, alternately on two devices: one stage each (more where a
    # branch crosses a border).
    plan = build_plan(
        model,
        {f"g{i}": f"d{i * parts // len(groups) % 2}" for i in range(len(groups))},
        [PlanDevice("d0"), PlanDevice("d1")],
        groups={f"g{i}": g.ops for i, g in enumerate(groups)},
    )
    produced = {t for stage in plan.stages for t in stage.outputs}
    crossing = sum(
        graph.tensors[t].nbytes for stage in plan.stages for t in stage.inputs if t in produced
    )
    if len(plan.stages) < 2 or crossing == 0:
        return 0.0
    stages = [
        (stage, _session(extract_stage(model, plan, stage.id), target)) for stage in plan.stages
    ]
    whole = _session(model, target)
    outputs = list(graph.outputs)

    def run_whole() -> float:
        started = time.perf_counter()
        whole.run(outputs, dict(feeds))
        return (time.perf_counter() - started) * 1000.0

    def run_cut() -> float:
        env = dict(feeds)
        started = time.perf_counter()
        for stage, session in stages:
            results = session.run(list(stage.outputs), {t: env[t] for t in stage.inputs})
            env.update(zip(stage.outputs, results, strict=True))
        return (time.perf_counter() - started) * 1000.0

    for _ in range(max(1, settings.warmup)):
        run_whole(), run_cut()
    whole_ms, cut_ms = [], []
    for _ in range(settings.runs_for(run_whole())):  # in turns: both see the same machine
        whole_ms.append(run_whole())
        cut_ms.append(run_cut())
    extra = _fastest(cut_ms) - _fastest(whole_ms) - (len(stages) - 1) * overhead
    per_mib = max(0.0, extra) / (crossing / 2**20)
    say(
        f"cut into {len(stages)} stages: {_fastest(cut_ms):.3f} ms against "
        f"{_fastest(whole_ms):.3f} ms whole, {per_mib:.3f} ms per MiB crossing"
    )
    return per_mib


# ------------------------------------------------------------ in turns
Turns = tuple[Timed, Load]
"""One device's whole-model runs in the turns, and the load they met."""


def _cores(target: Target) -> list[int]:
    """The cores a target's runs use (`_pinned`); none for a GPU (its work is not on them)."""
    if target.kind != "cpu":
        return []
    cores = available_cores()
    return (
        cores if target.threads is None or target.threads > len(cores) else cores[: target.threads]
    )


def time_in_turns(
    model: onnx.ModelProto,
    graph: OpGraph,
    targets: Mapping[str, Target],
    settings: Settings | None = None,
    progress: Progress | None = None,
) -> dict[str, Turns]:
    """The whole model's runs on every target, in turns (`moirai.profile.turns`): target name →
    its runs and the load they met. A target whose session cannot be made or run (one trial
    run, before the warm-up), or that does not fit in memory beside the others, is left out
    (`measure_device` times it alone)."""
    settings = settings or Settings()
    feeds = _feeds(graph)
    outputs = list(graph.outputs)
    model = open_measured_sizes(model)  # the sessions run random floats, not zeros
    available = _available_memory(Target("cpu"))
    needed = _needed_bytes(graph)
    with raised_priority() as nice:  # the sessions' threads are made under it and keep it
        contenders: dict[str, Contender] = {}
        for name, target in targets.items():
            fits = available is None or needed * (len(contenders) + 1) <= available
            if target.kind == "cpu" and not fits:
                break
            try:
                with _pinned(target):
                    runner = _Runner(_session(model, target), feeds, outputs, target)
                    runner.run()
            except Exception as e:  # ORT raises its own types, without a common base
                log.info("%s: no whole-model run for the turns (%s)", target, e)
                continue
            contenders[name] = Contender(
                run=runner.run, cores=_cores(target), pinned=lambda t=target: _pinned(t)
            )
        if not contenders:
            return {}
        return take_turns(
            contenders,
            warmup=settings.warmup,
            runs_for=settings.runs_for,
            min_seconds=settings.min_seconds,
            patience_seconds=settings.patience_seconds,
            progress=progress,
            nice=nice,
        )


# ------------------------------------------------------------ one device
def measure_device(
    model: onnx.ModelProto,
    graph: OpGraph,
    target: Target,
    settings: Settings | None = None,
    progress: Progress | None = None,
    turns: Turns | None = None,
) -> DeviceProfile:
    """The profile of one device (module docstring). `model` comes from `load_model`; `turns`
    are its runs in turns with other devices (`time_in_turns`), else it takes turns alone."""
    settings = settings or Settings()
    target.check_available()
    if settings.method == "trace" and target.kind != "cpu":
        raise ProfileError(
            f"--method trace: {target}'s trace times kernel launches, not the GPU's work; "
            "use --method auto or submodel"
        )

    def say(message: str) -> None:
        if progress is not None:
            progress(f"{target}: {message}")

    groups = fusion_groups(model, graph, [target.provider])
    say(f"{len(graph.nodes)} nodes in {len(groups)} fusion groups")
    feeds = _feeds(graph)
    model = open_measured_sizes(model)  # the sessions run random floats, not zeros
    with _pinned(target), tempfile.TemporaryDirectory(prefix="moirai-profile-") as tmp:
        overhead = call_overhead_ms(target)
        trace = target.kind == "cpu" and settings.method != "submodel"
        whole = _try_whole(model, graph, target, settings, feeds, Path(tmp), trace, say)
        if whole is not None and turns is None:
            turns = time_in_turns(model, graph, {target.key: target}, settings, say).get(target.key)
        run_ms = None
        if whole is not None:
            fastest = _fastest(whole.run_ms)
            if turns is not None:
                fastest = min(fastest, turns[0].fastest)
                say(f"in turns: {turns[0].fastest:.3f} ms ({turns[1].describe()})")
            run_ms = max(0.0, fastest - overhead)
        timings: dict[int, GroupTiming] = {}
        kernel_ms = None
        untimed = list(range(len(groups)))
        if whole is not None and whole.kernels is not None:
            assert whole.restored is not None
            timings, kernel_ms = _from_trace(graph, groups, whole, overhead, run_ms)
            present = _restored_tensors(whole.restored)
            untimed = [
                i
                for i, g in enumerate(groups)
                if i not in timings and _escaped_the_trace(graph, g, present)
            ]
        if untimed:
            say(f"{len(untimed)} groups to time as sub-models")
            try:
                alone = _run_submodels(model, graph, groups, untimed, target, settings, feeds, say)
            except Exception as e:  # ORT raises its own types, without a common base
                raise UntimeableError(target, e) from None
            scale = 1.0
            if run_ms is not None and not timings:
                total = sum(max(0.0, _fastest(ms) - overhead) for ms in alone.values())
                scale = run_ms / total if total > 0 else 1.0
            for i, ms in alone.items():
                timings[i] = GroupTiming(
                    groups[i].ops,
                    max(0.0, _fastest(ms) - overhead) * scale,
                    _iqr(ms) * scale,
                    "submodel",
                )
        # The cut runs hold the model twice (whole, and in stages): only where that fits.
        available = _available_memory(target)
        cut = 0.0
        if whole is not None and (available is None or 2 * _needed_bytes(graph) <= available):
            cut = _cut_ms_per_mib(model, graph, groups, target, settings, feeds, overhead, say)
    for i, g in enumerate(groups):
        timings.setdefault(i, GroupTiming(g.ops, 0.0, 0.0, "none"))
    profile = DeviceProfile(
        target=target.key,
        signature=signature(target),
        groups=tuple(_with_memory(graph, timings[i]) for i in range(len(groups))),
        run_ms=run_ms,
        run_spread_ms=0.0 if whole is None else _iqr(whole.run_ms),
        call_overhead_ms=overhead,
        kernel_ms=kernel_ms,
        cut_ms_per_mib=cut,
        warmup=settings.warmup,
        repeats=settings.repeats if whole is None else len(whole.run_ms),
        measured_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        load=None if turns is None else turns[1],
    )
    say(
        f"{profile.total_ms:.3f} ms per run in {len(groups)} groups"
        + ("" if run_ms is None else f" (whole model {run_ms:.3f} ms)")
    )
    return profile


def _with_memory(graph: OpGraph, timing: GroupTiming) -> GroupTiming:
    """The group's memory: the weights its kernels read and the activations they write."""
    return dataclasses.replace(
        timing,
        weight_bytes=graph.weight_bytes(timing.ops),
        activation_bytes=graph.activation_bytes(timing.ops),
    )


def _try_whole(
    model: onnx.ModelProto,
    graph: OpGraph,
    target: Target,
    settings: Settings,
    feeds: Mapping[str, np.ndarray],
    workdir: Path,
    trace: bool,
    say: Progress,
) -> _Whole | None:
    """The whole-model runs, or None (with a warning) when the model does not fit or fails
    there; `--method trace` fails instead."""
    needed = _needed_bytes(graph)
    available = _available_memory(target)
    problem = None
    if available is not None and needed * (2 if trace else 1) > available:
        problem = f"needs about {needed / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available"
    else:
        try:
            return _run_whole(model, graph, target, settings, feeds, workdir, trace, say)
        except Exception as e:  # ORT raises its own types, without a common base
            problem = one_line(e)
    if settings.method == "trace":
        raise ProfileError(f"{target}: the whole model cannot run there ({problem})")
    log.warning("%s: the whole model cannot run there (%s): timing groups alone", target, problem)
    say("the whole model does not run here: every group as a sub-model")
    return None


class UntimeableError(ProfileError):
    """`target` cannot time the model: its groups fail as sub-models (`problem`, ONNX Runtime's
    words). A model that runs only on meaningful values (silero-vad's sample rate, which picks
    the branch of an `If` and is 0 in `_feeds`), or whose unused branch ONNX Runtime cannot
    type at the planned input shapes. Analytic costs still price it."""

    def __init__(self, target: Target, error: Exception) -> None:
        self.target = target
        self.problem = one_line(error, 300)
        super().__init__(
            f"{self.reason}; plan with --profile analytic (on Kubernetes spec.profiling.mode: "
            "analytic), which runs nothing"
        )

    @property
    def reason(self) -> str:
        return (
            f"{self.target}: the model cannot be timed here, on random floats and zero "
            f"integers ({self.problem})"
        )


def _needed_bytes(graph: OpGraph) -> int:
    """What a session of the whole model holds: its weights and every activation."""
    return graph.weight_bytes(n.name for n in graph.nodes) + sum(
        t.nbytes for t in graph.tensors.values() if not t.constant
    )


def _available_memory(target: Target) -> int | None:
    """Bytes the CPU has available (None on a GPU or when unknown: the attempt decides)."""
    if target.kind != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _restored_tensors(restored: onnx.GraphProto) -> set[str]:
    """Tensors that some node of the (restored) optimised graph still writes."""
    return {t for node in restored.node for t in node.output}


def _escaped_the_trace(graph: OpGraph, group: Group, present: set[str]) -> bool:
    """A group without kernel time that computes something and whose results still exist in
    the optimised graph: the mapping missed it, so it is timed alone. A group whose results are
    gone was fused into a neighbour's kernel (the NCHWc convolution takes in the residual Add
    and the Relu after it): its time is in that kernel already."""
    computing = [graph.node[n] for n in group.ops if not graph.node[n].constant]
    return any(node_flops(graph, n) for n in computing) and any(
        t in present for n in computing for t in n.outputs
    )


def _from_trace(
    graph: OpGraph, groups: Sequence[Group], whole: _Whole, overhead: float, run_ms: float
) -> tuple[dict[int, GroupTiming], float]:
    """Group timings from the trace, calibrated to the plain session's runs (module
    docstring) and adding up to `run_ms`; also the sum of the kernels' medians."""
    assert whole.kernels is not None
    assert whole.optimised is not None and whole.restored is not None
    units = node_units(graph, whole.optimised, whole.restored)
    mapped = [(node, units[node]) for node in whole.kernels if node in units]
    unmapped = sorted(set(whole.kernels) - set(units))
    if unmapped:
        log.debug("kernels mapped to no original node: %s", ", ".join(unmapped[:10]))

    def spread(values: Callable[[str], float]) -> list[float]:
        timings = [GroupTiming(tuple(unit), values(node), 0.0, "trace") for node, unit in mapped]
        return allocate(graph, timings, groups)[0]

    runs = len(whole.run_ms)
    per_run = [spread(lambda node, r=r: whole.kernels[node][r]) for r in range(runs)]
    medians = [_median([per_run[r][g] for r in range(runs)]) for g in range(len(groups))]
    spreads = [_iqr([per_run[r][g] for r in range(runs)]) for g in range(len(groups))]
    launches = spread(lambda node: 1.0)
    kernel_sums = [sum(k[r] for k in whole.kernels.values()) for r in range(runs)]
    # A plain run and the profiled run after it saw the same machine: their difference is the
    # time between kernels, robust to the machine's load drifting during the measurement.
    pairs = [(max(0.0, w - overhead), k) for w, k in zip(whole.run_ms, kernel_sums, strict=True)]
    gap = _median([c - k for c, k in pairs])
    scale = 1.0 if gap >= 0 else _median([c / k for c, k in pairs if k])
    count = sum(launches) or 1.0
    shares = [medians[g] * scale + max(0.0, gap) * launches[g] / count for g in range(len(groups))]
    # The trace says how the time splits; the plain session says how much there is.
    norm = run_ms / sum(shares) if sum(shares) > 0 else 1.0
    timings = {
        g: GroupTiming(group.ops, shares[g] * norm, spreads[g] * scale * norm, "trace")
        for g, group in enumerate(groups)
        if launches[g] > 0
    }
    return timings, _median(kernel_sums)


# ------------------------------------------------------- the Profile source
def _better(new: DeviceProfile, old: DeviceProfile) -> bool:
    """Whether a new measurement replaces an earlier, contended one: a quiet one always does,
    a contended one where the device ran faster (the faster run is nearer the device alone)."""
    if not new.contended:
        return True
    if new.run_ms is None or old.run_ms is None:
        return new.run_ms is not None
    return new.run_ms <= old.run_ms


def link_signature() -> dict[str, Any]:
    """What a loopback link measurement depends on: the machine, the gRPC build, the method."""
    return {
        "method": LINK_METHOD_VERSION,
        "path": LINK_PATH,
        "cpu": cpu_model(),
        "cores": len(available_cores()),
        "grpc": grpc.__version__,
    }


class MeasuredProfile(DocumentProfile):
    """Measures every device it is asked to price (or takes it from the cache), and with a
    `link_probe` (`moirai.runtime.linkprobe.measure_loopback`) the loopback link between two
    local stage servers; a `Profile`. `loaded` hands over the model already loaded (its
    `load_model` model, graph and file digest), so it is not loaded again. `together` names
    targets to measure in turns with whichever is asked for first (the devices of every
    grouping of this machine's CPU, `moirai.planning.space.cpu_groupings`), so that the
    times the planner compares them by met the same load (`moirai.profile.turns`)."""

    def __init__(
        self,
        model_path: str | Path,
        input_shapes: InputShapes | None = None,
        *,
        settings: Settings | None = None,
        cache: ProfileCache | None = None,
        link_probe: LinkProbe | None = None,
        link_sizes: Sequence[int] = DEFAULT_SIZES,
        progress: Progress | None = None,
        loaded: tuple[onnx.ModelProto, OpGraph, str] | None = None,
        together: Sequence[Target] = (),
    ) -> None:
        self.model_path = Path(model_path)
        self.together = {t.key: t for t in together}
        self.input_shapes = {k: list(v) for k, v in (input_shapes or {}).items()}
        self.settings = settings or Settings()
        self.cache = cache
        self.link_probe = link_probe
        self.link_sizes = tuple(link_sizes)
        self.progress = progress
        self.cache_status: dict[str, str] = {}
        """Profile device name → "hit" or "measured"."""
        self._model: tuple[onnx.ModelProto, OpGraph] | None = None
        if loaded is not None:
            self._model = (loaded[0], loaded[1])
        digest = loaded[2] if loaded is not None else model_digest(self.model_path)
        super().__init__(
            ProfileDocument(
                {
                    "name": self.model_path.stem,
                    "sha256": digest,
                    "input_shapes": self.input_shapes,
                }
            )
        )

    def _loaded(self) -> tuple[onnx.ModelProto, OpGraph]:
        if self._model is None:
            model = load_model(self.model_path, self.input_shapes or None)
            self._model = (model, build_graph(model))
        return self._model

    def measure(self, targets: Mapping[str, Target]) -> ProfileDocument:
        """Profile each named target (cache first), and the link with a probe; the document.
        Targets to measure are timed in turns with each other and with the `together` ones not
        measured yet."""
        for target in targets.values():
            target.check_available()
        devices = dict(self.document.devices)
        earlier: dict[str, DeviceProfile] = {}
        wanted = self._from_cache(
            {n: t for n, t in targets.items() if n not in devices}, devices, earlier
        )
        if wanted:
            present = {d.target for d in devices.values()} | set(wanted)
            others = {
                k: t for k, t in self.together.items() if k not in present and k not in devices
            }
            wanted |= self._from_cache(others, devices, earlier)
        turns: dict[str, Turns] = {}
        if wanted:
            model, graph = self._loaded()
            self._say(f"timing {', '.join(map(str, wanted.values()))} in turns")
            turns = time_in_turns(model, graph, wanted, self.settings, self.progress)
        for name, target in wanted.items():
            model, graph = self._loaded()
            entry = measure_device(
                model, graph, target, self.settings, self.progress, turns.get(name)
            )
            before = earlier.get(name)
            if before is not None and not _better(entry, before):
                self._say(f"{target}: the earlier measurement was faster: kept")
                entry = before
            self.cache_status[name] = "measured"
            if self.cache is not None and entry is not before:
                digest = self.document.model["sha256"]
                self.cache.put(digest, self.input_shapes, signature(target), entry)
            if entry.contended:
                log.warning(
                    "%s: measured under load (%s): its time may be slower than the device alone; "
                    "the cache keeps it until a quieter measurement",
                    target,
                    entry.load.describe() if entry.load else "",
                )
            devices[name] = entry
        link = self.document.link
        if self.link_probe is not None and link is None:
            link = self.cache.get_link(link_signature()) if self.cache else None
            if link is None:
                self._say("link: measuring two local stage servers over gRPC")
                link = self.link_probe(self.link_sizes, progress=self.progress)
                if self.cache is not None:
                    self.cache.put_link(link_signature(), link)
            self._say(
                f"link: {link.latency_ms:.3f} ms + {link.bandwidth_bytes_per_s / 1e9:.3f} GB/s "
                f"(R² {link.r2:.3f})"
            )
        self.document = ProfileDocument(self.document.model, devices, link)
        return self.document

    def compute_ms(
        self, graph: OpGraph, groups: Sequence[Group], devices: Sequence[DeviceSpec]
    ) -> list[Mapping[str, float]]:
        self.measure({Target.of(d).key: Target.of(d) for d in devices})
        return super().compute_ms(graph, groups, devices)

    def annotate(self, costgraph: CostGraph) -> CostGraph:
        annotated = super().annotate(costgraph)
        source = dict(annotated.extra["source"])
        source["measured"] = {
            device: {**info, "cache": self.cache_status.get(info["profile_device"], "given")}
            for device, info in source["measured"].items()
        }
        return dataclasses.replace(annotated, extra={**annotated.extra, "source": source})

    def _from_cache(
        self,
        targets: Mapping[str, Target],
        devices: dict[str, DeviceProfile],
        earlier: dict[str, DeviceProfile],
    ) -> dict[str, Target]:
        """Put the cached entries of `targets` into `devices`; those measured under load into
        `earlier` instead (measured again, `_better`); the targets left to measure."""
        digest = self.document.model["sha256"]
        wanted = {}
        for name, target in targets.items():
            entry = (
                self.cache.get(digest, self.input_shapes, signature(target)) if self.cache else None
            )
            if entry is not None and not entry.contended:
                self.cache_status[name] = "hit"
                self._say(f"{target}: cached ({self.cache.directory if self.cache else ''})")
                devices[name] = entry
                continue
            if entry is not None:
                earlier[name] = entry
                self._say(f"{target}: cached, but measured under load: measuring again")
            wanted[name] = target
        return wanted

    def _say(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)
