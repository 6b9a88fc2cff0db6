"""The operator against a real control plane: kwok node pools, the PlacedModel lifecycle.

One operator (kopf's `KopfRunner`, in this process, as the chart runs it: standalone, all
namespaces) serves every test of the module; each test works in its own namespace with its own
node pools (named after the namespace, since Nodes are cluster-wide). The models are small MLPs
served over HTTP from 127.0.0.1, the way a model store would serve them. The restart test runs
its own operators.
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from kopf.testing import KopfRunner
from kubernetes.client.exceptions import ApiException
from test_operator_harness import (
    GROUP,
    PLURAL,
    VERSION,
    Cluster,
    free_port,
    install_crd,
    models_for,
    placed_model,
    running_operator,
    wait_until,
)


@pytest.fixture(scope="module")
def crd(scheduling_control_plane) -> None:
    install_crd(scheduling_control_plane)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with models_for(tmp_path_factory.mktemp("models")) as served:
        yield served


LIVENESS_PORT = free_port()


@pytest.fixture(scope="module")
def operator(scheduling_control_plane, crd, tmp_path_factory) -> Iterator[KopfRunner]:
    cache = tmp_path_factory.mktemp("cache")
    with running_operator(scheduling_control_plane, cache, liveness_port=LIVENESS_PORT) as runner:
        yield runner


@pytest.fixture
def cluster(kube_api, scheduling_control_plane, namespace) -> Cluster:
    return Cluster(kube_api, scheduling_control_plane, namespace)


def two_pools(cluster: Cluster, make_node_pool) -> tuple[str, str]:
    gpu, cpu = f"{cluster.ns}-gpu", f"{cluster.ns}-cpu"
    make_node_pool(gpu, count=2, gpus=1, labels={"nvidia.com/gpu.product": "Tesla-T4"})
    make_node_pool(cpu, count=1, cpu="16", memory="64Gi")
    return gpu, cpu


def spec_for(models: dict[str, Any], gpu: str, cpu: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": {"uri": models["mlp"], "sha256": models["mlp_sha256"]},
        "pools": [
            {"name": gpu, "kind": "gpu", "maxDevices": 2},
            {"name": cpu, "kind": "cpu", "threadsPerDevice": 4, "maxDevices": 2},
        ],
        **extra,
    }


def test_placed_model_becomes_ready_on_its_pools(operator, cluster, make_node_pool, models):
    gpu, cpu = two_pools(cluster, make_node_pool)
    cluster.apply("mlp", spec_for(models, gpu, cpu))
    status = cluster.wait_phase("mlp", "Ready")

    placement = status["placement"]
    assert placement["devices"] == len(placement["assignment"]) >= 1
    assert placement["latencyMs"] > 0 and placement["solver"]
    assert status["endpoint"] == f"http://mlp-gateway.{cluster.ns}.svc:8000"
    assert cluster.condition("mlp", "Planned")["status"] == "True"
    assert cluster.condition("mlp", "Ready")["status"] == "True"

    deployments = cluster.deployments("mlp")
    assert set(deployments) == {a["deployment"] for a in placement["assignment"]} | {"mlp-gateway"}
    nodes = {n.metadata.name: n for n in cluster.core.list_node().items}
    for a in placement["assignment"]:
        d = deployments[a["deployment"]]
        pool = gpu if a["kind"] == "gpu" else cpu
        assert d.spec.template.spec.node_selector == {"moirai.dev/pool": pool}
        placed_on = cluster.pods_nodes(a["deployment"])
        assert placed_on and all(
            nodes[n].metadata.labels["moirai.dev/pool"] == pool for n in placed_on
        )
        requests = d.spec.template.spec.containers[0].resources.requests
        assert ("nvidia.com/gpu" in requests) == (a["kind"] == "gpu")
    services = {s.metadata.name for s in cluster.core.list_namespaced_service(cluster.ns).items}
    assert services == set(deployments) | {"mlp-gateway-chain"}
    plan = cluster.core.read_namespaced_config_map("mlp-plan", cluster.ns).data
    gateway = json.loads(plan["plan.json"])["endpoints"]["gateway"]
    assert gateway.startswith("mlp-gateway-chain.")  # stages push outputs to the chain port

    table = cluster.plane.kubectl("get", "pm", "-n", cluster.ns)
    header, row = table.strip().splitlines()
    assert header.split() == ["NAME", "PHASE", "DEVICES", "LATENCY", "ENDPOINT", "AGE"]
    assert row.split()[:5] == [
        "mlp",
        "Ready",
        str(placement["devices"]),
        placement["latency"],
        status["endpoint"],
    ]
    events = cluster.core.list_namespaced_event(cluster.ns).items
    reasons = {e.reason for e in events if e.involved_object.name == "mlp"}
    assert {"Profiling", "Solving", "Solved", "Deployed"} <= reasons


def test_spec_update_replans_and_prunes(operator, cluster, make_node_pool, models):
    gpu, cpu = two_pools(cluster, make_node_pool)
    cluster.apply("mlp", spec_for(models, gpu, cpu))
    cluster.wait_phase("mlp", "Ready")
    cluster.apply(
        "mlp",
        {**spec_for(models, gpu, cpu), "pools": [{"name": cpu, "kind": "cpu", "maxDevices": 1}]},
    )
    status = cluster.wait_phase("mlp", "Ready")
    assert status["observedGeneration"] == 2
    assert {a["device"] for a in status["placement"]["assignment"]} == {f"{cpu}-0"}
    assert set(cluster.deployments("mlp")) == {f"mlp-{cpu}-0", "mlp-gateway"}


def test_pool_change_replans(operator, cluster, make_node_pool, models):
    cpu = f"{cluster.ns}-cpu"
    make_node_pool(cpu, count=1, cpu="8")
    spec = {
        "model": {"uri": models["mlp"]},
        "pools": [{"name": cpu, "kind": "cpu", "threadsPerDevice": 2, "maxDevices": 2}],
    }
    cluster.apply("mlp", spec)
    first = cluster.wait_phase("mlp", "Ready")["poolsFingerprint"]
    more = f"{cluster.ns}-more"
    make_node_pool(more, count=2, cpu="8", labels={"moirai.dev/pool": cpu})
    wait_until(
        "a re-plan after new nodes joined the pool",
        lambda: (
            (s := cluster.status("mlp")).get("poolsFingerprint") != first
            and s.get("phase") == "Ready"
        ),
    )
    # Cordoning every node leaves no schedulable node: a Failed condition says so.
    for node in cluster.core.list_node(label_selector=f"moirai.dev/pool={cpu}").items:
        cluster.core.patch_node(node.metadata.name, {"spec": {"unschedulable": True}})
    cluster.wait_phase("mlp", "Failed")
    planned = cluster.condition("mlp", "Planned")
    assert planned["reason"] == "NoMatchingPool" and "cordoned or NotReady" in planned["message"]


def _env(deployment) -> dict[str, Any]:
    (container,) = deployment.spec.template.spec.containers
    return {e.name: e for e in container.env or []}


def test_the_chain_token_is_a_secret_made_once_and_read_by_reference(
    operator, cluster, make_node_pool, models
):
    gpu, cpu = two_pools(cluster, make_node_pool)
    cluster.apply("mlp", spec_for(models, gpu, cpu))
    cluster.wait_phase("mlp", "Ready")
    secret = cluster.secret("mlp-chain-token")
    token = base64.b64decode(secret.data["token"]).decode()
    assert len(token) >= 40
    (owner,) = secret.metadata.owner_references
    assert (owner.kind, owner.uid) == ("PlacedModel", cluster.pm("mlp")["metadata"]["uid"])
    deployments = cluster.deployments("mlp")
    for d in deployments.values():
        ref = _env(d)["MOIRAI_CHAIN_TOKEN"].value_from.secret_key_ref
        assert (ref.name, ref.key) == ("mlp-chain-token", "token")
    # Another plan and another lane later, the same Secret and token: no running pod is cut off.
    cluster.apply("mlp", spec_for(models, gpu, cpu, serving={"replicas": 2}))
    assert cluster.wait_phase("mlp", "Ready")["observedGeneration"] == 2
    kept = cluster.secret("mlp-chain-token")
    assert kept.metadata.uid == secret.metadata.uid and kept.data == secret.data
    # The token is in no Deployment, the status, an annotation or an Event.
    seen = [
        cluster.api.sanitize_for_serialization(d)
        for d in cluster.apps.list_namespaced_deployment(cluster.ns).items
    ]
    seen += [
        cluster.pm("mlp"),
        cluster.api.sanitize_for_serialization(cluster.core.list_namespaced_event(cluster.ns)),
    ]
    assert token not in json.dumps(seen)
    # Deleted: made again at a resync (the plan is current), with a new token that rolls every
    # pod (their templates' secrets digest changes).
    before = _rolls(cluster.deployments("mlp"))
    cluster.core.delete_namespaced_secret("mlp-chain-token", cluster.ns)
    remade = wait_until(
        "the chain Secret made again",
        lambda: (
            (s := cluster.secret("mlp-chain-token")) and s.metadata.uid != kept.metadata.uid and s
        ),
    )
    assert remade.data != kept.data
    wait_until(
        "every pod template rolled",
        lambda: all(
            after[name] != before[name]
            for after in [_rolls(cluster.deployments("mlp"))]
            for name in before
        ),
    )
    assert cluster.pm("mlp")["status"]["observedGeneration"] == 2


def _rolls(deployments: dict[str, Any]) -> dict[str, str]:
    return {
        name: d.spec.template.metadata.annotations["moirai.dev/secrets-digest"]
        for name, d in deployments.items()
    }


def test_an_endpoint_token_secret_is_waited_for_then_read_by_the_gateway(
    operator, cluster, make_node_pool, models
):
    cpu = f"{cluster.ns}-cpu"
    make_node_pool(cpu, count=1, cpu="8")
    spec = {
        "model": {"uri": models["mlp"]},
        "pools": [{"name": cpu, "kind": "cpu", "threadsPerDevice": 2}],
        "serving": {"authTokenSecret": "mlp-clients"},
    }
    cluster.apply("mlp", spec)
    status = cluster.wait_phase("mlp", "Failed")
    planned = next(c for c in status["conditions"] if c["type"] == "Planned")
    assert planned["reason"] == "AuthTokenSecretMissing", planned
    assert "kubectl create secret generic mlp-clients" in planned["message"]
    assert not cluster.deployments("mlp")
    # Created later, with no change to the PlacedModel: the retry finds it.
    cluster.core.create_namespaced_secret(
        cluster.ns, {"metadata": {"name": "mlp-clients"}, "stringData": {"token": "open-sesame"}}
    )
    cluster.wait_phase("mlp", "Ready")
    gateway = cluster.deployments("mlp")["mlp-gateway"]
    ref = _env(gateway)["MOIRAI_AUTH_TOKEN"].value_from.secret_key_ref
    assert (ref.name, ref.key) == ("mlp-clients", "token")
    assert "open-sesame" not in json.dumps(cluster.api.sanitize_for_serialization(gateway))
    # A new token rolls the gateway, and only it.
    before = _rolls(cluster.deployments("mlp"))
    cluster.core.patch_namespaced_secret(
        "mlp-clients", cluster.ns, {"stringData": {"token": "open-sesame-2"}}
    )
    wait_until(
        "the gateway rolled",
        lambda: _rolls(cluster.deployments("mlp"))["mlp-gateway"] != before["mlp-gateway"],
    )
    after = _rolls(cluster.deployments("mlp"))
    assert {k: v for k, v in after.items() if k != "mlp-gateway"} == {
        k: v for k, v in before.items() if k != "mlp-gateway"
    }


def test_delete_removes_every_child(operator, cluster, make_node_pool, models):
    gpu, cpu = two_pools(cluster, make_node_pool)
    cluster.apply("mlp", spec_for(models, gpu, cpu))
    cluster.wait_phase("mlp", "Ready")
    assert "Secret/mlp-chain-token" in cluster.children("mlp")
    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, cluster.ns, PLURAL, "mlp")
    wait_until("the garbage collector to delete the children", lambda: not cluster.children("mlp"))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"model": {"uri": "ftp://x/m.onnx"}, "pools": [{"name": "a", "kind": "cpu"}]}, "uri"),
        ({"model": {"uri": "http://x/m"}, "pools": [{"name": "a", "kind": "tpu"}]}, "kind"),
        ({"model": {"uri": "http://x/m"}, "pools": []}, "pools"),
        (
            {
                "model": {"uri": "http://x/m"},
                "pools": [{"name": "a", "kind": "cpu", "maxDevices": 0}],
            },
            "maxDevices",
        ),
        (
            {
                "model": {"uri": "http://x/m"},
                "pools": [{"name": "a", "kind": "cpu"}],
                "placement": {"solver": "magic"},
            },
            "solver",
        ),
        (
            {
                "model": {"uri": "http://x/m", "sha256": "xyz"},
                "pools": [{"name": "a", "kind": "cpu"}],
            },
            "sha256",
        ),
        ({"pools": [{"name": "a", "kind": "cpu"}]}, "model"),
    ],
)
def test_schema_rejects_invalid_specs(crd, cluster, spec, message):
    body = placed_model("bad", spec)
    with pytest.raises(ApiException) as error:
        cluster.custom.create_namespaced_custom_object(GROUP, VERSION, cluster.ns, PLURAL, body)
    assert error.value.status == 422 and message in error.value.body


@pytest.mark.parametrize("name", ["a.b", "x" * 64])
def test_schema_rejects_names_that_cannot_name_children(crd, cluster, name):
    """A dot cannot be in a Service's name, and a label value has at most 63 characters: the
    operator would have every child of such a PlacedModel refused."""
    body = placed_model(
        name, {"model": {"uri": "http://x/m"}, "pools": [{"name": "a", "kind": "cpu"}]}
    )
    with pytest.raises(ApiException) as error:
        cluster.custom.create_namespaced_custom_object(GROUP, VERSION, cluster.ns, PLURAL, body)
    assert error.value.status == 422 and "metadata.name" in error.value.body


def test_a_bad_edit_keeps_the_old_plan_serving_and_says_so(
    operator, cluster, make_node_pool, models
):
    cpu = f"{cluster.ns}-cpu"
    make_node_pool(cpu, count=1, cpu="8")
    pool = {"name": cpu, "kind": "cpu", "threadsPerDevice": 2}
    cluster.apply("mlp", {"model": {"uri": models["mlp"]}, "pools": [pool]})
    serving = cluster.wait_phase("mlp", "Ready")
    before = {n: d.metadata.uid for n, d in cluster.deployments("mlp").items()}
    cluster.apply("mlp", {"model": {"uri": models["mlp"]}, "pools": [{**pool, "name": "nowhere"}]})
    status = cluster.wait_phase("mlp", "Failed")
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Planned"]["reason"] == "NoMatchingPool"
    assert conditions["Planned"]["message"].endswith(
        "; not applied: the previous plan keeps serving"
    )
    assert status["message"] == conditions["Planned"]["message"]
    assert (conditions["Ready"]["status"], conditions["Ready"]["reason"]) == ("True", "Available")
    assert status["endpoint"] == serving["endpoint"]
    assert status["placement"] == serving["placement"]
    assert {n: d.metadata.uid for n, d in cluster.deployments("mlp").items()} == before
    # Fixed: taken.
    cluster.apply("mlp", {"model": {"uri": models["mlp"]}, "pools": [{**pool, "maxDevices": 2}]})
    assert cluster.wait_phase("mlp", "Ready")["observedGeneration"] == 3


def test_failures_are_conditions_with_reasons(operator, cluster, make_node_pool, models):
    cpu = f"{cluster.ns}-cpu"
    make_node_pool(cpu, count=1, cpu="4", memory="8Gi")
    pool = {"name": cpu, "kind": "cpu", "threadsPerDevice": 2}
    cluster.apply(
        "nopool", {"model": {"uri": models["mlp"]}, "pools": [{"name": "nowhere", "kind": "gpu"}]}
    )
    cluster.apply(
        "unreachable", {"model": {"uri": f"{models['url']}/missing.onnx"}, "pools": [pool]}
    )
    cluster.apply("digest", {"model": {"uri": models["mlp"], "sha256": "0" * 64}, "pools": [pool]})
    cluster.apply(
        "toobig",
        {"model": {"uri": models["wide"]}, "pools": [{**pool, "memoryPerDevice": "1Mi"}]},
    )
    # An image the chart does not allow: its pods would run whatever it names.
    cluster.apply(
        "miner", {"model": {"uri": models["mlp"]}, "pools": [pool], "image": "evil/miner:1"}
    )
    expected = {
        "miner": ("InvalidSpec", "spec.image 'evil/miner:1' is not allowed"),
        "nopool": ("NoMatchingPool", "no schedulable node matches pool 'nowhere'"),
        "unreachable": ("ModelUnreachable", "HTTP 404"),
        "digest": ("ModelDigestMismatch", "spec.model.sha256"),
        "toobig": ("InsufficientMemory", "no pool has enough memory"),
    }
    for name, (reason, message) in expected.items():
        # Phase and condition from one snapshot: a transient failure (ModelUnreachable) is
        # retried, which may rewrite both right after the Failed phase was seen.
        status = cluster.wait_phase(name, "Failed")
        planned = next(c for c in status["conditions"] if c["type"] == "Planned")
        assert planned["status"] == "False" and planned["reason"] == reason, planned
        assert message in planned["message"]
        assert not cluster.deployments(name)
    # Fixing the spec recovers.
    cluster.apply("nopool", {"model": {"uri": models["mlp"]}, "pools": [pool]})
    cluster.wait_phase("nopool", "Ready")


def test_liveness_endpoint_answers(operator, make_node_pool, namespace):
    make_node_pool(f"{namespace}-live", count=1)
    url = f"http://127.0.0.1:{LIVENESS_PORT}/healthz"

    def probe() -> dict[str, Any] | None:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.loads(response.read())
        return body if body.get("nodes", 0) >= 1 else None

    assert wait_until("the liveness probe to count the nodes", probe)["nodes"] >= 1


def test_a_rotated_endpoint_token_rolls_the_gateway_while_a_bad_edit_waits(
    operator, cluster, make_node_pool, models
):
    """A bad edit leaves the previous plan serving; its gateway still reads the endpoint token
    Secret, so a token rotated meanwhile must still roll it (and only it)."""
    cpu = f"{cluster.ns}-cpu"
    make_node_pool(cpu, count=1, cpu="8")
    cluster.core.create_namespaced_secret(
        cluster.ns, {"metadata": {"name": "mlp-clients"}, "stringData": {"token": "open-sesame"}}
    )
    pool = {"name": cpu, "kind": "cpu", "threadsPerDevice": 2}
    serving = {"authTokenSecret": "mlp-clients"}
    cluster.apply("mlp", {"model": {"uri": models["mlp"]}, "pools": [pool], "serving": serving})
    cluster.wait_phase("mlp", "Ready")
    bad = {"model": {"uri": models["mlp"]}, "pools": [{**pool, "name": "nowhere"}]}
    cluster.apply("mlp", {**bad, "serving": serving})
    failed = cluster.wait_phase("mlp", "Failed")
    before = _rolls(cluster.deployments("mlp"))
    cluster.core.patch_namespaced_secret(
        "mlp-clients", cluster.ns, {"stringData": {"token": "open-sesame-2"}}
    )
    wait_until(
        "the serving gateway rolled to the new token",
        lambda: _rolls(cluster.deployments("mlp"))["mlp-gateway"] != before["mlp-gateway"],
        timeout=20,
    )
    after = _rolls(cluster.deployments("mlp"))
    assert {k: v for k, v in after.items() if k != "mlp-gateway"} == {
        k: v for k, v in before.items() if k != "mlp-gateway"
    }
    # Nothing else moved: the bad edit is still reported, the old plan still serves, and the
    # status records the digest the gateway now runs with (so it rolls once, not each pass).
    status = cluster.status("mlp")
    assert status["phase"] == "Failed" and status["message"] == failed["message"]
    assert status["placement"] == failed["placement"]
    digests = {s["name"]: s["digest"] for s in status["secrets"]}
    was = {s["name"]: s["digest"] for s in failed["secrets"]}
    assert digests["mlp-clients"] != was["mlp-clients"]
    assert digests["mlp-chain-token"] == was["mlp-chain-token"]
    gateway = cluster.deployments("mlp")["mlp-gateway"].metadata.generation
    time.sleep(3)  # a few resyncs
    assert cluster.deployments("mlp")["mlp-gateway"].metadata.generation == gateway
    assert cluster.status("mlp")["secrets"] == status["secrets"]


def _served(cluster: Cluster, name: str) -> dict[str, Any]:
    """What serves PlacedModel `name`, as a refused re-plan must leave it: its children, the
    plan they read, each Deployment's template (by generation) and each Service's version."""
    selector = f"moirai.dev/placedmodel={name}"
    services = cluster.core.list_namespaced_service(cluster.ns, label_selector=selector).items
    return {
        "children": cluster.children(name),
        "plan": cluster.core.read_namespaced_config_map(f"{name}-plan", cluster.ns).data,
        "deployments": {n: d.metadata.generation for n, d in cluster.deployments(name).items()},
        "services": {s.metadata.name: s.metadata.resource_version for s in services},
    }


def _one_cpu_device(cluster: Cluster, make_node_pool, models) -> tuple[dict[str, Any], str]:
    """A PlacedModel `mlp` serving on one cpu device; its spec and that device's Deployment."""
    cpu = f"{cluster.ns}-cpu"
    make_node_pool(cpu, count=1, cpu="16")
    pool = {"name": cpu, "kind": "cpu", "threadsPerDevice": 2, "maxDevices": 1}
    spec = {"model": {"uri": models["mlp"]}, "pools": [pool]}
    cluster.apply("mlp", spec)
    cluster.wait_phase("mlp", "Ready")
    return spec, f"mlp-{cpu}-0"


@contextlib.contextmanager
def _refuse_second_lanes(cluster: Cluster) -> Iterator[None]:
    """An admission policy of the namespace that refuses Deployments of a second lane (`-l1`),
    in force once this yields; removed after."""
    name = f"{cluster.ns}-no-second-lane"
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": ["apps"],
                        "apiVersions": ["v1"],
                        "operations": ["CREATE", "UPDATE"],
                        "resources": ["deployments"],
                    }
                ]
            },
            "validations": [
                {
                    "expression": "!object.metadata.name.endsWith('-l1')",
                    "message": "one lane only in this namespace",
                }
            ],
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {
            "policyName": name,
            "validationActions": ["Deny"],
            "matchResources": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": cluster.ns}}
            },
        },
    }
    for obj in (policy, binding):
        cluster.plane.kubectl("apply", "--server-side", "-f", "-", stdin=json.dumps(obj))
    probe = {
        "metadata": {"name": "probe-l1"},
        "spec": {
            "selector": {"matchLabels": {"probe": "1"}},
            "template": {
                "metadata": {"labels": {"probe": "1"}},
                "spec": {"containers": [{"name": "c", "image": "moirai:test"}]},
            },
        },
    }

    def refused() -> bool:
        try:
            cluster.apps.create_namespaced_deployment(cluster.ns, probe, dry_run="All")
        except ApiException as e:
            return "one lane only" in str(e.body)
        return False

    try:
        wait_until("the admission policy in force", refused)
        yield
    finally:
        cluster.plane.kubectl("delete", "validatingadmissionpolicybinding", name)
        cluster.plane.kubectl("delete", "validatingadmissionpolicy", name)


def test_a_re_plan_with_a_child_an_admission_policy_refuses_changes_nothing_that_serves(
    operator, cluster, make_node_pool, models
):
    spec, device = _one_cpu_device(cluster, make_node_pool, models)
    before = _served(cluster, "mlp")
    with _refuse_second_lanes(cluster):
        cluster.apply("mlp", {**spec, "serving": {"replicas": 2}})
        status = cluster.wait_phase("mlp", "Failed")
        # Refused before anything was written: not the plan, nor the lane's Service.
        assert _served(cluster, "mlp") == before
        planned = cluster.condition("mlp", "Planned")
        assert planned["reason"] == "ChildRejected"
        message = planned["message"]
        assert message.startswith(f"the API server refused Deployment {device}-l1: ")
        assert "one lane only in this namespace" in message
        assert "retried at every resync" in message  # and what to change
        assert message.endswith("; not applied: the previous plan keeps serving")
        assert status["message"] == message
        assert cluster.condition("mlp", "Ready")["status"] == "True"
    # Lifted: the retry takes the spec.
    assert cluster.wait_phase("mlp", "Ready")["observedGeneration"] == 2
    assert f"Deployment/{device}-l1" in cluster.children("mlp")


def test_a_re_plan_refused_partway_by_a_quota_removes_what_it_made(
    operator, cluster, make_node_pool, models
):
    """A quota of 4 Services with 3 in use admits each of two new lanes' Services alone (a dry
    run passes), but not both: the first one made, and its lane's Deployment, are removed."""
    spec, device = _one_cpu_device(cluster, make_node_pool, models)
    before = _served(cluster, "mlp")
    assert len(before["services"]) == 3

    def quota(services: int, used: int | None = None) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "ResourceQuota",
            "metadata": {"name": "services", "namespace": cluster.ns},
            "spec": {"hard": {"services": str(services)}},
        }
        cluster.plane.kubectl("apply", "--server-side", "-f", "-", stdin=json.dumps(body))
        wait_until(
            "the quota counted",
            lambda: (
                (q := cluster.core.read_namespaced_resource_quota("services", cluster.ns)).status
                and (q.status.hard or {}).get("services") == str(services)
                and (used is None or (q.status.used or {}).get("services") == str(used))
            ),
        )

    quota(4, used=3)
    cluster.apply("mlp", {**spec, "serving": {"replicas": 3}})
    wait_until(
        "the second new Service refused",
        lambda: f"refused Service {device}-l2: " in cluster.condition("mlp", "Planned")["message"],
    )
    wait_until(
        "what the refused re-plan made removed",
        lambda: cluster.children("mlp") == before["children"],
        timeout=20,
    )
    # Retried at each resync, each time undone. With no room at all the retries stop at the dry
    # run (the first new Service refused), and then nothing of the refused spec can be left.
    quota(3)
    wait_until(
        "the first new Service refused",
        lambda: f"refused Service {device}-l1: " in cluster.condition("mlp", "Planned")["message"],
    )
    status = cluster.status("mlp")
    assert status["phase"] == "Failed" and "exceeded quota" in status["message"]
    assert status["message"].endswith("; not applied: the previous plan keeps serving")
    assert _served(cluster, "mlp") == before
    cluster.core.delete_namespaced_resource_quota("services", cluster.ns)
    assert cluster.wait_phase("mlp", "Ready")["observedGeneration"] == 2
    assert len(cluster.deployments("mlp")) == 4
