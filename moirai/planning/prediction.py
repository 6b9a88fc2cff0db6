"""What a served request will take: the prediction `moirai serve`, `moirai demo`, the operator
and the validation benchmark report.

The solver's cost graph schedules fusion groups one by one and starts a request with the model
inputs already on every device; the runtime runs *stages*: a stage starts once all its inputs
are in, is one session call, and sends its outputs when all its groups are done; the gateway
pushes the inputs to the first stages and collects the outputs from the last ones; the client
makes one call to the gateway. So the plan is predicted on a cost graph of its own
(`served_costgraph`):

- one task per stage, on its device: its groups' times there plus one session call
  (`call_ms`, a measured profile's `call_overhead_ms`);
- one edge per pair of stages, carrying the bytes of the tensors that cross, priced by the
  cost graph's links (the serving link, with the price of a stage border on the devices whose
  measured profile has one: `moirai.profile.document.with_borders`);
- the front end, with a task that pushes the inputs to the stages that read them and one that
  collects the outputs (one push at a time, as the execution model sends from any device): in
  the process of the plan's first stage where `moirai serve` runs it there (`fused`:
  `moirai.runtime.local`), so that stage's device takes the inputs and gives the outputs
  without a hop, and its links price the others; else as a CPU device of its own (the gateway)
  over the default link, as on Kubernetes.

A hop between stage servers is work on their cores, not only a wait: the sender encodes and
writes its tensors, the receiver wakes, reads and files them, and a one-thread CPU device cannot
compute meanwhile. The execution model that the solvers and the simulator share has this hop
work (`moirai.placement.problem.hop_work`: half of a hop's time on each end whose device pays
for its transfers, a CPU, `Device.pays_for_transfers`; the sender's share as the transfer
starts, the receiver's once the data is in), so the served plan is priced by the same code and
rules that planned it. On a path the hop still costs its time once; but a device busy sending
one branch's outputs does not compute the other branch then. (Split plans with many hops were
served up to 30% slower than predicted without it: `bench/results/validation.md`.) The served
plan is list scheduled with each stage's outputs pushed as soon as it has them, as a stage
server does (`simulate.list_schedule`, `eager`).

The simulator gives its makespan (from the front end's first push to the last output back) and
its pipelined period, under the same execution model as the solvers; the client's round trip to
the front end (`CLIENT_LOOPBACK`) adds to the latency, and keeps the front end's process (the
first stage's device, or the gateway) busy as long for every request.

A plan of several lanes (`moirai.planning.lanes`) is priced lane by lane and combined by the
lanes' weights: a request's latency is its lane's, and the period is that of the busiest
resource per request, a lane's own devices for the share of requests it takes, the one gateway
for all of them (`combine`). Fused, every lane's first stage shares the front end's process
(`moirai.runtime.local`), and each lane's first device carries the front end's work for the
requests of that lane: its event loop runs on whichever core is free, which on a machine whose
cores are all the lanes' is, in the mean, a lane's.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from onnx import TensorProto, helper

from moirai.costgraph import CostGraph, Device, Edge, Link, Task
from moirai.devices import DeviceSpec
from moirai.errors import MoiraiError
from moirai.graph import STRING_ELEMENT_BYTES
from moirai.placement import PlacementProblem
from moirai.placement.simulate import list_schedule, loads
from moirai.profile import PricesCalls, Profile
from moirai.stageplan import GATEWAY, ONNX_DATATYPES, StagePlan

# The client's Open Inference Protocol call to the gateway: one gRPC round trip carrying the
# inputs one way and the outputs the other (measured like the chain's gRPC path).
CLIENT_LOOPBACK = Link(bandwidth_bytes_per_s=0.55e9, latency_ms=0.9)
GATEWAY_IN, GATEWAY_OUT = f"{GATEWAY}:in", f"{GATEWAY}:out"
_ITEMSIZE = {
    name: STRING_ELEMENT_BYTES
    if onnx_type == TensorProto.STRING
    else helper.tensor_dtype_to_np_dtype(onnx_type).itemsize
    for onnx_type, name in ONNX_DATATYPES.items()
}


@dataclass(frozen=True)
class Prediction:
    served_ms: float
    """Makespan of the served plan: the gateway's pushes, the stages, their hops."""
    client_ms: float
    """The client's round trip to the gateway."""
    period_ms: float
    """Pipelined period of the served plan: its busiest device or port per request (a CPU
    device also busy for its transfers, `moirai.placement.simulate.loads`)."""

    @property
    def latency_ms(self) -> float:
        return self.served_ms + self.client_ms

    @property
    def throughput_rps(self) -> float:
        return 1000.0 / self.period_ms if self.period_ms > 0 else math.inf

    def to_dict(self) -> dict[str, float]:
        """The stage plan's `predicted` keys for the plan as served."""
        return {
            "latency_ms": self.latency_ms,
            "served_ms": self.served_ms,
            "client_ms": self.client_ms,
            "served_period_ms": self.period_ms,
        }

    @classmethod
    def from_dict(cls, predicted: Mapping[str, Any]) -> Prediction:
        """Back from a stage plan's `predicted` (`to_dict`'s keys)."""
        try:
            return cls(
                served_ms=float(predicted["served_ms"]),
                client_ms=float(predicted["client_ms"]),
                period_ms=float(predicted["served_period_ms"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise MoiraiError(f"the plan's predicted times lack or mistype {e}") from None

    def describe(self, period: bool = True) -> str:
        """One line for a person; `period` adds the period and throughput."""
        line = (
            f"predicted as served: latency {self.latency_ms:.2f} ms (stages and gateway hops "
            f"{self.served_ms:.2f} ms + client call {self.client_ms:.2f} ms)"
        )
        if period:
            line += f", period {self.period_ms:.2f} ms ({self.throughput_rps:.1f} req/s)"
        return line


def _nbytes(plan: StagePlan, tensors: Sequence[str], sizes: Mapping[str, int] | None) -> int:
    """Bytes of these tensors as priced: `sizes` (the model's tensors at the shapes it was
    priced at, `LoadedModel.tensor_bytes`) where it has them, else the plan's types, where a
    dimension that is not fixed counts as 1."""
    total = 0
    for name in tensors:
        if sizes is not None and name in sizes:
            total += sizes[name]
            continue
        spec = plan.spec(name)
        total += math.prod(max(1, d) for d in spec.shape) * _ITEMSIZE[spec.datatype]
    return total


def front_end(plan: StagePlan, fused: bool = True) -> str:
    """Where the front end runs: the device of the plan's first stage when it is fused into
    that stage's process (a plan of one lane), else the gateway of its own."""
    return plan.stages[0].device if fused and len(plan.lanes) == 1 else GATEWAY


def served_costgraph(
    costgraph: CostGraph,
    plan: StagePlan,
    call_ms: Mapping[str, float] | None = None,
    entry: str = GATEWAY,
    sizes: Mapping[str, int] | None = None,
) -> CostGraph:
    """The plan as the runtime executes it (module docstring), the front end on `entry`
    (`front_end`). `costgraph` is the one the plan was made from: its tasks' `ops` say which
    stage runs them. `sizes` gives the bytes of the tensors that cross at the priced shapes
    (`LoadedModel.tensor_bytes`): a plan types what varies with a symbolic dimension -1, so
    without them a transformer's [batch, sequence, 768] border counts one row."""
    if GATEWAY in costgraph.device:
        raise MoiraiError(f"a device may not be named {GATEWAY!r}: the gateway's name")
    call_ms = call_ms or {}
    # A node that several stages copy (a shared constant) prices no task: its task goes to the
    # stage of one of its other nodes.
    copies = Counter(n for s in plan.stages for n in s.nodes)
    stage_of = {n: s for s in plan.stages for n in s.nodes if copies[n] == 1}
    compute = {s.id: call_ms.get(s.device, 0.0) for s in plan.stages}
    for task in costgraph.tasks:
        owner = next((stage_of[n] for n in task.ops if n in stage_of), None)
        if owner is not None:
            compute[owner.id] += task.compute_ms[owner.device]
    producer = {t: s.id for s in plan.stages for t in s.outputs}
    producer.update({t.name: GATEWAY_IN for t in plan.inputs})
    crossing: dict[tuple[str, str], list[str]] = {}
    for tensor, consumers in plan.routing.items():
        for consumer in consumers:
            src, dst = producer[tensor], GATEWAY_OUT if consumer == GATEWAY else consumer
            crossing.setdefault((src, dst), []).append(tensor)
    gateway = (Device(GATEWAY, memory_bytes=0, kind="cpu"),) if entry == GATEWAY else ()
    return CostGraph(
        name=f"{costgraph.name}-served",
        devices=(*costgraph.devices, *gateway),
        tasks=(
            Task(GATEWAY_IN, {entry: 0.0}),
            *(Task(s.id, {s.device: compute[s.id]}) for s in plan.stages),
            Task(GATEWAY_OUT, {entry: 0.0}),
        ),
        edges=tuple(
            Edge(src, dst, _nbytes(plan, tensors, sizes))
            for (src, dst), tensors in crossing.items()
        ),
        default_link=costgraph.default_link,
        pair_links=costgraph.pair_links,
    )


def predict(
    costgraph: CostGraph,
    plan: StagePlan,
    call_ms: Mapping[str, float] | None = None,
    client: Link = CLIENT_LOOPBACK,
    fused: bool = True,
    sizes: Mapping[str, int] | None = None,
) -> Prediction:
    """Latency and period of `plan` as served (module docstring), the front end `fused` into
    the first stage's process; a plan of several lanes is priced lane by lane (`combine`), each
    lane's share of the front end's work on its first stage's device where `fused`, else on a
    gateway of its own. `sizes`: `served_costgraph`'s."""
    if len(plan.lanes) > 1:
        from moirai.planning.lanes import lane_view

        views = [lane_view(plan, k) for k in range(len(plan.lanes))]
        lanes = [
            predict_lane(costgraph, view, call_ms, client, front_end(view, fused), sizes)
            for view in views
        ]
        return combine(lanes, [lane.weight for lane in plan.lanes])
    return predict_lane(costgraph, plan, call_ms, client, front_end(plan, fused), sizes).prediction


@dataclass(frozen=True)
class LanePrediction:
    prediction: Prediction
    lane_period_ms: float
    """The busiest of the lane's own devices and ports per request (the gateway apart)."""
    gateway_ms: float
    """The gateway's busy time per request of the lane."""


def predict_lane(
    costgraph: CostGraph,
    plan: StagePlan,
    call_ms: Mapping[str, float] | None = None,
    client: Link = CLIENT_LOOPBACK,
    entry: str = GATEWAY,
    sizes: Mapping[str, int] | None = None,
) -> LanePrediction:
    """One lane's prediction, the front end on `entry` (`front_end`), with the parts `combine`
    needs to put lanes together; `sizes`: `served_costgraph`'s."""
    served = served_costgraph(costgraph, plan, call_ms, entry, sizes)
    assignment = {
        GATEWAY_IN: entry,
        GATEWAY_OUT: entry,
        **{s.id: s.device for s in plan.stages},
    }
    problem = PlacementProblem(served)
    assign = [problem.device_index[assignment[t]] for t in problem.tasks]
    result = list_schedule(problem, assign, eager=True)
    # The period charges a paying device its transfers in full already (`loads`).
    busy = loads(problem, assign)
    inputs, outputs = [t.name for t in plan.inputs], [t.name for t in plan.outputs]
    # The front end's own share of every request, the client's call, keeps its process busy.
    client_ms = client.transfer_ms(_nbytes(plan, inputs, sizes) + _nbytes(plan, outputs, sizes))
    busy[problem.device_index[entry]] += client_ms
    k, g = problem.num_devices, problem.device_index.get(GATEWAY, -1)
    gateway = max(busy[g], busy[k + g], busy[2 * k + g]) if g >= 0 else 0.0
    own = max((b for i, b in enumerate(busy) if i % k != g), default=0.0)
    return LanePrediction(
        Prediction(served_ms=result.makespan, client_ms=client_ms, period_ms=max(gateway, own)),
        own,
        gateway,
    )


def combine(lanes: Sequence[LanePrediction], weights: Sequence[float]) -> Prediction:
    """Several lanes behind one gateway, lane k taking a share `weights[k]` of the requests: a
    request's expected latency, and the period of the busiest resource per request (a lane's
    own, for its share; the gateway's, for all)."""
    total = sum(weights)
    share = [w / total for w in weights]
    return Prediction(
        served_ms=sum(w * lane.prediction.served_ms for w, lane in zip(share, lanes, strict=True)),
        client_ms=sum(w * lane.prediction.client_ms for w, lane in zip(share, lanes, strict=True)),
        period_ms=max(
            max(w * lane.lane_period_ms for w, lane in zip(share, lanes, strict=True)),
            sum(w * lane.gateway_ms for w, lane in zip(share, lanes, strict=True)),
        ),
    )


def balanced_weights(lanes: Sequence[LanePrediction]) -> list[float]:
    """Request shares that keep every lane equally busy: in proportion to each lane's rate."""
    rates = [1.0 / max(lane.lane_period_ms, 1e-9) for lane in lanes]
    return [r / sum(rates) for r in rates]


def call_overheads(profile: Profile | None, devices: Sequence[DeviceSpec]) -> dict[str, float]:
    """What one session call costs on each device beyond its kernels, where the profile says
    (a measured one does; an analytic profile counts kernels only)."""
    if not isinstance(profile, PricesCalls):
        return {}
    out = {}
    for d in devices:
        ms = profile.call_overhead_ms(d)
        if ms is not None:
            out[d.name] = ms
    return out
