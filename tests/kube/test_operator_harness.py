"""Harness of the operator's control-plane tests (no tests here): a model store on 127.0.0.1,
the operator under kopf's `KopfRunner`, and a reader of one namespace.

Shared by test_operator.py, test_operator_runs.py and test_chart_install.py; named
test_operator_harness so that it lives beside them (pytest collects no tests from it).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kopf.testing import KopfRunner
from kubernetes import client
from kubernetes.config import kube_config
from moirai_operator.resources import GROUP, PLURAL, VERSION

REPO = Path(__file__).resolve().parents[2]
# The operator's unit tests' builders: one PlacedModel body and one test model for both suites.
sys.path.insert(0, str(REPO / "tests" / "operator"))
from operator_bodies import placed_model, write_mlp  # noqa: E402

OPERATOR_ARGS = ["run", "--standalone", "--all-namespaces", "-m", "moirai_operator.handlers"]
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
    plane, cache: Path, kubeconfig: Path | None = None, liveness_port: int | None = None
) -> Iterator[KopfRunner]:
    """The operator as the chart runs it, authenticated by `kubeconfig` (default: admin), with
    kopf's liveness endpoint on 127.0.0.1:`liveness_port` when given."""
    args = list(OPERATOR_ARGS)
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
        ):
            found |= {f"{kind}/{o.metadata.name}" for o in items.items}
        return found

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


# --- running the pods the operator wrote, as local processes -----------------------------------
BIN = Path(sys.executable).parent


def pod_mounts(pod: dict[str, Any], workdir: Path, configmaps: dict[str, Path]) -> dict[str, str]:
    """Mount path → local directory: each ConfigMap volume from `configmaps` (by ConfigMap
    name), each other volume (emptyDir) a fresh directory under `workdir`."""
    by_volume: dict[str, str] = {}
    for volume in pod["volumes"]:
        if "configMap" in volume:
            by_volume[volume["name"]] = str(configmaps[volume["configMap"]["name"]])
        else:
            directory = workdir / volume["name"]
            directory.mkdir(parents=True, exist_ok=True)
            by_volume[volume["name"]] = str(directory)
    mounts = {}
    for container in [*(pod.get("initContainers") or []), *pod["containers"]]:
        for mount in container.get("volumeMounts") or []:
            mounts[mount["mountPath"]] = by_volume[mount["name"]]
    return mounts


def local_argv(argv: list[str], mounts: dict[str, str], ports: dict[str, str]) -> list[str]:
    """`argv` with mount paths moved to their local directories (the longest mount wins),
    declared ports to loopback ports, the wildcard address to loopback, and the image's
    programs to this environment's."""
    out = []
    for arg in argv:
        arg = ports.get(arg, "127.0.0.1" if arg == "0.0.0.0" else arg)
        for mount in sorted(mounts, key=len, reverse=True):
            if arg == mount or arg.startswith(mount + "/"):
                arg = mounts[mount] + arg[len(mount) :]
                break
        out.append(arg)
    program = {"moirai": str(BIN / "moirai"), "python": sys.executable}.get(out[0], out[0])
    return [program, *out[1:]]


def container_env(
    container: dict[str, Any], rewrite: dict[str, str] | None = None
) -> dict[str, str]:
    """This process's environment (less MOIRAI_*) plus the container's env as written, with
    `rewrite` applied to the values (Service addresses to loopback)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOIRAI_")}
    for e in container.get("env") or []:
        value = e["value"]
        for old, new in (rewrite or {}).items():
            value = value.replace(old, new)
        env[e["name"]] = value
    return env


def run_to_completion(
    container: dict[str, Any], mounts: dict[str, str], rewrite: dict[str, str] | None = None
) -> None:
    argv = local_argv(container["command"], mounts, {})
    result = subprocess.run(
        argv, env=container_env(container, rewrite), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{container['name']}: {argv} failed:\n{result.stderr}"


def run_job_pod(pod: dict[str, Any], workdir: Path, rewrite: dict[str, str] | None = None) -> None:
    """A Job's pod: init containers, then its containers, each to completion."""
    mounts = pod_mounts(pod, workdir, {})
    for container in [*(pod.get("initContainers") or []), *pod["containers"]]:
        run_to_completion(container, mounts, rewrite)
