"""The endpoint over TLS, over real sockets: with a certificate and its key, gRPC and HTTP
answer TLS clients that trust it and no plaintext ones; `moirai serve`'s processes start and
report ready behind it; bad files are one line. The certificate is made by `openssl`."""

from __future__ import annotations

import json
import ssl
import subprocess
from pathlib import Path

import aiohttp
import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from moirai.errors import MoiraiError
from moirai.runtime.local import LocalDeployment
from stage_server.client import AsyncInferenceClient, InferenceClient
from stage_server.settings import EndpointConfig

from . import models
from .conftest import split_plan

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def _endpoint(certificate: tuple[Path, Path]) -> EndpointConfig:
    cert, key = certificate
    return EndpointConfig(tls_cert_file=str(cert), tls_key_file=str(key))


def _reference(model: onnx.ModelProto, x: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString()).run(None, x)[0]


async def test_grpc_and_http_answer_only_over_tls(cluster, certificate) -> None:
    model = models.mlp()
    c = await cluster(model, split_plan(model, 2), endpoint=_endpoint(certificate))
    x = models.random_inputs(model)
    want = _reference(model, x)
    trusted = AsyncInferenceClient(c.grpc_url, tls_ca=certificate[0].read_bytes())
    got = (await trusted.infer("mlp", x))["y"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    await trusted.close()
    plain = AsyncInferenceClient(c.grpc_url)
    with pytest.raises(grpc.RpcError) as e:
        await plain.infer("mlp", x, timeout_s=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    await plain.close()
    entry = {"name": "x", "shape": list(x["x"].shape), "datatype": "FP32"}
    body = json.dumps({"inputs": [{**entry, "data": x["x"].ravel().tolist()}]}).encode()
    context = ssl.create_default_context(cafile=str(certificate[0]))
    async with aiohttp.ClientSession() as http:
        url = f"https://{c.http_url}/v2/models/mlp/infer"
        async with http.post(url, data=body, ssl=context) as r:
            assert r.status == 200
            got = np.array((await r.json())["outputs"][0]["data"], np.float32)
        np.testing.assert_allclose(got, want.ravel(), rtol=1e-5, atol=1e-6)
        with pytest.raises(aiohttp.ClientError):
            async with http.post(f"http://{c.http_url}/v2/models/mlp/infer", data=body) as r:
                await r.read()


def test_serve_processes_start_behind_tls(tmp_path: Path, certificate) -> None:
    """`LocalDeployment` (what `moirai serve` runs) hands the files to its front end and waits
    for it over HTTPS."""
    model = models.mlp()
    path = tmp_path / "mlp.onnx"
    onnx.save(model, path)
    x = models.random_inputs(model)
    plan = split_plan(model, 2)
    deployment = LocalDeployment(plan, path, tmp_path / "run", endpoint=_endpoint(certificate))
    trusted = certificate[0].read_bytes()
    with deployment, InferenceClient(deployment.grpc_url, tls_ca=trusted) as client:
        np.testing.assert_allclose(
            client.infer("mlp", x)["y"], _reference(model, x), rtol=1e-5, atol=1e-6
        )


def test_bad_tls_settings_are_one_line(tmp_path: Path, certificate) -> None:
    cert, key = certificate
    with pytest.raises(MoiraiError, match="--tls-cert-file and --tls-key-file go together"):
        EndpointConfig(tls_cert_file=str(cert))
    text = tmp_path / "not.pem"
    text.write_text("hello\n")
    with pytest.raises(MoiraiError, match=r"--tls-key-file .*not.pem: not a PEM file"):
        EndpointConfig(tls_cert_file=str(cert), tls_key_file=str(text)).tls_files()
    with pytest.raises(MoiraiError, match=r"--tls-cert-file .*missing.pem: cannot read it"):
        EndpointConfig(
            tls_cert_file=str(tmp_path / "missing.pem"), tls_key_file=str(key)
        ).tls_files()
