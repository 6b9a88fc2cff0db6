"""The reconciler against an in-memory API: stale detection, apply and prune, status, errors."""

from __future__ import annotations

import asyncio
import base64
import copy
import dataclasses
import hashlib
import json
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from moirai_operator import reconcile
from moirai_operator.children import BuildOptions
from moirai_operator.kube import PRUNED_KINDS
from moirai_operator.pools import PoolMatch, node_facts
from moirai_operator.reconcile import Context, gateway_trust_root, stale_reason
from moirai_operator.spec import Defaults, PlacedModelSpec
from operator_bodies import make_body, make_node, make_plan, make_spec

from moirai.errors import InfeasibleError, StoppedError


class FakeKube:
    """Stores applied objects (a Secret's stringData as the API server stores it, base64 in
    data); status patches merge into `status`. `placed`: the PlacedModels, by name (`converge`
    puts the one it reconciles there; the reconciler reads it back after planning)."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.placed: dict[str, dict[str, Any]] = {}
        self.status: dict[str, Any] = {}
        self.patches: list[dict[str, Any]] = []
        self.applied: list[tuple[str, str]] = []
        self.dry_runs: list[tuple[str, str]] = []
        self.deleted: list[tuple[str, str]] = []
        self.patched: list[tuple[str, str]] = []

    async def apply(self, manifest: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
        manifest = copy.deepcopy(manifest)
        if dry_run:
            self.dry_runs.append((manifest["kind"], manifest["metadata"]["name"]))
            return manifest
        if manifest["kind"] == "Secret":
            data = manifest.setdefault("data", {})
            for key, value in manifest.pop("stringData", {}).items():
                data[key] = base64.b64encode(value.encode()).decode()
        key = (manifest["kind"], manifest["metadata"]["name"])
        self.objects[key] = manifest
        self.applied.append(key)
        return manifest

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        if kind == "PlacedModel":
            return self.placed.get(name)
        return self.objects.get((kind, name))

    async def list(self, kind: str, namespace: str, labels: Mapping[str, str]) -> list:
        return [
            o
            for (k, _), o in self.objects.items()
            if k == kind and labels.items() <= o["metadata"]["labels"].items()
        ]

    async def delete(self, kind: str, namespace: str, name: str) -> None:
        self.deleted.append((kind, name))
        self.objects.pop((kind, name), None)

    async def patch(self, kind: str, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        def merge(into: dict[str, Any], patch: Mapping[str, Any]) -> None:
            for key, value in patch.items():
                if isinstance(value, Mapping):
                    merge(into.setdefault(key, {}), value)
                else:
                    into[key] = value

        merge(self.objects[(kind, name)], patch)
        self.patched.append((kind, name))

    async def prune(self, namespace: str, labels: Mapping[str, str], keep) -> list[str]:
        wanted = {(m["kind"], m["metadata"]["name"]) for m in keep}
        gone = [key for key in self.objects if key[0] in PRUNED_KINDS and key not in wanted]
        for key in gone:
            del self.objects[key]
        return [f"{k}/{n}" for k, n in gone]

    async def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        self.patches.append(dict(status))
        self.status.update(status)


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []

    def info(self, reason: str, message: str) -> None:
        self.seen.append(("info", reason, message))

    def warning(self, reason: str, message: str) -> None:
        self.seen.append(("warning", reason, message))

    @property
    def reasons(self) -> list[str]:
        return [r for _, r, _ in self.seen]


class Planner:
    def __init__(self, error: Exception | None = None, devices=None) -> None:
        self.calls = 0
        self.error = error
        self.devices = devices

    async def __call__(
        self,
        spec: PlacedModelSpec,
        pools: Sequence[PoolMatch],
        model: Path,
        profile=None,
        stop: threading.Event | None = None,
    ):
        self.calls += 1
        self.profile = profile
        if self.error:
            raise self.error
        return make_plan(self.devices) if self.devices else make_plan()


NODES = [
    node_facts(make_node("g", "gpu", gpus=2, product="Tesla-T4")),
    node_facts(make_node("c", "cpu", cpu="16")),
]


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"onnx")
    return path


def path_spec(model: Path, **extra: Any) -> dict[str, Any]:
    volume = {"claimName": "c", "mountPath": str(model.parent)}
    return make_spec(model={"uri": str(model), "volume": volume, **extra})


def context(kube: FakeKube, planner: Planner, tmp_path: Path) -> Context:
    return Context(kube, planner, Defaults(), BuildOptions(), tmp_path / "cache")  # type: ignore[arg-type]


async def converge(body: dict[str, Any], nodes: Any, ctx: Context, events: Events) -> None:
    """`reconcile.converge` of `body` as the API server holds it: stored in the fake (the same
    dict, so a test's edits of it are the server's too)."""
    assert isinstance(ctx.kube, FakeKube)
    ctx.kube.placed[body["metadata"]["name"]] = body
    await reconcile.converge(body, nodes, ctx, events)


async def test_first_pass_plans_applies_and_reports(model: Path, tmp_path: Path) -> None:
    kube, planner, events = FakeKube(), Planner(), Events()
    body = make_body(path_spec(model))
    await converge(body, NODES, context(kube, planner, tmp_path), events)
    assert planner.calls == 1
    assert ("Deployment", "resnet-gpu-0") in kube.objects
    assert [p.get("phase") for p in kube.patches] == ["Profiling", "Solving", "Deploying"]
    status = kube.status
    assert status["observedGeneration"] == 1
    assert status["endpoint"] == "http://resnet-gateway.ml.svc:8000"
    assert status["placement"]["devices"] == 2 and status["placement"]["latency"] == "12.5ms"
    planned = {c["type"]: c for c in status["conditions"]}
    assert planned["Planned"]["status"] == "True" and planned["Planned"]["reason"] == "Solved"
    assert planned["Ready"]["reason"] == "Deploying"
    assert events.reasons[:4] == ["Profiling", "Solving", "Solved", "Deployed"]


async def test_current_plan_is_not_solved_again_but_readiness_follows(
    model: Path, tmp_path: Path
) -> None:
    kube, planner, events = FakeKube(), Planner(), Events()
    ctx = context(kube, planner, tmp_path)
    body = make_body(path_spec(model))
    await converge(body, NODES, ctx, events)
    body["status"] = dict(kube.status)
    for obj in kube.objects.values():
        if obj["kind"] == "Deployment":
            obj["status"] = {"availableReplicas": 1, "updatedReplicas": 1}
    await converge(body, NODES, ctx, events)
    assert planner.calls == 1
    assert kube.status["phase"] == "Ready"
    assert {c["type"]: c["status"] for c in kube.status["conditions"]}["Ready"] == "True"


async def test_spec_change_and_pool_change_replan_and_prune(model: Path, tmp_path: Path) -> None:
    kube, planner, events = FakeKube(), Planner(), Events()
    ctx = context(kube, planner, tmp_path)
    body = make_body(path_spec(model))
    await converge(body, NODES, ctx, events)
    body["status"] = dict(kube.status)
    assert stale_reason(body, kube.status["poolsFingerprint"]) is None

    more = [*NODES, node_facts(make_node("g2", "gpu", gpus=1))]
    assert stale_reason(body, "other") == "the node pools changed"
    planner.devices = (("gpu-0", "gpu"),)
    await converge(body, more, ctx, events)
    assert planner.calls == 2
    assert ("Deployment", "resnet-cpu-0") not in kube.objects  # pruned
    assert "Deployed" in events.reasons

    body["status"] = dict(kube.status)
    body["metadata"]["generation"] = 2
    assert stale_reason(body, kube.status["poolsFingerprint"]) == "the spec changed"
    await converge(body, more, ctx, events)
    # A new generation whose plan inputs are unchanged is applied without solving again.
    assert planner.calls == 2 and kube.status["observedGeneration"] == 2


@pytest.mark.parametrize(
    ("spec_of", "nodes", "error", "reason", "message"),
    [
        (
            lambda m: path_spec(m, sha256="0" * 64),
            NODES,
            None,
            "ModelDigestMismatch",
            "has SHA-256",
        ),
        (
            lambda m: make_spec(model={"uri": "http://127.0.0.1:9/m.onnx"}),
            NODES,
            None,
            "ModelUnreachable",
            "cannot be read",
        ),
        (lambda m: path_spec(m), NODES[1:], None, "NoMatchingPool", "pool 'gpu'"),
        (
            lambda m: path_spec(m),
            NODES,
            InfeasibleError("task t3 fits on no device"),
            "Infeasible",
            "t3",
        ),
    ],
)
async def test_failures_become_one_condition(
    model: Path, tmp_path: Path, spec_of, nodes, error, reason: str, message: str
) -> None:
    kube, planner, events = FakeKube(), Planner(error), Events()
    body = make_body(spec_of(model))
    await converge(body, nodes, context(kube, planner, tmp_path), events)
    assert kube.status["phase"] == "Failed"
    planned = _planned(kube)
    assert planned["status"] == "False" and planned["reason"] == reason
    assert message in planned["message"] and message in kube.status["message"]
    assert ("warning", reason, planned["message"]) in events.seen
    assert not kube.objects
    body["status"] = dict(kube.status)
    retry = stale_reason(body, kube.status["poolsFingerprint"])
    assert (retry is not None) == (reason == "ModelUnreachable")


async def test_failed_replan_keeps_serving_children(model: Path, tmp_path: Path) -> None:
    kube, planner, events = FakeKube(), Planner(), Events()
    ctx = context(kube, planner, tmp_path)
    body = make_body(path_spec(model))
    await converge(body, NODES, ctx, events)
    for obj in kube.objects.values():
        if obj["kind"] == "Deployment":
            obj["status"] = {"availableReplicas": 1, "updatedReplicas": 1}
    before = dict(kube.objects)
    body["status"] = dict(kube.status)
    body["spec"]["placement"] = {"solver": "getf"}
    body["metadata"]["generation"] = 2
    planner.error = InfeasibleError("no")
    await converge(body, NODES, ctx, events)
    assert kube.objects == before and kube.status["phase"] == "Failed"
    # The status says why the new spec is not taken, and that the old plan still serves.
    conditions = {c["type"]: c for c in kube.status["conditions"]}
    planned, ready = conditions["Planned"], conditions["Ready"]
    assert planned["reason"] == "Infeasible"
    assert planned["message"] == "no; not applied: the previous plan keeps serving"
    assert kube.status["message"] == planned["message"]
    assert (ready["status"], ready["reason"]) == ("True", "Available")
    # ... and goes on following those children while the spec stays wrong.
    body["status"] = dict(kube.status)
    del kube.objects[("Deployment", "resnet-gateway")]["status"]
    await converge(body, NODES, ctx, events)
    assert planner.calls == 2 and kube.status["phase"] == "Failed"
    ready = {c["type"]: c for c in kube.status["conditions"]}["Ready"]
    assert (ready["status"], ready["message"]) == (
        "False",
        "waiting for resnet-gateway (0/1 available)",
    )


async def test_a_first_plan_that_fails_says_so_in_ready_too(model: Path, tmp_path: Path) -> None:
    kube, planner, events = FakeKube(), Planner(InfeasibleError("no")), Events()
    await converge(make_body(path_spec(model)), NODES, context(kube, planner, tmp_path), events)
    ready = {c["type"]: c for c in kube.status["conditions"]}["Ready"]
    assert (ready["status"], ready["reason"], ready["message"]) == ("False", "PlanFailed", "no")


async def test_a_name_that_cannot_name_children_is_a_condition(model: Path, tmp_path: Path) -> None:
    """Names the CRD admitted before it said otherwise: its Services could not be named."""
    for name in ("a.b", "x" * 64):
        kube, planner, events = FakeKube(), Planner(), Events()
        body = make_body(path_spec(model))
        body["metadata"]["name"] = name
        await converge(body, NODES, context(kube, planner, tmp_path), events)
        planned = _planned(kube)
        assert (kube.status["phase"], planned["reason"]) == ("Failed", "InvalidSpec")
        assert planned["message"].startswith(f"metadata.name {name!r} cannot name")
        assert not kube.objects and planner.calls == 0


class WaitingPlanner(Planner):
    """Sets `started` when asked for a plan, and answers once `release` is set: a solve that
    runs while the test changes the PlacedModel."""

    def __init__(self, error: Exception | None = None) -> None:
        super().__init__(error)
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(
        self,
        spec: PlacedModelSpec,
        pools: Sequence[PoolMatch],
        model: Path,
        profile=None,
        stop: threading.Event | None = None,
    ):
        self.started.set()
        await self.release.wait()
        return await super().__call__(spec, pools, model, profile)


@pytest.mark.parametrize("error", [None, InfeasibleError("no room")], ids=["plan", "failure"])
@pytest.mark.parametrize("change", ["edited", "deleted", "made again"])
async def test_what_a_solve_finds_after_its_placed_model_changed_is_dropped(
    change: str,
    error: Exception | None,
    model: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="moirai_operator.reconcile")
    kube, planner, events = FakeKube(), WaitingPlanner(error), Events()
    ctx = context(kube, planner, tmp_path)
    body = make_body(path_spec(model))
    solving = asyncio.create_task(converge(body, NODES, ctx, events))
    await planner.started.wait()
    now = copy.deepcopy(body)  # the PlacedModel as the API server holds it from now on
    if change == "edited":  # where the plan looks (an edit elsewhere: see the next tests)
        now["metadata"]["generation"] = 2
        now["spec"]["placement"] = {"timeLimitSeconds": 5}
        kube.placed["resnet"] = now
    elif change == "made again":
        now["metadata"]["uid"] = "uid-2"
        kube.placed["resnet"] = now
    else:
        del kube.placed["resnet"]
    planner.release.set()
    await solving
    # Nothing of the old spec's plan (or failure) is applied, cached or reported.
    assert not kube.objects and not kube.dry_runs and not ctx.plans
    assert [p.get("phase") for p in kube.patches] == ["Profiling", "Solving"]
    assert "observedGeneration" not in kube.status
    assert events.reasons == ["Profiling", "Solving"]
    assert "dropping what planning generation 1 found" in caplog.text
    if change == "deleted":
        return
    # The pass for the PlacedModel as it is now plans and applies it.
    planner.error = None
    await converge(now, NODES, ctx, events)
    assert kube.status["observedGeneration"] == now["metadata"]["generation"]
    deployment = kube.objects[("Deployment", "resnet-gpu-0")]
    assert deployment["metadata"]["ownerReferences"][0]["uid"] == now["metadata"]["uid"]


class WatchedKube(FakeKube):
    """Sets `read` whenever the PlacedModel is read back (what the solve's watcher does)."""

    def __init__(self) -> None:
        super().__init__()
        self.read = asyncio.Event()

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        if kind == "PlacedModel":
            self.read.set()
        return await super().get(kind, namespace, name)


class StoppablePlanner(WaitingPlanner):
    """A solve that runs until its stop is set (as the solvers do: its best plan, or the
    `StoppedError` of one that had none), or until `release`."""

    def __init__(self, error: Exception | None = None) -> None:
        super().__init__(error)
        self.stopped: bool | None = None

    async def __call__(
        self,
        spec: PlacedModelSpec,
        pools: Sequence[PoolMatch],
        model: Path,
        profile=None,
        stop: threading.Event | None = None,
    ):
        assert stop is not None
        self.started.set()
        while not (stop.is_set() or self.release.is_set()):  # stop is set on another task
            await asyncio.sleep(0.005)
        self.stopped = stop.is_set()
        return await Planner.__call__(self, spec, pools, model, profile)


@pytest.mark.parametrize(
    "error", [None, StoppedError("auto: stopped before it found a placement")], ids=["plan", "none"]
)
@pytest.mark.parametrize("change", ["edited", "deleted", "made again"])
@pytest.mark.timeout(60)  # a hang guard: only the stop ends the planner's solve
async def test_a_solve_is_stopped_when_its_placed_model_changes_where_the_plan_looks(
    change: str, error: Exception | None, model: Path, tmp_path: Path
) -> None:
    """The solve ends early (its stop is set) instead of running to its time limit, and what
    it returns is dropped as any superseded result."""
    kube, planner, events = WatchedKube(), StoppablePlanner(error), Events()
    ctx = dataclasses.replace(context(kube, planner, tmp_path), supersede_check_s=0.01)
    body = make_body(path_spec(model))
    solving = asyncio.create_task(converge(body, NODES, ctx, events))
    await planner.started.wait()
    now = copy.deepcopy(body)
    if change == "edited":
        now["metadata"]["generation"] = 2
        now["spec"]["pools"] = now["spec"]["pools"][:1]  # the GPUs only
        kube.placed["resnet"] = now
    elif change == "made again":
        now["metadata"]["uid"] = "uid-2"
        kube.placed["resnet"] = now
    else:
        del kube.placed["resnet"]
    await solving  # no release: only the stop ends this solve
    assert planner.stopped is True
    assert not kube.objects and not kube.dry_runs and not ctx.plans
    assert [p.get("phase") for p in kube.patches] == ["Profiling", "Solving"]


async def test_an_edit_the_plan_does_not_depend_on_lets_the_solve_end_and_reuses_its_plan(
    model: Path, tmp_path: Path
) -> None:
    """More lanes while the solve runs: it is not stopped, its plan is dropped for generation
    1 but cached, and generation 2's pass applies it without solving again."""
    kube, planner, events = WatchedKube(), StoppablePlanner(), Events()
    ctx = dataclasses.replace(context(kube, planner, tmp_path), supersede_check_s=0.01)
    body = make_body(path_spec(model))
    solving = asyncio.create_task(converge(body, NODES, ctx, events))
    await planner.started.wait()
    now = copy.deepcopy(body)
    now["metadata"]["generation"] = 2
    now["spec"]["serving"] = {"replicas": 2}
    kube.placed["resnet"] = now
    for _ in range(2):  # the watcher has read the edit back, and gone on watching
        kube.read.clear()
        await kube.read.wait()
    planner.release.set()
    await solving
    assert planner.stopped is False and planner.calls == 1
    assert not kube.objects and "observedGeneration" not in kube.status
    await converge(now, NODES, ctx, events)
    assert planner.calls == 1  # the plan of the solve above
    assert kube.status["observedGeneration"] == 2 and kube.status["replicas"] == 2


class RefusingKube(FakeKube):
    """Refuses to apply objects of one kind as an API server refuses an invalid one."""

    def __init__(self, kind: str, status: int = 422) -> None:
        super().__init__()
        self.kind, self.code = kind, status

    async def apply(self, manifest: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
        if manifest["kind"] == self.kind:
            name = manifest["metadata"]["name"]
            error = ApiException(status=self.code, reason="Unprocessable Entity")
            error.body = json.dumps(
                {"kind": "Status", "message": f'{self.kind} "{name}" is invalid: spec: bad\nvalue'}
            ).encode()
            raise error
        return await super().apply(manifest, dry_run)


async def test_a_child_the_api_server_refuses_is_a_condition_not_a_loop(
    model: Path, tmp_path: Path
) -> None:
    kube, planner, events = RefusingKube("Service"), Planner(), Events()
    body = make_body(path_spec(model))
    await converge(body, NODES, context(kube, planner, tmp_path), events)
    planned = _planned(kube)
    assert (kube.status["phase"], planned["reason"]) == ("Failed", "ChildRejected")
    assert planned["message"] == (
        'the API server refused Service resnet-gpu-0: Service "resnet-gpu-0" is invalid: '
        "spec: bad value; change the spec, or the admission policy that refuses it (retried at "
        "every resync)"
    )
    # Retried (a policy or the operator's permissions may change), without solving again.
    body["status"] = dict(kube.status)
    assert stale_reason(body, kube.status["poolsFingerprint"]) == "retrying after ChildRejected"
    kube.kind = "None"
    await converge(body, NODES, context(kube, planner, tmp_path), events)
    assert kube.status["phase"] == "Deploying"
    # Other API errors (the server overloaded, gone) are kopf's to retry.
    with pytest.raises(ApiException):
        await converge(
            make_body(path_spec(model)),
            NODES,
            context(RefusingKube("Service", 503), planner, tmp_path),
            events,
        )


class Profiler:
    def __init__(self) -> None:
        self.asked: list[str] = []

    async def profile(self, owner, spec, pools):
        self.asked = [m.spec.name for m in pools]
        return {"format": "moirai.profile/v1", "devices": {}}


async def test_measured_profiling_asks_the_profiler_first(model: Path, tmp_path: Path) -> None:
    kube, planner, events = FakeKube(), Planner(), Events()
    body = make_body(path_spec(model, **{}) | {"profiling": {"mode": "measured"}})
    ctx = context(kube, planner, tmp_path)
    await converge(body, NODES, ctx, events)  # no profiler configured
    planned = _planned(kube)
    assert (
        planned["reason"] == "ProfilingFailed" and "use spec.profiling.mode" in planned["message"]
    )

    profiler = Profiler()
    ctx = Context(kube, planner, Defaults(), BuildOptions(), tmp_path / "c", profiler)  # type: ignore[arg-type]
    body["metadata"]["generation"] = 2
    body["status"] = dict(kube.status)
    await converge(body, NODES, ctx, events)
    assert profiler.asked == ["gpu", "cpu"]
    assert planner.profile == {"format": "moirai.profile/v1", "devices": {}}
    assert kube.status["phase"] == "Deploying"


async def test_lanes_change_without_solving_again(model: Path, tmp_path: Path) -> None:
    kube, planner, events = FakeKube(), Planner(), Events()
    ctx = context(kube, planner, tmp_path)
    body = make_body(path_spec(model))
    await converge(body, NODES, ctx, events)
    assert kube.status["replicas"] == 1
    assert kube.status["selector"] == (
        "app.kubernetes.io/component=stage-server,app.kubernetes.io/managed-by=moirai-operator,"
        "moirai.dev/placedmodel=resnet"
    )
    # What an autoscaler does: spec.serving.replicas 1 -> 3 -> 2, a new generation each time.
    for generation, lanes in ((2, 3), (3, 2)):
        body["status"] = dict(kube.status)
        body["spec"]["serving"] = {"replicas": lanes}
        body["metadata"]["generation"] = generation
        await converge(body, NODES, ctx, events)
        assert planner.calls == 1  # the plan does not depend on the lanes
        assert kube.status["replicas"] == lanes
        stage_servers = {
            name for kind, name in kube.objects if kind == "Deployment" and name != "resnet-gateway"
        }
        assert len(stage_servers) == 2 * lanes  # two devices per lane; lane 2 pruned at the end
    # A change the plan depends on is solved again.
    body["status"] = dict(kube.status)
    body["spec"]["placement"] = {"solver": "getf"}
    body["metadata"]["generation"] = 4
    await converge(body, NODES, ctx, events)
    assert planner.calls == 2


def _planned(kube: FakeKube) -> dict[str, Any]:
    """The PlacedModel's Planned condition as last written."""
    return {c["type"]: c for c in kube.status["conditions"]}["Planned"]


def _secret(name: str, **data: str) -> dict[str, Any]:
    encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    return {"kind": "Secret", "metadata": {"name": name, "namespace": "ml"}, "data": encoded}


async def test_the_chain_secret_is_made_once_and_kept(model: Path, tmp_path: Path) -> None:
    kube, planner, events = FakeKube(), Planner(), Events()
    ctx = context(kube, planner, tmp_path)
    body = make_body(path_spec(model))
    await converge(body, NODES, ctx, events)
    secret = kube.objects[("Secret", "resnet-chain-token")]
    token = base64.b64decode(secret["data"]["token"]).decode()
    assert len(token) >= 40  # secrets.token_urlsafe(32)
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    # Made before the pods that read it; a new plan, a new spec, lanes: the same token.
    assert kube.applied.index(("Secret", "resnet-chain-token")) < kube.applied.index(
        ("Deployment", "resnet-gpu-0")
    )
    for generation, serving in ((2, {"replicas": 2}), (3, {"replicas": 1, "port": 9000})):
        body["status"] = dict(kube.status)
        body["spec"]["serving"] = serving
        body["metadata"]["generation"] = generation
        await converge(body, NODES, ctx, events)
        assert kube.objects[("Secret", "resnet-chain-token")] == secret
    assert kube.applied.count(("Secret", "resnet-chain-token")) == 1
    # The token is read by reference only: in no other object, the status or an Event.
    others = [o for k, o in kube.objects.items() if k != ("Secret", "resnet-chain-token")]
    assert token not in json.dumps([others, kube.patches, events.seen])
    # Another PlacedModel gets another token.
    other = FakeKube()
    await converge(make_body(path_spec(model)), NODES, context(other, Planner(), tmp_path), events)
    assert other.objects[("Secret", "resnet-chain-token")]["data"] != secret["data"]


async def test_a_missing_tls_secret_is_a_condition_until_it_exists(
    model: Path, tmp_path: Path
) -> None:
    kube, planner, events = FakeKube(), Planner(), Events()
    ctx = context(kube, planner, tmp_path)
    body = make_body(path_spec(model) | {"serving": {"tlsSecret": "endpoint-tls"}})
    await converge(body, NODES, ctx, events)
    planned = _planned(kube)
    assert planned["reason"] == "TLSSecretMissing" and planner.calls == 0
    create = "kubectl create secret tls endpoint-tls -n ml --cert=CERT --key=KEY"
    assert create in planned["message"]
    await kube.apply(_secret("endpoint-tls", **{"tls.crt": "CERT"}))
    body["status"] = dict(kube.status)
    await converge(body, NODES, ctx, events)
    planned = _planned(kube)
    assert planned["reason"] == "TLSSecretMissing"
    assert "no (or an empty) 'tls.key'" in planned["message"]
    await kube.apply(_secret("endpoint-tls", **{"tls.crt": "CERT", "tls.key": "KEY"}))
    body["status"] = dict(kube.status)
    await converge(body, NODES, ctx, events)
    assert kube.status["phase"] == "Deploying"
    gateway = kube.objects[("Deployment", "resnet-gateway")]["spec"]["template"]["spec"]
    assert {"name": "tls", "secret": {"secretName": "endpoint-tls"}} in gateway["volumes"]


async def test_a_missing_endpoint_token_secret_is_a_condition_until_it_exists(
    model: Path, tmp_path: Path
) -> None:
    kube, planner, events = FakeKube(), Planner(), Events()
    ctx = context(kube, planner, tmp_path)
    body = make_body(path_spec(model) | {"serving": {"authTokenSecret": "clients"}})
    await converge(body, NODES, ctx, events)
    assert kube.status["phase"] == "Failed" and planner.calls == 0
    planned = _planned(kube)
    assert planned["reason"] == "AuthTokenSecretMissing"
    assert planned["message"].startswith(
        "spec.serving.authTokenSecret: Secret 'clients' not found in namespace ml: create it "
        "(`kubectl create secret generic clients -n ml --from-literal=token=<token>`)"
    )
    assert "\n" not in planned["message"] and not kube.objects

    # A Secret without the key: retried (no spec change needed), and says what is missing.
    await kube.apply(_secret("clients", other="x"))
    body["status"] = dict(kube.status)
    assert stale_reason(body, kube.status["poolsFingerprint"]) is not None
    await converge(body, NODES, ctx, events)
    planned = _planned(kube)
    assert planned["reason"] == "AuthTokenSecretMissing"
    assert "no (or an empty) key 'token'" in planned["message"]

    await kube.apply(_secret("clients", token="let-me-in"))
    body["status"] = dict(kube.status)
    await converge(body, NODES, ctx, events)
    assert kube.status["phase"] == "Deploying"
    gateway = kube.objects[("Deployment", "resnet-gateway")]["spec"]["template"]["spec"]
    env = {e["name"]: e for e in gateway["containers"][0]["env"]}
    assert env["MOIRAI_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "clients",
        "key": "token",
    }
    assert "let-me-in" not in json.dumps([gateway, kube.patches, events.seen])


def _rolls(kube: FakeKube) -> dict[str, str]:
    """The secrets digest of each Deployment's pod template, by name."""
    return {
        name: o["spec"]["template"]["metadata"]["annotations"]["moirai.dev/secrets-digest"]
        for (kind, name), o in kube.objects.items()
        if kind == "Deployment"
    }


async def test_a_deleted_chain_secret_is_made_again_and_rolls_every_pod(
    model: Path, tmp_path: Path
) -> None:
    kube, planner, events = FakeKube(), Planner(), Events()
    ctx = context(kube, planner, tmp_path)
    body = make_body(path_spec(model))
    await converge(body, NODES, ctx, events)
    before = _rolls(kube)
    assert set(before) == {"resnet-gpu-0", "resnet-cpu-0", "resnet-gateway"}
    assert [s["name"] for s in kube.status["secrets"]] == ["resnet-chain-token"]
    # Nothing changed: nothing applied again.
    applied = len(kube.applied)
    body["status"] = dict(kube.status)
    await converge(body, NODES, ctx, events)
    assert len(kube.applied) == applied
    # Deleted while the plan is current: made again at the next pass, with a new token that
    # rolls the stage servers and the gateway, without solving again.
    old = kube.objects.pop(("Secret", "resnet-chain-token"))
    await converge(body, NODES, ctx, events)
    new = kube.objects[("Secret", "resnet-chain-token")]
    assert new["data"]["token"] != old["data"]["token"]
    after = _rolls(kube)
    assert all(after[name] != before[name] for name in before)
    assert planner.calls == 1
    # Then steady again.
    applied = len(kube.applied)
    body["status"] = dict(kube.status)
    await converge(body, NODES, ctx, events)
    assert len(kube.applied) == applied


ENDPOINT_SECRETS = {"authTokenSecret": "clients", "tlsSecret": "endpoint-tls"}


@dataclass
class _Served:
    """A PlacedModel served with an endpoint token and certificate
    (`_served_with_endpoint_secrets`)."""

    kube: FakeKube
    planner: Planner
    events: Events
    ctx: Context
    body: dict[str, Any]

    async def again(self) -> dict[str, str]:
        """Converge once more from the status last written; each Deployment's rolls."""
        self.body["status"] = dict(self.kube.status)
        await converge(self.body, NODES, self.ctx, self.events)
        return _rolls(self.kube)


async def _served_with_endpoint_secrets(model: Path, tmp_path: Path) -> _Served:
    kube, planner, events = FakeKube(), Planner(), Events()
    await kube.apply(_secret("clients", token="let-me-in"))
    await kube.apply(_secret("endpoint-tls", **{"tls.crt": "CERT", "tls.key": "KEY"}))
    body = make_body(path_spec(model) | {"serving": dict(ENDPOINT_SECRETS)})
    return _Served(kube, planner, events, context(kube, planner, tmp_path), body)


async def test_a_changed_endpoint_secret_rolls_the_gateway_only(
    model: Path, tmp_path: Path
) -> None:
    served = await _served_with_endpoint_secrets(model, tmp_path)
    kube, planner, events, again = served.kube, served.planner, served.events, served.again

    first = await again()
    assert {s["name"] for s in kube.status["secrets"]} == {
        "resnet-chain-token",
        "clients",
        "endpoint-tls",
    }
    # A key the pods do not read: nothing rolls. A new token, then a new certificate: the
    # gateway rolls, the stage servers do not.
    await kube.apply(_secret("clients", token="let-me-in", note="rotated monthly"))
    assert await again() == first
    await kube.apply(_secret("clients", token="open-sesame"))
    second = await again()
    assert second["resnet-gateway"] != first["resnet-gateway"]
    assert {k: v for k, v in second.items() if k != "resnet-gateway"} == {
        k: v for k, v in first.items() if k != "resnet-gateway"
    }
    await kube.apply(_secret("endpoint-tls", **{"tls.crt": "CERT2", "tls.key": "KEY2"}))
    third = await again()
    assert third["resnet-gateway"] not in (first["resnet-gateway"], second["resnet-gateway"])
    assert planner.calls == 1
    # No digest reveals a token: they are keyed with the chain token.
    plain = [hashlib.sha256(t.encode()).hexdigest()[:16] for t in ("let-me-in", "open-sesame")]
    written = json.dumps([list(kube.objects.values()), kube.patches, events.seen])
    assert not any(p in written for p in plain) and "open-sesame" not in written
    # Deleted: the condition says so, and the running children stay.
    del kube.objects[("Secret", "clients")]
    assert await again() == third
    assert _planned(kube)["reason"] == "AuthTokenSecretMissing"


def test_the_gateway_s_trust_root_is_the_issuer_s_else_the_certificate_never_the_key() -> None:
    def data(**keys: str) -> dict[str, str]:
        return {k: base64.b64encode(v.encode()).decode() for k, v in keys.items()}

    assert gateway_trust_root(data(**{"tls.crt": "LEAF", "tls.key": "KEY"})) == "LEAF"
    both = data(**{"tls.crt": "LEAF", "tls.key": "KEY", "ca.crt": "ISSUER"})
    assert gateway_trust_root(both) == "ISSUER"
    assert gateway_trust_root({}) is None


async def test_the_gateway_s_trust_root_is_published_and_kept_up_to_date(
    model: Path, tmp_path: Path
) -> None:
    """status.gatewayCA, for the shared endpoint (which may not read Secrets): the TLS Secret's
    tls.crt, then its ca.crt once it has one (written at the next pass, rolling no pod: the
    gateway does not read it); a new certificate is published as it rolls the gateway; gone
    when the PlacedModel drops TLS. No key is ever in the status."""
    kube, planner, events = FakeKube(), Planner(), Events()
    ctx = context(kube, planner, tmp_path)
    await kube.apply(_secret("endpoint-tls", **{"tls.crt": "CERT", "tls.key": "KEY"}))
    body = make_body(path_spec(model) | {"serving": {"tlsSecret": "endpoint-tls"}})

    async def again() -> dict[str, str]:
        body["status"] = dict(kube.status)
        await converge(body, NODES, ctx, events)
        return _rolls(kube)

    first = await again()
    assert kube.status["gatewayCA"] == "CERT"
    applied = len(kube.applied)
    assert await again() == first and len(kube.applied) == applied  # steady: nothing applied
    ca = {"tls.crt": "CERT", "tls.key": "KEY", "ca.crt": "ISSUER"}
    await kube.apply(_secret("endpoint-tls", **ca))
    assert await again() == first
    assert kube.status["gatewayCA"] == "ISSUER"
    await kube.apply(_secret("endpoint-tls", **(ca | {"tls.crt": "CERT2", "ca.crt": "ISSUER2"})))
    assert (await again())["resnet-gateway"] != first["resnet-gateway"]
    assert kube.status["gatewayCA"] == "ISSUER2"
    assert planner.calls == 1
    assert not any("KEY" in json.dumps(p) for p in kube.patches)
    body["spec"]["serving"] = {}
    body["metadata"]["generation"] = 2
    await again()
    assert kube.status["endpoint"].startswith("http://") and kube.status["gatewayCA"] is None


async def test_the_operator_s_default_endpoint_secrets_apply_and_a_spec_s_own_wins(
    model: Path, tmp_path: Path
) -> None:
    kube, planner, events = FakeKube(), Planner(), Events()
    defaults = Defaults(auth_token_secret="clients", tls_secret="endpoint-tls")
    ctx = Context(kube, planner, defaults, BuildOptions(), tmp_path / "cache")  # type: ignore[arg-type]
    body = make_body(path_spec(model))
    await converge(body, NODES, ctx, events)
    assert _planned(kube)["message"].startswith(
        "the operator's default spec.serving.authTokenSecret (chart value "
        "serving.authTokenSecret): Secret 'clients' not found in namespace ml: create it "
        "(`kubectl create secret generic clients -n ml --from-literal=token=<token>`) or name "
        "another in spec.serving.authTokenSecret"
    )
    await kube.apply(_secret("clients", token="let-me-in"))
    await kube.apply(_secret("endpoint-tls", **{"tls.crt": "CERT", "tls.key": "KEY"}))
    await kube.apply(_secret("mine", token="mine"))
    body["status"] = dict(kube.status)
    await converge(body, NODES, ctx, events)
    assert kube.status["endpoint"].startswith("https://")

    def gateway() -> dict[str, Any]:
        pod = kube.objects[("Deployment", "resnet-gateway")]["spec"]["template"]["spec"]
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        tls = [v["secret"]["secretName"] for v in pod["volumes"] if v["name"] == "tls"]
        return {"token": env["MOIRAI_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"], "tls": tls}

    assert gateway() == {"token": "clients", "tls": ["endpoint-tls"]}
    # The PlacedModel's own Secret wins over the default.
    body["status"] = dict(kube.status)
    body["spec"]["serving"] = {"authTokenSecret": "mine"}
    body["metadata"]["generation"] = 2
    await converge(body, NODES, ctx, events)
    assert gateway() == {"token": "mine", "tls": ["endpoint-tls"]}


def test_readiness_says_why_a_deployment_is_stuck() -> None:
    """Its controller's reasons, where the message said only '(0/1 available)' for ever: pods a
    quota forbids, a rollout past its deadline (pods that never schedule)."""
    from moirai_operator.status import readiness

    def deployment(name: str, *conditions: dict[str, str]) -> dict[str, Any]:
        return {
            "metadata": {"name": name, "generation": 1},
            "spec": {"replicas": 1},
            "status": {"observedGeneration": 1, "conditions": list(conditions)},
        }

    quota = {
        "type": "ReplicaFailure",
        "status": "True",
        "reason": "FailedCreate",
        "message": 'pods "m-gateway-1" is forbidden:\nexceeded quota: q, requested: cpu=500m',
    }
    deadline = {
        "type": "Progressing",
        "status": "False",
        "reason": "ProgressDeadlineExceeded",
        "message": 'ReplicaSet "m-cpu-0-7d" has timed out progressing.',
    }
    progressing = {"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated"}
    ready, message = readiness(
        [deployment("m-gateway", quota), deployment("m-cpu-0", deadline, progressing)]
    )
    assert not ready and message == (
        'waiting for m-cpu-0 (0/1 available; ProgressDeadlineExceeded: ReplicaSet "m-cpu-0-7d" '
        "has timed out progressing.), m-gateway (0/1 available; FailedCreate: pods "
        '"m-gateway-1" is forbidden: exceeded quota: q, requested: cpu=500m)'
    )
    assert readiness([deployment("m-cpu-0", progressing)])[1] == (
        "waiting for m-cpu-0 (0/1 available)"
    )


class AdmittingKube(FakeKube):
    """Refuses (403, as a quota does) what `refuse(manifest, dry_run)` names; the rest is
    stored as FakeKube stores it."""

    def __init__(self) -> None:
        super().__init__()
        self.refuse = lambda manifest, dry_run: False

    async def apply(self, manifest: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
        if self.refuse(manifest, dry_run):
            error = ApiException(status=403, reason="Forbidden")
            error.body = json.dumps({"message": "exceeded quota: q"}).encode()
            raise error
        return await super().apply(manifest, dry_run)


async def _serving_two_devices(model: Path, tmp_path: Path):
    kube, planner, events = AdmittingKube(), Planner(), Events()
    ctx = context(kube, planner, tmp_path)
    body = make_body(path_spec(model))
    await converge(body, NODES, ctx, events)
    body["status"] = dict(kube.status)
    body["metadata"]["generation"] = 2
    body["spec"]["serving"] = {"replicas": 2}  # a second lane: two Services, two Deployments
    return kube, ctx, events, body


async def test_a_re_plan_a_dry_run_refuses_writes_nothing(model: Path, tmp_path: Path) -> None:
    kube, ctx, events, body = await _serving_two_devices(model, tmp_path)
    before = copy.deepcopy(kube.objects)
    kube.refuse = lambda m, dry_run: m["metadata"]["name"] == "resnet-cpu-0-l1"
    await converge(body, NODES, ctx, events)
    assert kube.objects == before
    planned = _planned(kube)
    assert planned["reason"] == "ChildRejected"
    assert planned["message"] == (
        "the API server refused Service resnet-cpu-0-l1: exceeded quota: q; lift the quota, "
        "admission policy or RBAC rule that forbids it, or change the spec (retried at every "
        "resync); not applied: the previous plan keeps serving"
    )


async def test_a_re_plan_refused_as_it_makes_its_new_children_removes_them(
    model: Path, tmp_path: Path
) -> None:
    """Each new Service passes its dry run alone, not both together (a quota): the first one
    made, and the Deployment after it (made with no replicas), are deleted; nothing the
    previous plan serves with was touched."""
    kube, ctx, events, body = await _serving_two_devices(model, tmp_path)
    before = copy.deepcopy(kube.objects)
    applied = len(kube.applied)
    kube.refuse = lambda m, dry_run: not dry_run and m["metadata"]["name"] == "resnet-cpu-0-l1"
    await converge(body, NODES, ctx, events)
    assert kube.objects == before
    made = kube.applied[applied:]
    assert made == [("Service", "resnet-gpu-0-l1"), ("Deployment", "resnet-gpu-0-l1")]
    assert kube.deleted == made[::-1]
    assert _planned(kube)["message"].startswith(
        "the API server refused Service resnet-cpu-0-l1: exceeded quota: q;"
    )
    assert kube.status["message"].endswith("; not applied: the previous plan keeps serving")
    # Lifted: taken, every new Deployment with its replica.
    kube.refuse = lambda m, dry_run: False
    body["status"] = dict(kube.status)
    await converge(body, NODES, ctx, events)
    assert kube.status["phase"] == "Deploying"
    lanes = [o for (k, n), o in kube.objects.items() if k == "Deployment" and n.endswith("-l1")]
    assert len(lanes) == 2 and all(o["spec"]["replicas"] == 1 for o in lanes)


async def test_a_refusal_after_the_shared_children_were_updated_says_so(
    model: Path, tmp_path: Path
) -> None:
    """Not sound, and said: a refusal that its dry run did not foresee, of a child both plans
    share, comes after the children before it were updated; those made new are removed, the
    updated ones are named, and the status does not claim the previous plan serves as it was."""
    kube, ctx, events, body = await _serving_two_devices(model, tmp_path)
    kube.refuse = lambda m, dry_run: not dry_run and m["metadata"]["name"] == "resnet-gateway-chain"
    await converge(body, NODES, ctx, events)
    assert not any(name.endswith("-l1") for _, name in kube.objects)
    message = _planned(kube)["message"]
    assert message.startswith("the API server refused Service resnet-gateway-chain: exceeded quota")
    assert (
        "; applied before the refusal and not undone: ConfigMap resnet-plan, NetworkPolicy "
        "resnet-stages, NetworkPolicy resnet-gateway, Service resnet-gpu-0, Deployment "
        "resnet-gpu-0, Service resnet-cpu-0, Deployment resnet-cpu-0, Service resnet-gateway; "
    ) in message
    assert message.endswith(
        "; the rest is not applied: the previous plan's other children keep serving"
    )


async def test_secrets_still_roll_the_previous_plan_while_a_new_spec_fails(
    model: Path, tmp_path: Path
) -> None:
    served = await _served_with_endpoint_secrets(model, tmp_path)
    kube, planner, body, again = served.kube, served.planner, served.body, served.again
    serving = dict(ENDPOINT_SECRETS)

    first = await again()
    # A bad edit (a Secret the previous plan's pods do not read, a field the spec refuses).
    body["spec"]["serving"] = {**serving, "authTokenSecret": "nowhere", "port": 50052}
    body["metadata"]["generation"] = 2
    assert await again() == first
    failed = dict(kube.status)
    assert failed["phase"] == "Failed" and _planned(kube)["reason"] == "InvalidSpec"
    assert kube.patched == []
    # A new endpoint token: the gateway rolls, nothing else; then steady.
    await kube.apply(_secret("clients", token="open-sesame"))
    second = await again()
    assert second["resnet-gateway"] != first["resnet-gateway"]
    assert {k: v for k, v in second.items() if k != "resnet-gateway"} == {
        k: v for k, v in first.items() if k != "resnet-gateway"
    }
    assert kube.patched == [("Deployment", "resnet-gateway")]
    assert kube.status["message"] == failed["message"] and kube.status["phase"] == "Failed"
    assert await again() == second and len(kube.patched) == 1
    # A new certificate: the gateway rolls, and its trust root is published.
    await kube.apply(_secret("endpoint-tls", **{"tls.crt": "CERT2", "tls.key": "KEY2"}))
    third = await again()
    assert third["resnet-gateway"] != second["resnet-gateway"]
    assert kube.status["gatewayCA"] == "CERT2"
    # The chain Secret deleted: made again, and every pod rolls.
    del kube.objects[("Secret", "resnet-chain-token")]
    fourth = await again()
    assert ("Secret", "resnet-chain-token") in kube.objects
    assert all(fourth[name] != third[name] for name in third)
    # What a build would write: the spec fixed (its Secrets the same), nothing rolls again.
    body["spec"]["serving"] = serving
    body["metadata"]["generation"] = 3
    assert await again() == fourth and kube.status["phase"] == "Deploying"
    assert planner.calls == 1
