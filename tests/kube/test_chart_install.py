"""The Helm chart on a real control plane: server-side dry-run of what it renders, and the
operator running with exactly the chart's RBAC (as its ServiceAccount, not as admin).

`helm lint`/`helm template` checks without a cluster are in tests/operator/test_helm_chart.py.
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from kubernetes import client, config
from moirai_operator.catalogue import Catalogue
from moirai_operator.children import BuildOptions
from moirai_operator.kube import Kube
from moirai_operator.planning import Planner
from moirai_operator.pools import NodeFacts, node_facts
from moirai_operator.profiling import JobProfiler, ProfileInbox
from moirai_operator.reconcile import Context, converge
from moirai_operator.spec import Defaults
from test_operator_harness import (
    COMMON_VALUES,
    Cluster,
    free_port,
    in_thread,
    install_crd,
    models_for,
    run_profiling_job,
    running_operator,
)

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "moirai"
RELEASE = "moirai"

# What kopf itself does with the API (the reconciler's calls are recorded by `Kube.used`).
KOPF_NEEDS = {
    ("moirai.dev", "placedmodels", "list"),
    ("moirai.dev", "placedmodels", "watch"),
    ("moirai.dev", "placedmodels", "patch"),
    ("", "events", "create"),
    ("", "nodes", "list"),
    ("", "nodes", "watch"),
}


def render(plane, namespace: str, *values: str, crds: bool = False) -> str:
    args = ["template", RELEASE, str(CHART), "--namespace", namespace, *values]
    return plane.helm(*args, *(["--include-crds"] if crds else []))


@pytest.mark.parametrize(
    "values",
    [
        [],
        ["--set", "watchAllNamespaces=true"],
        ["--set", "watchNamespaces={default,kube-public}", "--set", "networkPolicy.enabled=false"],
        # Served namespaces that exist here.
        [*COMMON_VALUES, "--set", "watchNamespaces={default,kube-public}"],
    ],
    ids=["own-namespace", "cluster-wide", "namespaces", "common-values"],
)
def test_rendered_chart_passes_server_side_dry_run(control_plane, namespace, values):
    manifests = render(control_plane, namespace, *values, crds=True)
    out = control_plane.kubectl(
        "apply", "--dry-run=server", "--server-side", "-f", "-", stdin=manifests
    )
    kinds = {line.split("/")[0] for line in out.splitlines()}
    assert {
        "customresourcedefinition.apiextensions.k8s.io",
        "deployment.apps",
        "serviceaccount",
        "clusterrole.rbac.authorization.k8s.io",
        "configmap",
    } <= kinds


IDENTITY = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")


def apply_all(plane, items: list[dict]) -> None:
    """Apply rendered manifests `items` server-side, as one List."""
    plane.kubectl(
        "apply",
        "--server-side",
        "-f",
        "-",
        stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
    )


def rules_of(manifests: str) -> set[tuple[str, str, str]]:
    out = set()
    for doc in yaml.safe_load_all(manifests):
        if doc and doc["kind"] in ("ClusterRole", "Role"):
            for rule in doc["rules"]:
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        for verb in rule["verbs"]:
                            out.add((group, resource, verb))
    return out


def service_account_kubeconfig(plane, namespace: str, path: Path) -> Path:
    """A kubeconfig that authenticates as the chart's ServiceAccount (a TokenRequest token)."""
    token = plane.kubectl("create", "token", RELEASE, "-n", namespace).strip()
    kubeconfig = yaml.safe_load(plane.kubeconfig.read_text())
    kubeconfig["users"] = [{"name": "operator", "user": {"token": token}}]
    for context in kubeconfig["contexts"]:
        context["context"]["user"] = "operator"
    path.write_text(yaml.safe_dump(kubeconfig))
    return path


class _Events:
    def info(self, reason: str, message: str) -> None:
        pass

    def warning(self, reason: str, message: str) -> None:
        pass


def _nodes(kube_api: client.ApiClient) -> list[NodeFacts]:
    raw = kube_api.sanitize_for_serialization(client.CoreV1Api(kube_api).list_node())
    return [node_facts(n) for n in raw["items"]]


def test_operator_runs_with_exactly_the_charts_rbac(
    scheduling_control_plane, kube_api, namespace, make_node_pool, image, kubelet, tmp_path
):
    plane = scheduling_control_plane
    install_crd(plane)
    manifests = render(plane, namespace)
    identity = [d for d in yaml.safe_load_all(manifests) if d and d["kind"] in IDENTITY]
    apply_all(plane, identity)
    kubeconfig = service_account_kubeconfig(plane, namespace, tmp_path / "operator.kubeconfig")
    first, second = f"{namespace}-a", f"{namespace}-b"
    make_node_pool(first, count=1, cpu="8")
    make_node_pool(second, count=1, cpu="8")
    cluster = Cluster(kube_api, plane, namespace)

    with models_for(tmp_path / "models") as models:
        spec = {
            "model": {"uri": models["mlp"]},
            "pools": [{"name": first, "kind": "cpu", "threadsPerDevice": 2, "maxDevices": 2}],
        }
        # Moving to another pool replaces every stage server: a re-plan that prunes.
        moved = {**spec, "pools": [{**spec["pools"][0], "name": second}]}

        # As the ServiceAccount, under kopf: the chart grants enough for kopf and the reconciler
        # (create, then a re-plan that prunes).
        # By default the chart serves its own namespace only: so does the operator here.
        with running_operator(
            plane, tmp_path / "cache", kubeconfig=kubeconfig, namespaces=(namespace,)
        ):
            cluster.apply("viasa", spec)
            cluster.wait_phase("viasa", "Ready")
            cluster.apply("viasa", moved)
            cluster.wait_phase("viasa", "Ready")

        # The same passes outside kopf, with every API call recorded: no more than granted.
        # The last one profiles (a Job, whose pod the kubelet runs as containers).
        kube = Kube(config.new_client_from_config(config_file=str(kubeconfig)))
        measured = {**moved, "profiling": {"mode": "measured"}}
        with ThreadPoolExecutor(1) as executor:
            planner = Planner(Catalogue.load(), executor)

            async def passes() -> None:
                inbox, port = ProfileInbox(), free_port()
                runner = await inbox.serve("127.0.0.1", port)
                profiler = JobProfiler(kube, inbox, f"http://127.0.0.1:{port}", BuildOptions(), 120)
                ctx = Context(
                    kube,
                    planner,
                    Defaults(image=image),
                    BuildOptions(),
                    tmp_path / "cache2",
                    profiler,
                )
                try:
                    # Lanes under an autoscaler, then without one (pruned).
                    scaled = {**moved, "serving": {"autoscaling": {"maxReplicas": 3}}}
                    for body in (spec, scaled, measured):
                        cluster.apply("direct", body)
                        fresh = await kube.get("PlacedModel", namespace, "direct")
                        await converge(fresh, _nodes(kube_api), ctx, _Events())
                finally:
                    await runner.cleanup()

            profiled = in_thread(run_profiling_job, cluster, kubelet, "direct")
            asyncio.run(passes())
            profiled()
        assert cluster.status("direct")["placement"]["profiling"] == "measured"
        assert set(cluster.deployments("direct")) == {f"direct-{second}-0", "direct-gateway"}
        assert cluster.status("direct")["phase"] in ("Deploying", "Ready")

    granted = rules_of(manifests)
    used = kube.used | KOPF_NEEDS
    assert used <= granted, f"the operator uses what the chart does not grant: {used - granted}"
    assert granted <= used, f"the chart grants what the operator never uses: {granted - used}"
