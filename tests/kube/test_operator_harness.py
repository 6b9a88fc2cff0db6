"""Harness of the operator's control-plane tests (no tests here): a model store on 127.0.0.1,
the operator under kopf's `KopfRunner`, a reader of one namespace, and the nodes' part: the pods
the operator wrote, run as containers of Moirai's image by `tests/container/kubelet.py`.

Shared by test_operator.py, test_containers.py and test_chart_install.py; named
test_operator_harness so that it lives beside them (pytest collects no tests from it).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kopf.testing import KopfRunner
from kubelet import Kubelet, Pod
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.config import kube_config
from moirai_operator.resources import GROUP, PLURAL, VERSION

REPO = Path(__file__).resolve().parents[2]
# The operator's unit tests' builders: one PlacedModel body and one test model for both suites.
sys.path.insert(0, str(REPO / "tests" / "operator"))
from operator_bodies import COMMON_VALUES, placed_model, write_mlp  # noqa: E402, F401

OPERATOR_ARGS = ["run", "--standalone", "-m", "moirai_operator.handlers"]
OPERATOR_ENV = {
    "MOIRAI_RESYNC_SECONDS": "1",
    "MOIRAI_SOLVER": "heft",
    "MOIRAI_TIME_LIMIT_SECONDS": "5",
    "MOIRAI_IMAGE": "moirai:test",
    "MOIRAI_GPU_IMAGE": "moirai:test-gpu",
}
TIMEOUT = 60.0


SLOW_SECONDS = 4.0


@contextlib.contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    """An HTTP server for `directory` on 127.0.0.1; yields its base URL. Files under `/slow/`
    are the same files, answered after `SLOW_SECONDS` (a slow model store)."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(directory), **kwargs)

        def do_GET(self) -> None:
            if self.path.startswith("/slow/"):
                time.sleep(SLOW_SECONDS)
                self.path = self.path[len("/slow") :]
            super().do_GET()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def wait_until(what: str, check: Callable[[], Any], timeout: float = TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def install_crd(plane) -> None:
    plane.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    plane.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/placedmodels.moirai.dev"
    )


@contextlib.contextmanager
def models_for(directory: Path) -> Iterator[dict[str, Any]]:
    """Two models (a small and a wide MLP) served over HTTP; their URLs and digests."""
    directory.mkdir(parents=True, exist_ok=True)
    mlp = write_mlp(directory / "mlp.onnx")
    write_mlp(directory / "wide.onnx", hidden=1024, layers=3)
    with serve_directory(directory) as url:
        yield {
            "url": url,
            "mlp": f"{url}/mlp.onnx",
            "mlp_sha256": hashlib.sha256(mlp.read_bytes()).hexdigest(),
            "wide": f"{url}/wide.onnx",
            "path": mlp,
        }


@contextlib.contextmanager
def running_operator(
    plane,
    cache: Path,
    kubeconfig: Path | None = None,
    liveness_port: int | None = None,
    namespaces: tuple[str, ...] = (),
) -> Iterator[KopfRunner]:
    """The operator as the chart runs it, authenticated by `kubeconfig` (default: admin),
    serving `namespaces` (default: all), with kopf's liveness endpoint on
    127.0.0.1:`liveness_port` when given."""
    args = list(OPERATOR_ARGS)
    args[2:2] = [f"--namespace={n}" for n in namespaces] or ["--all-namespaces"]
    inbox = free_port()
    if liveness_port:
        args.insert(2, f"--liveness=http://127.0.0.1:{liveness_port}/healthz")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KUBECONFIG", str(kubeconfig or plane.kubeconfig))
        # kubernetes reads $KUBECONFIG once, at import, into this default (kopf logs in with it).
        mp.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig or plane.kubeconfig))
        mp.setenv("MOIRAI_MODEL_CACHE", str(cache))
        for key, value in OPERATOR_ENV.items():
            mp.setenv(key, value)
        # The profile inbox on loopback, where the test runs the profiling Jobs' pods.
        mp.setenv("MOIRAI_PROFILE_HOST", "127.0.0.1")
        mp.setenv("MOIRAI_PROFILE_PORT", str(inbox))
        mp.setenv("MOIRAI_PROFILE_URL", f"http://127.0.0.1:{inbox}")
        with KopfRunner(args, timeout=30) as runner:
            yield runner
    assert runner.exception is None, runner.output


class Cluster:
    """What the tests read and write, in one namespace."""

    def __init__(self, api: client.ApiClient, plane, namespace: str) -> None:
        self.api = api
        self.plane = plane
        self.ns = namespace
        self.custom = client.CustomObjectsApi(api)
        self.apps = client.AppsV1Api(api)
        self.core = client.CoreV1Api(api)

    def apply(self, name: str, spec: dict[str, Any]) -> None:
        body = placed_model(name, spec, namespace=self.ns)
        self.plane.kubectl("apply", "--server-side", "-f", "-", stdin=json.dumps(body))

    def pm(self, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)

    def status(self, name: str) -> dict[str, Any]:
        return self.pm(name).get("status") or {}

    def condition(self, name: str, type_: str) -> dict[str, Any]:
        for c in self.status(name).get("conditions") or []:
            if c["type"] == type_:
                return c
        return {}

    def wait_phase(self, name: str, phase: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        try:
            return self._wait_phase(name, phase, timeout)
        except AssertionError as e:
            raise AssertionError(f"{e}; status: {self.status(name)}") from None

    def _wait_phase(self, name: str, phase: str, timeout: float) -> dict[str, Any]:
        return wait_until(
            f"{name} to be {phase}",
            lambda: (
                (s := self.status(name)).get("phase") == phase
                and s.get("observedGeneration") == self.pm(name)["metadata"]["generation"]
                and s
            ),
            timeout,
        )

    def deployments(self, name: str) -> dict[str, Any]:
        items = self.apps.list_namespaced_deployment(
            self.ns, label_selector=f"moirai.dev/placedmodel={name}"
        ).items
        return {d.metadata.name: d for d in items}

    def children(self, name: str) -> set[str]:
        selector = f"moirai.dev/placedmodel={name}"
        found = set()
        for kind, items in (
            ("ConfigMap", self.core.list_namespaced_config_map(self.ns, label_selector=selector)),
            ("Service", self.core.list_namespaced_service(self.ns, label_selector=selector)),
            ("Deployment", self.apps.list_namespaced_deployment(self.ns, label_selector=selector)),
            ("Secret", self.core.list_namespaced_secret(self.ns, label_selector=selector)),
        ):
            found |= {f"{kind}/{o.metadata.name}" for o in items.items}
        return found

    def secret(self, name: str) -> Any:
        try:
            return self.core.read_namespaced_secret(name, self.ns)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def profiling_jobs(self, name: str) -> list[Any]:
        return (
            client.BatchV1Api(self.api)
            .list_namespaced_job(
                self.ns,
                label_selector=f"moirai.dev/placedmodel={name},app.kubernetes.io/component=profiler",
            )
            .items
        )

    def pods_nodes(self, deployment: str) -> set[str]:
        pods = self.core.list_namespaced_pod(
            self.ns, label_selector=f"moirai.dev/child={deployment}"
        ).items
        return {p.spec.node_name for p in pods if p.spec.node_name}


# --- running the pods the operator wrote, as containers (tests/container/kubelet.py) ----------
def _manifest(api: client.ApiClient, obj: Any, kind: str) -> dict[str, Any]:
    return {"kind": kind, **api.sanitize_for_serialization(obj)}


def add_secrets(cluster: Cluster, kubelet: Kubelet, pod_spec: dict[str, Any]) -> None:
    """Hand the kubelet every Secret that `pod_spec`'s environment reads (`secretKeyRef`) or
    its volumes mount, as the API server holds it; one written just after its pod is waited
    for, as kubelets do."""
    names = [
        volume["secret"]["secretName"]
        for volume in pod_spec.get("volumes") or []
        if "secret" in volume
    ]
    for container in [*pod_spec.get("initContainers", []), *pod_spec["containers"]]:
        for env in container.get("env") or []:
            ref = (env.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                names.append(ref["name"])
    for name in dict.fromkeys(names):
        secret = wait_until(f"Secret {name}", lambda n=name: cluster.secret(n))
        kubelet.add_object(_manifest(cluster.api, secret, "Secret"))


def run_profiling_job(cluster: Cluster, kubelet: Kubelet, name: str) -> dict[str, Any]:
    """The nodes' part in measured profiling: run the pod of PlacedModel `name`'s profiling Job
    to completion (its last container reports to the operator); returns the pod spec."""
    (job,) = wait_until("the profiling Job", lambda: cluster.profiling_jobs(name))
    pod_spec = cluster.api.sanitize_for_serialization(job.spec.template.spec)
    add_secrets(cluster, kubelet, pod_spec)
    labels = dict(job.spec.template.metadata.labels or {})
    kubelet.start(kubelet.pod(f"{job.metadata.name}-pod", cluster.ns, pod_spec, labels))
    return pod_spec


def in_thread(what: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    """Run `what(*args)` in a thread (the kubelet beside the operator); the returned function
    waits for it and returns its result or raises its exception."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = what(*args)
        except BaseException as e:  # re-raised in the test's thread
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join() -> Any:
        thread.join(timeout=600)
        if "error" in result:
            raise result["error"]
        return result.get("value")

    return join


def run_deployments(cluster: Cluster, kubelet: Kubelet, name: str) -> dict[str, Pod]:
    """A pod for each Deployment of PlacedModel `name` (by Deployment name), started with its
    plan ConfigMap and the Secrets it reads (the chain token's, the endpoint token's), Services
    resolved, and ready."""
    selector = f"moirai.dev/placedmodel={name}"
    for cm in cluster.core.list_namespaced_config_map(cluster.ns, label_selector=selector).items:
        kubelet.add_object(_manifest(cluster.api, cm, "ConfigMap"))
    pods: dict[str, Pod] = {}
    deployments = cluster.apps.list_namespaced_deployment(cluster.ns, label_selector=selector)
    for deployment in deployments.items:
        assert deployment.spec.replicas == 1, deployment.metadata.name
        template = deployment.spec.template
        pod_spec = cluster.api.sanitize_for_serialization(template.spec)
        add_secrets(cluster, kubelet, pod_spec)
        pods[deployment.metadata.name] = kubelet.pod(
            f"{deployment.metadata.name}-0", cluster.ns, pod_spec, template.metadata.labels
        )
    for service in cluster.core.list_namespaced_service(cluster.ns, label_selector=selector).items:
        manifest = _manifest(cluster.api, service, "Service")
        kubelet.expose(manifest, pods[manifest["spec"]["selector"]["moirai.dev/child"]])
    for pod in pods.values():
        kubelet.start(pod)
    kubelet.wait_ready(list(pods.values()), timeout=180)
    return pods
