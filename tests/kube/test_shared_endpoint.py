"""The shared endpoint (`moirai_operator.endpoint`, the chart's `sharedEndpoint`) against a real
API server, running as the chart's ServiceAccount with exactly the chart's RBAC for it.

Two PlacedModels, each served by a real gateway on loopback (a `LocalDeployment`: what a
PlacedModel's gateway Service is in a cluster), are given their status endpoint as the
operator writes it, but pointing to loopback (no cluster DNS here). The endpoint, started as its
pod runs it, lists them from the API server and routes by model name over real sockets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from test_chart_install import IDENTITY, apply_all, render, rules_of
from test_operator_harness import install_crd, write_mlp

from moirai.partition import build_plan
from moirai.runtime.local import LocalDeployment, free_ports
from moirai.stageplan import DeviceSpec
from stage_server.client import InferenceClient
from stage_server.settings import EndpointConfig

pytestmark = pytest.mark.timeout(300)
ENDPOINT = "moirai-endpoint"  # the chart's names for release "moirai"


def _one_stage(
    path: Path, name: str, token: str | None = None, tls: tuple[Path, Path] | None = None
) -> LocalDeployment:
    """A gateway of one stage serving `path` as `name`, behind `token` when given, over TLS
    only with `tls` (certificate, key) when given."""
    endpoint = EndpointConfig()
    if token is not None:
        token_file = path.parent / f"{name}.token"
        token_file.write_text(token)
        endpoint = EndpointConfig(auth_token=token, auth_token_file=str(token_file))
    if tls is not None:
        endpoint = dataclasses.replace(
            endpoint, tls_cert_file=str(tls[0]), tls_key_file=str(tls[1])
        )
    model = onnx.load(path)
    plan = build_plan(
        model, {n.name: "cpu-0" for n in model.graph.node}, [DeviceSpec("cpu-0", threads=1)]
    )
    return LocalDeployment(
        dataclasses.replace(plan, model_name=name),
        path,
        path.parent / f"run-{name}",
        pin_cores=False,
        endpoint=endpoint,
    )


def _get(url: str) -> tuple[int, dict | list]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _index_entries(url: str) -> dict[str, dict[str, str]]:
    request = urllib.request.Request(f"{url}/v2/repository/index", method="POST")
    with urllib.request.urlopen(request, timeout=10) as r:
        return {m["name"]: m for m in json.loads(r.read())}


def _index(url: str) -> dict[str, str]:
    return {name: m["state"] for name, m in _index_entries(url).items()}


def _until(condition, what: str, timeout_s: float = 60.0) -> None:
    """Until `condition()` holds; refused connections count as not yet (a server starting)."""
    end = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(ConnectionError, urllib.error.URLError):
            if condition():
                return
        assert time.monotonic() < end, f"not {what} within {timeout_s} s"
        time.sleep(0.2)


def _kubeconfig_of(plane, namespace: str, account: str, path: Path) -> Path:
    token = plane.kubectl("create", "token", account, "-n", namespace).strip()
    kubeconfig = yaml.safe_load(plane.kubeconfig.read_text())
    kubeconfig["users"] = [{"name": account, "user": {"token": token}}]
    for context in kubeconfig["contexts"]:
        context["context"]["user"] = account
    path.write_text(yaml.safe_dump(kubeconfig))
    return path


@contextlib.contextmanager
def _endpoint(kubeconfig: Path, namespace: str, log: Path) -> Iterator[tuple[str, str]]:
    """The shared endpoint as its pod runs it (the chart's command), on loopback."""
    grpc_port, http_port = free_ports(2)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moirai_operator.endpoint", f"--namespace={namespace}",
             "--host=127.0.0.1", f"--grpc-port={grpc_port}", f"--http-port={http_port}",
             "--refresh-seconds=0.5"],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "KUBECONFIG": str(kubeconfig)},
        )  # fmt: skip
    try:
        yield f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}"
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0, log.read_text()[-2000:]


def _placed_model(
    plane, namespace: str, name: str, grpc_port: int, http_port: int, ca: str | None = None
) -> None:
    """A PlacedModel whose status is what the operator writes once its gateway, on loopback
    here, is deployed; served over TLS with `ca`, the trust root the operator publishes."""
    serving: dict = {"port": http_port, "grpcPort": grpc_port}
    if ca is not None:
        serving["tlsSecret"] = f"{name}-tls"
    body = {
        "apiVersion": "moirai.dev/v1alpha1",
        "kind": "PlacedModel",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"uri": f"/models/{name}.onnx"},
            "pools": [{"name": "cpu", "kind": "cpu"}],
            "serving": serving,
        },
    }
    plane.kubectl("apply", "--server-side", "-f", "-", stdin=json.dumps(body))
    # What the operator writes once the model is deployed (there `http[s]://<name>-gateway.
    # <ns>.svc:<port>`; here the gateway's loopback address) and, with TLS, status.gatewayCA.
    scheme = "https" if ca is not None else "http"
    status: dict = {"status": {"endpoint": f"{scheme}://127.0.0.1:{http_port}"}}
    if ca is not None:
        status["status"]["gatewayCA"] = ca
    plane.kubectl(
        "patch", "placedmodel", name, "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps(status),
    )  # fmt: skip


def _mlps(
    tmp_path: Path, rng: int, **models: tuple[int, int, int]
) -> tuple[dict[str, Path], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """MLP files in `tmp_path` (name → width, layers, seed); each one's input (drawn from a
    generator seeded `rng`) and ONNX Runtime's answer to it."""
    paths = {
        name: write_mlp(tmp_path / f"{name}.onnx", hidden=width, layers=layers, seed=seed)
        for name, (width, layers, seed) in models.items()
    }
    x = {
        name: np.random.default_rng(rng).standard_normal((1, width)).astype(np.float32)
        for name, (width, _, _) in models.items()
    }
    want = {
        name: ort.InferenceSession(str(path)).run(None, {"x": x[name]})[0]
        for name, path in paths.items()
    }
    return paths, x, want


def _as_the_endpoint(plane, namespace: str, tmp_path: Path) -> Path:
    """A kubeconfig of the chart's ServiceAccount for the shared endpoint, with exactly the
    chart's RBAC for it (list PlacedModels; no Secret, no ConfigMap) applied."""
    manifests = render(plane, namespace, "--set", "sharedEndpoint.enabled=true")
    identity = [
        d
        for d in yaml.safe_load_all(manifests)
        if d and d["kind"] in IDENTITY and d["metadata"]["name"] == ENDPOINT
    ]
    assert {d["kind"] for d in identity} == {"ServiceAccount", "Role", "RoleBinding"}
    assert rules_of(yaml.safe_dump_all(identity)) == {("moirai.dev", "placedmodels", "list")}
    apply_all(plane, identity)
    return _kubeconfig_of(plane, namespace, ENDPOINT, tmp_path / "endpoint.kubeconfig")


def test_the_shared_endpoint_routes_by_model_name_with_the_charts_rbac(
    control_plane, namespace, tmp_path
) -> None:
    plane = control_plane
    install_crd(plane)
    kubeconfig = _as_the_endpoint(plane, namespace, tmp_path)
    paths, x, want = _mlps(tmp_path, 3, alpha=(32, 2, 1), beta=(48, 3, 2))
    alpha, beta = _one_stage(paths["alpha"], "alpha"), _one_stage(paths["beta"], "beta")
    with alpha, beta:
        for name, gateway in (("alpha", alpha), ("beta", beta)):
            _placed_model(plane, namespace, name, gateway.grpc_port, gateway.http_port)
        with (
            _endpoint(kubeconfig, namespace, tmp_path / "endpoint.log") as (grpc_url, http_url),
            InferenceClient(grpc_url) as client,
        ):
            _until(lambda: _index(http_url) == {"alpha": "READY", "beta": "READY"}, "both ready")
            assert _get(f"{http_url}/v2/models") == (200, {"models": ["alpha", "beta"]})
            for name in ("alpha", "beta"):
                got = client.infer(name, {"x": x[name]})["y"]
                np.testing.assert_allclose(got, want[name], rtol=1e-5, atol=1e-6)
                status, metadata = _get(f"{http_url}/v2/models/{name}")
                assert status == 200 and metadata["name"] == name
                assert metadata["inputs"] == [
                    {"name": "x", "datatype": "FP32", "shape": [1, x[name].shape[1]]}
                ]
            with pytest.raises(grpc.RpcError) as e:
                client.infer("gamma", {"x": x["alpha"]})
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            assert "this endpoint serves 'alpha', 'beta'" in (e.value.details() or "")

            alpha.stop()  # alpha's gateway goes away: only alpha is not ready
            _until(lambda: _index(http_url)["alpha"] == "UNAVAILABLE", "alpha unavailable")
            assert _get(f"{http_url}/v2/models/alpha/ready")[0] == 503
            assert _get(f"{http_url}/v2/models/beta/ready")[0] == 200
            with pytest.raises(grpc.RpcError) as e:
                client.infer("alpha", {"x": x["alpha"]})
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            got = client.infer("beta", {"x": x["beta"]})["y"]
            np.testing.assert_allclose(got, want["beta"], rtol=1e-5, atol=1e-6)

            plane.kubectl("delete", "placedmodel", "beta", "-n", namespace)
            _until(lambda: _get(f"{http_url}/v2/models")[1] == {"models": ["alpha"]}, "beta gone")


def _http(url: str, body: dict | None = None, token: str | None = None) -> tuple[int, dict]:
    """GET `url`, or POST `body` as JSON, with `Authorization: Bearer token` when given."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_shared_endpoint_passes_the_clients_token_on(
    control_plane, namespace, tmp_path
) -> None:
    """A PlacedModel behind an endpoint token (`spec.serving.authTokenSecret`): ready in the
    shared endpoint's index, though it holds no token; the client's own `authorization` goes on
    to the model's gateway over gRPC and HTTP, which answers with the token and refuses
    without it (or with another), as on the model's own Service."""
    plane = control_plane
    install_crd(plane)
    token = "s3cret-token"
    path = write_mlp(tmp_path / "guarded.onnx", hidden=32, layers=2, seed=4)
    x = np.random.default_rng(5).standard_normal((1, 32)).astype(np.float32)
    want = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 32], "data": x[0].tolist()}]}
    kubeconfig = plane.kubeconfig  # the RBAC is the test above's
    with _one_stage(path, "guarded", token) as gateway:
        _placed_model(plane, namespace, "guarded", gateway.grpc_port, gateway.http_port)
        with (
            _endpoint(kubeconfig, namespace, tmp_path / "endpoint.log") as (grpc_url, http_url),
            InferenceClient(grpc_url, token=token) as client,
            InferenceClient(grpc_url) as stranger,
            InferenceClient(grpc_url, token="guess") as guesser,
        ):
            _until(lambda: _index(http_url) == {"guarded": "READY"}, "ready")
            np.testing.assert_allclose(
                client.infer("guarded", {"x": x})["y"], want, rtol=1e-5, atol=1e-6
            )
            assert [t.name for t in client.metadata("guarded").inputs] == ["x"]
            for other in (stranger, guesser):
                with pytest.raises(grpc.RpcError) as infer_error:
                    other.infer("guarded", {"x": x})
                with pytest.raises(grpc.RpcError) as metadata_error:
                    other.metadata("guarded")
                for e in (infer_error, metadata_error):
                    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                    assert "needs a token" in (e.value.details() or "")

            infer = f"{http_url}/v2/models/guarded/infer"
            status, reply = _http(infer, body, token)
            assert status == 200, reply
            got = np.asarray(reply["outputs"][0]["data"], dtype=np.float32).reshape(want.shape)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
            status, metadata = _http(f"{http_url}/v2/models/guarded", token=token)
            assert status == 200 and metadata["inputs"][0]["name"] == "x"
            for given in (None, "guess"):
                assert _http(infer, body, given)[0] == 401
                assert _http(f"{http_url}/v2/models/guarded", token=given)[0] == 401


def _certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for the DNS name `name`, and its key (what `kubectl create
    secret tls` would be given)."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "tls.crt", directory / "tls.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}"),
            *("-addext", f"subjectAltName=DNS:{name}"),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def _patch_ca(plane, namespace: str, name: str, ca: str | None) -> None:
    status = {"status": {"gatewayCA": ca}}
    plane.kubectl(
        "patch", "placedmodel", name, "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps(status),
    )  # fmt: skip


def test_the_shared_endpoint_calls_a_tls_gateway_verified_with_its_published_trust_root(
    control_plane, namespace, tmp_path
) -> None:
    """A PlacedModel with spec.serving.tlsSecret: its gateway serves TLS only, with a
    certificate for its Service's DNS name. The shared endpoint, with the chart's RBAC (no
    Secret), verifies it with status.gatewayCA and that name, though it dials loopback, and
    answers as ONNX Runtime over gRPC and HTTP. A wrong trust root, a missing one, and one
    whose certificate lacks the name: that model not ready, saying why in one line, its
    requests UNAVAILABLE / 503; a plaintext model beside it keeps answering. The right trust
    root again: ready again."""
    plane = control_plane
    install_crd(plane)
    kubeconfig = _as_the_endpoint(plane, namespace, tmp_path)
    service = f"secure-gateway.{namespace}.svc"
    cert, key = _certificate(tmp_path / "secure", service)
    stranger, _ = _certificate(tmp_path / "stranger", service)  # same name, another key
    paths, x, want = _mlps(tmp_path, 8, secure=(32, 2, 6), plain=(48, 2, 7))
    body = {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [1, 32], "data": x["secure"][0].tolist()}
        ]
    }
    secure = _one_stage(paths["secure"], "secure", tls=(cert, key))
    plain = _one_stage(paths["plain"], "plain")
    with secure, plain:
        _placed_model(
            plane, namespace, "secure", secure.grpc_port, secure.http_port, cert.read_text()
        )
        _placed_model(plane, namespace, "plain", plain.grpc_port, plain.http_port)
        with (
            _endpoint(kubeconfig, namespace, tmp_path / "endpoint.log") as (grpc_url, http_url),
            InferenceClient(grpc_url) as client,
        ):
            both = {"secure": "READY", "plain": "READY"}
            _until(lambda: _index(http_url) == both, "both ready")
            got = client.infer("secure", {"x": x["secure"]})["y"]
            np.testing.assert_allclose(got, want["secure"], rtol=1e-5, atol=1e-6)
            status, reply = _http(f"{http_url}/v2/models/secure/infer", body)
            assert status == 200, reply
            got = np.asarray(reply["outputs"][0]["data"], dtype=np.float32).reshape((1, -1))
            np.testing.assert_allclose(got, want["secure"], rtol=1e-5, atol=1e-6)
            status, metadata = _http(f"{http_url}/v2/models/secure")
            assert status == 200 and metadata["inputs"][0]["shape"] == [1, 32]

            def refused(name: str, said: str) -> None:
                """`name` listed not ready, saying `said` in one line; its requests refused
                over gRPC and HTTP; the plaintext model unharmed."""

                def says() -> bool:
                    entry = _index_entries(http_url).get(name, {})  # listed at a refresh
                    return entry.get("state") == "UNAVAILABLE" and said in entry["reason"]

                _until(says, f"{name} unavailable: {said}")
                reason = _index_entries(http_url)[name]["reason"]
                assert "\n" not in reason and len(reason) < 600, reason
                with pytest.raises(grpc.RpcError) as e:
                    client.infer(name, {"x": x["secure"]})
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
                assert said in (e.value.details() or ""), e.value.details()
                status, error = _http(f"{http_url}/v2/models/{name}/infer", body)
                assert status == 503 and said in error["error"], error
                assert _get(f"{http_url}/v2/models/{name}/ready")[0] == 503
                got = client.infer("plain", {"x": x["plain"]})["y"]
                np.testing.assert_allclose(got, want["plain"], rtol=1e-5, atol=1e-6)
                assert _index(http_url)["plain"] == "READY"

            # A trust root that did not sign its certificate (same name, another key).
            _patch_ca(plane, namespace, "secure", stranger.read_text())
            refused("secure", "failed the TLS check: its certificate must be signed by")
            refused("secure", f"carry the DNS name {service}")
            # No trust root: never called unverified.
            _patch_ca(plane, namespace, "secure", None)
            refused("secure", "status.gatewayCA (the trust root the operator publishes")
            # The right trust root, but a certificate without the Service's name: a PlacedModel
            # "twin" whose status points at the same gateway.
            _placed_model(
                plane, namespace, "twin", secure.grpc_port, secure.http_port, cert.read_text()
            )
            refused("twin", f"carry the DNS name twin-gateway.{namespace}.svc")
            _patch_ca(plane, namespace, "secure", cert.read_text())
            plane.kubectl("delete", "placedmodel", "twin", "-n", namespace)
            _until(lambda: _index(http_url) == both, "ready again")
            got = client.infer("secure", {"x": x["secure"]})["y"]
            np.testing.assert_allclose(got, want["secure"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scope", ["namespaces", "cluster-wide"])
def test_the_chart_with_the_shared_endpoint_passes_server_side_dry_run(
    control_plane, namespace, scope
) -> None:
    values = ["--set", "sharedEndpoint.enabled=true"]
    if scope == "cluster-wide":
        values += ["--set", "watchAllNamespaces=true"]
    manifests = render(control_plane, namespace, *values, crds=True)
    out = control_plane.kubectl(
        "apply", "--dry-run=server", "--server-side", "-f", "-", stdin=manifests
    )
    assert f"deployment.apps/{ENDPOINT} serverside-applied (server dry run)" in out
    assert f"service/{ENDPOINT} serverside-applied (server dry run)" in out
