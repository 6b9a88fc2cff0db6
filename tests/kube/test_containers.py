"""The PlacedModel's whole life cycle with real containers of Moirai's image.

The operator runs against the real control plane (kwok nodes: nothing runs there), and the
kubelet of `tests/container/kubelet.py` plays the nodes' part for real: it runs the pods the
operator wrote — the measured-profiling Job (fetch, `moirai profile`, upload to the operator's
inbox), then every stage server and the gateway — as containers of the image, with the pod
specs' commands, environment, security context and volumes, on the host's network (loopback
only). Then the endpoint answers Open Inference Protocol requests over HTTP and gRPC, compared
with single-process ONNX Runtime on the same model.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from prometheus_client.parser import text_string_to_metric_families
from test_operator_harness import (
    Cluster,
    free_port,
    in_thread,
    install_crd,
    models_for,
    run_deployments,
    run_profiling_job,
    running_operator,
    wait_until,
)
from tritonclient.utils import InferenceServerException

from moirai.sessions import STAGE_SERVER_OVERHEAD_BYTES

# A device with room for a stage server and 32 KiB of tasks: less than the test model's weights.
DEVICE_MEMORY = f"{STAGE_SERVER_OVERHEAD_BYTES // 1024 + 32}Ki"


def _one_cpu_pool(
    plane: Any, kube_api: Any, namespace: str, make_node_pool: Any
) -> tuple[Cluster, str, int, int]:
    """The CRD installed and a pool of one 16-core node: the cluster, the pool's name and two
    free ports for the endpoint (HTTP, gRPC)."""
    install_crd(plane)
    cpu = f"{namespace}-cpu"
    make_node_pool(cpu, count=1, cpu="16")
    return Cluster(kube_api, plane, namespace), cpu, free_port(), free_port()


def _mlp(
    models: dict[str, Any],
    pool: str,
    ports: tuple[int, int],
    *,
    max_devices: int,
    memory_per_device: str | None = None,
    **serving: Any,
) -> dict[str, Any]:
    """The spec of a PlacedModel of the test MLP on `pool`'s 1-thread CPU devices, its endpoint
    on `ports` (HTTP, gRPC) with the other `serving` keys given."""
    devices: dict[str, Any] = {
        "name": pool,
        "kind": "cpu",
        "threadsPerDevice": 1,
        "maxDevices": max_devices,
    }
    if memory_per_device is not None:
        devices["memoryPerDevice"] = memory_per_device
    return {
        "model": {"uri": models["mlp"], "sha256": models["mlp_sha256"]},
        "pools": [devices],
        "serving": {"port": ports[0], "grpcPort": ports[1], **serving},
    }


def test_a_placed_model_profiles_deploys_and_serves_in_containers(
    scheduling_control_plane, kube_api, namespace, make_node_pool, kubelet, tmp_path
):
    plane = scheduling_control_plane
    cluster, cpu, http_port, grpc_port = _one_cpu_pool(plane, kube_api, namespace, make_node_pool)
    with models_for(tmp_path / "models") as models:
        # 32 KiB per device beside a stage server's fixed overhead cannot hold the model's
        # 64 KiB of weights: the plan must chain several stage servers.
        # Locked down: the chain by the operator's token, the endpoint by the clients'.
        ports = (http_port, grpc_port)
        spec = _mlp(
            models,
            cpu,
            ports,
            max_devices=4,
            memory_per_device=DEVICE_MEMORY,
            authTokenSecret="clients",
        )
        spec["profiling"] = {"mode": "measured"}
        token = "clients-ToKeN-0123456789"
        cluster.core.create_namespaced_secret(
            namespace, {"metadata": {"name": "clients"}, "stringData": {"token": token}}
        )
        bearer = f"Bearer {token}"
        with running_operator(plane, tmp_path / "cache"):
            profiled = in_thread(run_profiling_job, cluster, kubelet, "mlp")
            cluster.apply("mlp", spec)
            pod_spec = profiled()
            status = cluster.wait_phase("mlp", "Ready", timeout=120)
            wait_until("the profiling Job to be deleted", lambda: not cluster.profiling_jobs("mlp"))
        assert pod_spec["nodeSelector"] == {"moirai.dev/pool": cpu}
        assert status["placement"]["profiling"] == "measured"
        assert status["placement"]["devices"] >= 2

        pods = run_deployments(cluster, kubelet, "mlp")
        gateway = pods["mlp-gateway"]
        x = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
        (expected,) = ort.InferenceSession(str(models["path"])).run(["y"], {"x": x})

        for triton, endpoint_port in ((triton_http, http_port), (triton_grpc, grpc_port)):
            client = triton.InferenceServerClient(f"{gateway.ip}:{endpoint_port}")
            inputs = [triton.InferInput("x", [1, 64], "FP32")]
            inputs[0].set_data_from_numpy(x)
            # (a new dict each call: tritonclient's HTTP client adds its own headers to it)
            got = client.infer("mlp", inputs, headers={"authorization": bearer}).as_numpy("y")
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
            with pytest.raises(InferenceServerException, match="needs a token"):
                client.infer("mlp", inputs)

        # Every server ran as the pod specs say: user 10001 on a read-only root filesystem, with
        # the chain token of the PlacedModel's Secret (the chain served the requests above).
        secret = cluster.secret("mlp-chain-token")
        chain_token = base64.b64decode(secret.data["token"]).decode()
        for pod in pods.values():
            for container, docker_name in pod.containers.items():
                if container != "pause":
                    config = kubelet.inspect(docker_name)
                    assert config["Config"]["User"] == "10001:10001"
                    assert config["HostConfig"]["ReadonlyRootfs"] is True
                    env = dict(e.split("=", 1) for e in config["Config"]["Env"])
                    if container in ("stage-server", "gateway"):  # not the model's fetcher
                        assert env["MOIRAI_CHAIN_TOKEN"] == chain_token


class _HTTPSTo(http.client.HTTPSConnection):
    """HTTPS to `ip`, checking that the certificate is `name`'s (the Service's DNS name, which
    this host cannot resolve)."""

    def __init__(self, ip: str, name: str, port: int, context: ssl.SSLContext) -> None:
        super().__init__(name, port, timeout=30, context=context)
        self._ip, self._tls = ip, context

    def connect(self) -> None:
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock = self._tls.wrap_socket(sock, server_hostname=self.host)


def test_the_gateway_serves_tls_from_its_secret_in_a_container(
    scheduling_control_plane, kube_api, namespace, make_node_pool, kubelet, tmp_path
):
    """spec.serving.tlsSecret: the gateway container serves with the Secret's files mounted as
    its pod spec says (read-only, /etc/moirai/tls), its probes over HTTPS; an HTTPS request and
    a TLS gRPC request, checked against the CA for the gateway Service's name, answer as ONNX
    Runtime does; plaintext on either port is refused."""
    plane = scheduling_control_plane
    cluster, cpu, http_port, grpc_port = _one_cpu_pool(plane, kube_api, namespace, make_node_pool)
    service = f"mlp-gateway.{namespace}.svc"
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", f"/CN={service}"),
            *("-addext", f"subjectAltName=DNS:{service}"),
        ],
        check=True,
        capture_output=True,
    )
    cluster.core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "mlp-tls"},
            "type": "kubernetes.io/tls",
            "stringData": {"tls.crt": cert.read_text(), "tls.key": key.read_text()},
        },
    )
    with models_for(tmp_path / "models") as models:
        spec = _mlp(models, cpu, (http_port, grpc_port), max_devices=2, tlsSecret="mlp-tls")
        with running_operator(plane, tmp_path / "cache"):
            cluster.apply("mlp", spec)
            status = cluster.wait_phase("mlp", "Ready", timeout=120)
        assert status["endpoint"] == f"https://{service}:{http_port}"
        pods = run_deployments(cluster, kubelet, "mlp")  # ready: its HTTPS probe answered
        gateway = pods["mlp-gateway"]
        x = np.random.default_rng(2).standard_normal((1, 64)).astype(np.float32)
        (expected,) = ort.InferenceSession(str(models["path"])).run(["y"], {"x": x})

        trust = ssl.create_default_context(cafile=str(cert))
        connection = _HTTPSTo(gateway.ip, service, http_port, trust)
        body = {
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64], "data": x[0].tolist()}]
        }
        connection.request("POST", "/v2/models/mlp/infer", json.dumps(body))
        response = connection.getresponse()
        reply = json.loads(response.read())
        assert response.status == 200, reply
        got = np.asarray(reply["outputs"][0]["data"], dtype=np.float32).reshape(expected.shape)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        connection.close()

        secure = triton_grpc.InferenceServerClient(
            f"{gateway.ip}:{grpc_port}",
            ssl=True,
            root_certificates=str(cert),
            channel_args=[("grpc.ssl_target_name_override", service)],
        )
        inputs = [triton_grpc.InferInput("x", [1, 64], "FP32")]
        inputs[0].set_data_from_numpy(x)
        got = secure.infer("mlp", inputs).as_numpy("y")
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)

        # Plaintext is refused on both ports.
        with pytest.raises((OSError, http.client.HTTPException)):
            urllib.request.urlopen(f"http://{gateway.ip}:{http_port}/v2/health/ready", timeout=10)
        plain = triton_grpc.InferenceServerClient(f"{gateway.ip}:{grpc_port}")
        with pytest.raises(InferenceServerException) as e:
            plain.infer("mlp", inputs, client_timeout=10)
        assert e.value.status() == "StatusCode.UNAVAILABLE"

        # The Secret's files as the pod spec mounts them: read-only, where the flags point.
        config = kubelet.inspect(gateway.containers["gateway"])
        (mount,) = [m for m in config["Mounts"] if m["Destination"] == "/etc/moirai/tls"]
        assert mount["RW"] is False
        assert "--tls-cert-file" in json.dumps(config["Config"])


def _in_flight_load(
    url: str, model: Path, stop: threading.Event, results: list[tuple[float, float, str]]
) -> None:
    """One client: requests back to back until `stop`; each result (start, end, outcome), the
    outcome "ok", "WRONG" or the gRPC status of a failure."""
    session = ort.InferenceSession(str(model))
    client = triton_grpc.InferenceServerClient(url)
    rng = np.random.default_rng()
    while not stop.is_set():
        x = rng.standard_normal((1, 64)).astype(np.float32)
        inputs = [triton_grpc.InferInput("x", [1, 64], "FP32")]
        inputs[0].set_data_from_numpy(x)
        start = time.monotonic()
        try:
            got = client.infer("mlp", inputs, client_timeout=30).as_numpy("y")
        except InferenceServerException as e:
            results.append((start, time.monotonic(), str(e.status())))
            continue
        (expected,) = session.run(["y"], {"x": x})
        ok = np.allclose(got, expected, rtol=1e-5, atol=1e-6)
        results.append((start, time.monotonic(), "ok" if ok else "WRONG"))


def _metric(url: str, name: str, **labels: str) -> float | None:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        for family in text_string_to_metric_families(response.read().decode()):
            for sample in family.samples:
                if sample.name == name and labels.items() <= sample.labels.items():
                    return sample.value
    return None


def test_two_lanes_lose_only_the_requests_in_flight_on_a_killed_stage_server(
    scheduling_control_plane, kube_api, namespace, make_node_pool, kubelet, tmp_path
):
    """2 lanes, 8 requests in flight; one stage container of lane 1 killed: no wrong answer,
    failures (UNAVAILABLE) only for requests in flight then, lane 0 serves meanwhile, and the
    lane serves again once Docker has restarted the container (as the kubelet would)."""
    plane = scheduling_control_plane
    cluster, cpu, http_port, grpc_port = _one_cpu_pool(plane, kube_api, namespace, make_node_pool)
    with models_for(tmp_path / "models") as models:
        ports = (http_port, grpc_port)
        # DEVICE_MEMORY: a chain of stage servers in each lane
        spec = _mlp(models, cpu, ports, max_devices=4, memory_per_device=DEVICE_MEMORY, replicas=2)
        with running_operator(plane, tmp_path / "cache"):
            cluster.apply("mlp", spec)
            status = cluster.wait_phase("mlp", "Ready", timeout=120)
        assert status["replicas"] == 2
        pods = run_deployments(cluster, kubelet, "mlp")
        gateway = pods["mlp-gateway"]
        metrics = f"http://{gateway.ip}:{gateway.port('metrics')}"  # not on the HTTP port
        lane1 = sorted(name for name in pods if name.endswith("-l1"))
        assert len(lane1) >= 2 and len(pods) == 2 * len(lane1) + 1
        victim = pods[lane1[-1]]
        device = victim.labels["moirai.dev/device"]
        # The gateway is ready with one lane up; the other's health watch may lag its pods.
        devices = [pod.labels["moirai.dev/device"] for n, pod in pods.items() if n != "mlp-gateway"]
        wait_until(
            "the gateway to see every stage server up",
            lambda: all(_metric(metrics, "moirai_stage_server_up", device=d) == 1 for d in devices),
            timeout=60,
        )

        stop = threading.Event()
        results: list[tuple[float, float, str]] = []
        clients = [
            threading.Thread(
                target=_in_flight_load,
                args=(f"{gateway.ip}:{grpc_port}", models["path"], stop, results),
            )
            for _ in range(8)
        ]
        for c in clients:
            c.start()
        try:
            wait_until("both lanes to serve", lambda: len(results) >= 200, timeout=60)
            served = _metric(metrics, "moirai_stage_seconds_count", device=device, kind="compute")
            assert served, f"lane 1 ({device}) served nothing while both lanes were up"
            killed = time.monotonic()
            kubelet.crash(victim, "stage-server")
            wait_until(
                "the gateway to see the stage server die",
                lambda: _metric(metrics, "moirai_stage_server_up", device=device) == 0,
                timeout=30,
            )
            down = time.monotonic()
            wait_until(
                "the stage server to be restarted and seen up",
                lambda: _metric(metrics, "moirai_stage_server_up", device=device) == 1,
                timeout=120,
            )
            back = time.monotonic()
            count = _metric(metrics, "moirai_stage_seconds_count", device=device, kind="compute")
            wait_until(
                "lane 1 to serve again",
                lambda: (
                    _metric(metrics, "moirai_stage_seconds_count", device=device, kind="compute")
                    > (count or 0)
                ),
                timeout=30,
            )
            time.sleep(2.5)  # two full seconds of both lanes, for the figures below
        finally:
            stop.set()
            for c in clients:
                c.join(timeout=60)
    outcomes = [outcome for _, _, outcome in results]
    failed = [(start, outcome) for start, _, outcome in results if outcome != "ok"]
    assert "WRONG" not in outcomes
    # Only requests in flight when the server died fail (at most the 8 clients' one each),
    # with UNAVAILABLE; once the gateway has seen it die, lane 0 serves every request.
    assert len(failed) <= 8, failed
    assert all(o == "StatusCode.UNAVAILABLE" for _, o in failed), failed
    assert all(start < killed + 1.0 for start, _ in failed), failed
    during = [o for s, e, o in results if down < s and e < back]
    assert during and set(during) == {"ok"}
    windows = [
        sum(1 for s, e, o in results if o == "ok" and t <= e < t + 1)
        for t in (killed - 2, killed - 1, back, back + 1)
    ]
    print(
        f"\nfailover: {len(failed)} failed of {len(results)}; lane back {back - killed:.1f}s "
        f"after the kill; answers per second before {windows[:2]}, after {windows[2:]}"
    )
