"""The analytic planner on a real (tiny) model: devices from pools, a solve, a stage plan."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from moirai_operator.catalogue import Catalogue, devices_document
from moirai_operator.planning import Planner, device_set
from moirai_operator.pools import match_pools, node_facts
from moirai_operator.spec import Defaults, SpecError, parse_spec
from moirai_operator.status import InsufficientMemoryError, failure, placement_summary
from operator_bodies import make_node, make_spec, schema, write_mlp

from moirai.errors import ModelError
from moirai.planning import build_costgraph
from moirai.planning.prediction import predict
from moirai.stageplan import StagePlan

NODES = [
    node_facts(make_node("g", "gpu", gpus=2, product="Tesla-T4")),
    node_facts(make_node("c", "cpu", cpu="16")),
]


@pytest.fixture
def planner():
    with ThreadPoolExecutor(1) as executor:
        yield Planner(Catalogue.load(), executor)


def model_spec(model: Path, **extra):
    volume = {"claimName": "c", "mountPath": str(model.parent)}
    return make_spec(model={"uri": str(model), "volume": volume}, **extra)


async def test_plan_places_the_model_on_pool_devices(tmp_path: Path, planner) -> None:
    model = write_mlp(tmp_path / "mlp.onnx")
    spec = parse_spec(model_spec(model, placement={"solver": "heft"}), Defaults())
    plan = await planner(spec, match_pools(spec.pools, NODES), model)
    assert plan.devices and plan.stages >= 1
    assert {d.entry.pool for d in plan.devices} <= {"gpu", "cpu"}
    assert plan.latency_ms > 0 and plan.solver_status in ("optimal", "feasible", "heuristic")
    assert plan.stage_plan["format"] == "moirai.stageplan/v1"
    assert {s["device"] for s in plan.stage_plan["stages"]} == {d.entry.name for d in plan.devices}
    assert plan.placement["format"] == "moirai.placement/v1"
    for d in plan.devices:
        assert d.gpus == (1 if d.entry.kind == "gpu" else 0)
        assert d.node_selector == {"moirai.dev/pool": d.entry.pool}
        assert d.tasks >= 1


@pytest.mark.timeout(120)  # a hang guard: without the stop the solves take ten minutes
async def test_a_stopped_solve_answers_at_once_with_its_best_plan(tmp_path: Path, planner) -> None:
    """The stop that `reconcile` sets on a superseded solve reaches the real solver: a plan
    from it, marked as stopped, instead of the whole time limit."""
    model = write_mlp(tmp_path / "mlp.onnx", layers=6)
    placement = {"solver": "auto", "timeLimitSeconds": 600}
    spec = parse_spec(model_spec(model, placement=placement), Defaults())
    stop = threading.Event()
    stop.set()
    plan = await planner(spec, match_pools(spec.pools, NODES), model, stop=stop)
    assert plan.devices and plan.solver.startswith("auto(")
    assert plan.solver_status == "optimal" or plan.placement["extra"]["stopped_by"] == "stop"


async def test_cpu_devices_plan_their_stage_servers_memory(tmp_path: Path, planner) -> None:
    """A CPU stage server's pod requests what it peaks at: its tasks' weights and activations
    plus a stage server's fixed overhead (moirai.sessions)."""
    from moirai.sessions import STAGE_SERVER_OVERHEAD_BYTES

    model = write_mlp(tmp_path / "mlp.onnx", hidden=256, layers=4)
    cpu_only = {
        "pools": [{"name": "cpu", "kind": "cpu", "nodeSelector": {"moirai.dev/pool": "cpu"}}]
    }
    spec = parse_spec(model_spec(model, placement={"solver": "single"}, **cpu_only), Defaults())
    plan = await planner(spec, match_pools(spec.pools, NODES), model)
    (device,) = plan.devices
    weights = 4 * (256 * 256 + 256) * 4
    assert weights < device.memory_bytes - STAGE_SERVER_OVERHEAD_BYTES < 2 * weights


async def test_a_spec_that_batches_needs_a_batch_dimension(tmp_path: Path, planner) -> None:
    batching = {"serving": {"batching": {"maxBatchSize": 8}}, "placement": {"solver": "heft"}}
    fixed = write_mlp(tmp_path / "fixed.onnx")
    spec = parse_spec(model_spec(fixed, **batching), Defaults())
    with pytest.raises(SpecError, match=r"input 'x' has a fixed first dimension \(1\)") as e:
        await planner(spec, match_pools(spec.pools, NODES), fixed)
    assert "without spec.serving.batching.maxBatchSize" in str(e.value)
    assert failure(e.value).reason == "InvalidSpec"
    symbolic = write_mlp(tmp_path / "symbolic.onnx", batch="N")
    spec = parse_spec(model_spec(symbolic, **batching), Defaults())
    plan = await planner(spec, match_pools(spec.pools, NODES), symbolic)
    assert plan.stage_plan["inputs"][0]["shape"] == [-1, 64]
    assert plan.stage_plan["model"]["input_shapes"] == {"x": [1, 64]}  # priced at batch 1


async def test_the_status_reports_the_latency_the_library_predicts(tmp_path: Path, planner) -> None:
    """The plan as served behind the operator's gateway (a Deployment of its own), its hops
    included."""
    model = write_mlp(tmp_path / "mlp.onnx")
    spec = parse_spec(model_spec(model, placement={"solver": "heft"}), Defaults())
    pools = match_pools(spec.pools, NODES)
    plan = await planner(spec, pools, model)
    costgraph = build_costgraph(model, device_set(devices_document(pools, Catalogue.load())))
    want = predict(costgraph, StagePlan.from_dict(plan.stage_plan), fused=False)
    summary = placement_summary(plan, {d.entry.name: d.entry.name for d in plan.devices})
    assert summary["latencyMs"] == round(want.latency_ms, 6)
    assert plan.latency_ms > plan.placement["makespan_ms"] + want.client_ms


@pytest.mark.parametrize("solver", ["auto", "heft"])
async def test_the_status_says_which_bound_binds_and_why_the_solve_ended(
    tmp_path: Path, planner, solver: str
) -> None:
    """`auto`'s plans say both (whether more time could pay); a heuristic's say neither, and
    the status leaves them out rather than writing empty strings."""
    model = write_mlp(tmp_path / "mlp.onnx")
    spec = parse_spec(model_spec(model, placement={"solver": solver}), Defaults())
    plan = await planner(spec, match_pools(spec.pools, NODES), model)
    summary = placement_summary(plan, {d.entry.name: d.entry.name for d in plan.devices})
    if solver == "auto":
        assert summary["boundFrom"] == plan.placement["bound_from"]
        assert summary["stoppedBy"] == plan.placement["stopped_by"] in ("proof", "time")
    else:
        assert "boundFrom" not in summary and "stoppedBy" not in summary
    # the API server prunes what the CRD's schema does not name: every field must be there
    status = schema()["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert set(summary) <= set(status["placement"]["properties"])


async def test_model_larger_than_the_pools_is_reported_in_gib(tmp_path: Path, planner) -> None:
    model = write_mlp(tmp_path / "mlp.onnx", hidden=1024, layers=2)
    spec = parse_spec(
        model_spec(
            model,
            pools=[{"name": "cpu", "kind": "cpu", "threadsPerDevice": 1, "memoryPerDevice": "1Mi"}],
        ),
        Defaults(),
    )
    with pytest.raises(InsufficientMemoryError, match=r"needs \d+\.\d MiB.*offer \d+\.\d MiB"):
        await planner(spec, match_pools(spec.pools, NODES), model)


async def test_a_measured_profile_prices_the_plan(tmp_path: Path, planner) -> None:
    from moirai_operator.profiling import merge

    from moirai.cli import main

    model = write_mlp(tmp_path / "mlp.onnx")
    out = tmp_path / "profile.json"
    assert (
        main(
            [
                "profile",
                str(model),
                "--device",
                "cpu=cpu:threads=1",
                "--no-links",
                "--no-cache",
                "--repeats",
                "2",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    raw = make_spec(pools=[{"name": "cpu", "kind": "cpu", "threadsPerDevice": 1, "maxDevices": 2}])
    spec = parse_spec(
        model_spec(model, pools=raw["pools"], placement={"solver": "heft"}), Defaults()
    )
    pools = match_pools(spec.pools, NODES)
    document = json.loads(out.read_text())
    profile = merge({"cpu": document}, pools)
    assert set(profile["devices"]) == {"cpu-0", "cpu-1"}
    measured = await planner(spec, pools, model, profile)
    slow = json.loads(out.read_text())
    groups = slow["devices"]["cpu"]["groups"]
    for group in groups:
        # Added, not scaled: a model this small may be measured at 0 ms on a busy machine.
        group["ms"] += 100.0
    slowed = await planner(spec, pools, model, merge({"cpu": slow}, pools))
    # The times come from the profile (the served latency adds the same hops to both): the
    # groups of an MLP run one after another, so the slowed plan takes at least their added time.
    assert slowed.placement["makespan_ms"] >= 100.0 * len(groups)
    assert slowed.latency_ms - measured.latency_ms == pytest.approx(
        slowed.placement["makespan_ms"] - measured.placement["makespan_ms"], rel=0.05
    )


@pytest.mark.parametrize(
    ("content", "shapes", "message"),
    [
        (b"<html>not a model</html>", {}, "model {uri}: not a valid ONNX model"),
        (None, {"nope": [1, 64]}, "spec.model.inputShapes names unknown input 'nope'"),
        (None, {"x": [1, 3]}, "is fixed at 64 in the model but spec.model.inputShapes gives 3"),
    ],
)
async def test_model_errors_name_the_uri_and_the_spec_fields(
    tmp_path: Path, planner, content, shapes, message
) -> None:
    """Not the operator's cached copy of the model nor the CLI's --input-shape, which were all
    the status said: '/var/cache/moirai/models/717b3858f22cf0f9/model.onnx: not a valid ONNX
    model'."""
    cached = tmp_path / "cache" / "717b3858f22cf0f9" / "model.onnx"
    cached.parent.mkdir(parents=True)
    if content is None:
        write_mlp(cached)
    else:
        cached.write_bytes(content)
    uri = "https://models.example/mlp.onnx"
    spec = parse_spec(make_spec(model={"uri": uri, "inputShapes": shapes}), Defaults())
    with pytest.raises(ModelError) as error:
        await planner(spec, match_pools(spec.pools, NODES), cached)
    assert message.format(uri=uri) in str(error.value)
    assert str(cached) not in str(error.value) and "--" not in str(error.value)
    assert failure(error.value).reason == "InvalidModel"
