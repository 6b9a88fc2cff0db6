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

import numpy as np
import onnxruntime as ort
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
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


def test_a_placed_model_profiles_deploys_and_serves_in_containers(
    scheduling_control_plane, kube_api, namespace, make_node_pool, kubelet, tmp_path
):
    plane = scheduling_control_plane
    install_crd(plane)
    cpu = f"{namespace}-cpu"
    make_node_pool(cpu, count=1, cpu="16")
    cluster = Cluster(kube_api, plane, namespace)
    http_port, grpc_port = free_port(), free_port()
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
            "profiling": {"mode": "measured"},
            "serving": {"port": http_port, "grpcPort": grpc_port},
        }
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

        http = triton_http.InferenceServerClient(f"{gateway.ip}:{http_port}")
        inputs = [triton_http.InferInput("x", [1, 64], "FP32")]
        inputs[0].set_data_from_numpy(x)
        got = http.infer("mlp", inputs).as_numpy("y")
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)

        grpc_client = triton_grpc.InferenceServerClient(f"{gateway.ip}:{grpc_port}")
        inputs = [triton_grpc.InferInput("x", [1, 64], "FP32")]
        inputs[0].set_data_from_numpy(x)
        got = grpc_client.infer("mlp", inputs).as_numpy("y")
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)

        # Every server ran as the pod specs say: user 10001 on a read-only root filesystem.
        for pod in pods.values():
            for container, docker_name in pod.containers.items():
                if container != "pause":
                    config = kubelet.inspect(docker_name)
                    assert config["Config"]["User"] == "10001:10001"
                    assert config["HostConfig"]["ReadonlyRootfs"] is True
