"""The manifests really run: the pods the operator wrote, run as local processes, serve the model.

After the operator deploys a PlacedModel on kwok pools (where nothing really runs), this test
takes what it wrote — the plan ConfigMap, the stage-server and gateway Deployments and their
Services — and runs every container's command as a process on this machine: init containers
first, then the servers, with the args and env as written, except that

- the plan ConfigMap is materialised to files and each pod's emptyDir is a local directory,
  at the paths the containers mount them (rewritten in the args);
- each Service gets a loopback port; its name is resolved to that port in the plan's endpoints,
  and each container's declared port is remapped to its Service's loopback port.

Then it sends an Open Inference Protocol request to the gateway and compares the answer with
single-process ONNX Runtime on the same model.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator

import numpy as np
import onnxruntime as ort
import pytest
from kubernetes import client
from test_operator_harness import (
    Cluster,
    container_env,
    free_port,
    install_crd,
    local_argv,
    models_for,
    pod_mounts,
    run_to_completion,
    running_operator,
    wait_until,
)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    running: list[subprocess.Popen] = []
    yield running
    for p in running:
        p.terminate()
    for p in running:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


def test_the_written_pods_serve_the_model(
    scheduling_control_plane, kube_api, namespace, make_node_pool, tmp_path, processes
):
    plane = scheduling_control_plane
    install_crd(plane)
    cpu = f"{namespace}-cpu"
    make_node_pool(cpu, count=1, cpu="16")
    cluster = Cluster(kube_api, plane, namespace)
    with models_for(tmp_path / "models") as models:
        # 32 KiB per device cannot hold the model's 64 KiB of weights: the plan must chain
        # several stage servers.
        spec = {
            "model": {"uri": models["mlp"], "sha256": models["mlp_sha256"]},
            "pools": [
                {
                    "name": cpu,
                    "kind": "cpu",
                    "threadsPerDevice": 1,
                    "maxDevices": 4,
                    "memoryPerDevice": "32Ki",
                }
            ],
        }
        with running_operator(plane, tmp_path / "cache"):
            cluster.apply("mlp", spec)
            status = cluster.wait_phase("mlp", "Ready")
        assert status["placement"]["devices"] >= 2

        apps, core = client.AppsV1Api(kube_api), client.CoreV1Api(kube_api)
        selector = "moirai.dev/placedmodel=mlp"
        deployments = apps.list_namespaced_deployment(namespace, label_selector=selector).items
        services = core.list_namespaced_service(namespace, label_selector=selector).items
        files = core.read_namespaced_config_map("mlp-plan", namespace).data

        # Services → loopback ports; their DNS names → those ports.
        local: dict[str, dict[str, int]] = {}  # service → targetPort name → loopback port
        dns: dict[str, str] = {}
        for svc in services:
            local[svc.metadata.name] = {}
            for port in svc.spec.ports:
                loopback = free_port()
                local[svc.metadata.name][port.target_port] = loopback
                dns[f"{svc.metadata.name}.{namespace}.svc:{port.port}"] = f"127.0.0.1:{loopback}"
        plan_dir = tmp_path / "plan"
        plan_dir.mkdir()
        for name, text in files.items():
            for service, address in dns.items():
                text = text.replace(service, address)
            (plan_dir / name).write_text(text)

        gateway_http = None
        for deployment in sorted(deployments, key=lambda d: d.metadata.name == "mlp-gateway"):
            pod = kube_api.sanitize_for_serialization(deployment.spec.template.spec)
            name = deployment.metadata.name
            mounts = pod_mounts(pod, tmp_path / "pods" / name, {"mlp-plan": plan_dir})
            for init in pod.get("initContainers") or []:
                run_to_completion(init, mounts)
            (container,) = pod["containers"]
            ports = {
                str(p["containerPort"]): str(local[name][p["name"]]) for p in container["ports"]
            }
            argv = local_argv(container["command"], mounts, ports)
            log = (tmp_path / f"{name}.log").open("w")
            processes.append(
                subprocess.Popen(
                    argv, env=container_env(container), stdout=log, stderr=subprocess.STDOUT
                )
            )
            if name == "mlp-gateway":
                gateway_http = local[name]["http"]

        def ready() -> bool:
            for p in processes:
                assert p.poll() is None, f"{p.args} exited: see {tmp_path}/*.log"
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{gateway_http}/v2/health/ready", timeout=2
                ) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_until("the local gateway to be ready", ready, timeout=60)
        x = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
        request = {
            "inputs": [
                {"name": "x", "datatype": "FP32", "shape": [1, 64], "data": x.ravel().tolist()}
            ]
        }
        started = time.monotonic()
        with urllib.request.urlopen(
            urllib.request.Request(
                f"http://127.0.0.1:{gateway_http}/v2/models/mlp/infer",
                data=json.dumps(request).encode(),
                headers={"Content-Type": "application/json"},
            ),
            timeout=30,
        ) as response:
            answer = json.loads(response.read())
        assert time.monotonic() - started < 30
        (output,) = answer["outputs"]
        got = np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
        (expected,) = ort.InferenceSession(str(models["path"])).run(["y"], {"x": x})
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
