"""Several models from one `moirai serve`-style deployment, as real processes: each model's
stage servers and one front end of its own, answers checked against single-process ONNX
Runtime; `moirai serve` with several models, a folder of models, and what it refuses."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from moirai.cli import main
from moirai.runtime.local import LocalDeployment, LocalModel, free_ports
from moirai.stageplan import StagePlan
from stage_server.batchconfig import BatchingConfig
from stage_server.client import InferenceClient

from . import models
from .conftest import split_plan
from .test_processes import alive, cmdline

pytestmark = pytest.mark.timeout(240)


def _ort(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in model.graph.output]
    return dict(zip(names, session.run(names, inputs), strict=True))


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _until(condition, what: str, timeout_s: float = 30.0) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, f"not {what} within {timeout_s} s"
        time.sleep(0.1)


def test_two_models_as_processes_one_stage_server_dying_fails_only_its_model(
    tmp_path: Path,
) -> None:
    """Two different models, each split over two stage servers, behind one front end process:
    both answer as ONNX Runtime; a stage server of one killed makes only that model not ready
    (its requests UNAVAILABLE, the other model still answering); restarted, it serves again."""
    mlp, cnn = models.mlp(width=32, depth=4), models.cnn(size=8)
    onnx.save(mlp, tmp_path / "mlp.onnx")
    onnx.save(cnn, tmp_path / "cnn.onnx")
    x, images = models.random_inputs(mlp), {"images": np.ones((2, 3, 8, 8), np.float32)}
    deployment = LocalDeployment(
        split_plan(mlp, 2),
        tmp_path / "mlp.onnx",
        tmp_path / "run",
        pin_cores=False,
        more=(LocalModel(split_plan(cnn, 2), tmp_path / "cnn.onnx", BatchingConfig(4)),),
    )
    with deployment, InferenceClient(deployment.grpc_url) as client:
        assert deployment.entries == ()
        assert set(deployment.processes) == {
            "mlp/cpu-0", "mlp/cpu-1", "cnn/cpu-0", "cnn/cpu-1", "gateway",
        }  # fmt: skip
        front = cmdline(str(deployment.pids["gateway"]))
        assert "--max-batch-size cnn=4" in front and front.count("--plan") == 2
        # Both models' stage servers run on the same cores: their threads must not spin.
        assert "--no-spin" in cmdline(str(deployment.pids["cnn/cpu-0"]))
        assert StagePlan.load(tmp_path / "run" / "cnn" / "plan.json").model_name == "cnn"
        np.testing.assert_allclose(client.infer("mlp", x)["y"], _ort(mlp, x)["y"], rtol=1e-5)
        got = client.infer("cnn", images)
        for name, want in _ort(cnn, images).items():
            np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-6)
        http = f"http://{deployment.http_url}"
        assert _get(f"{http}/v2/models") == (200, {"models": ["mlp", "cnn"]})

        deployment.kill("mlp/cpu-1")
        _until(lambda: _get(f"{http}/v2/models/mlp/ready")[0] == 503, "mlp not ready")
        assert _get(f"{http}/v2/models/cnn/ready")[0] == 200
        assert not client.ready()
        with pytest.raises(grpc.RpcError) as e:
            client.infer("mlp", x)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        np.testing.assert_allclose(client.infer("cnn", images)["probs"], _ort(cnn, images)["probs"],
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
        deployment.restart("mlp/cpu-1")
        deployment.wait_ready(120.0)
        np.testing.assert_allclose(client.infer("mlp", x)["y"], _ort(mlp, x)["y"], rtol=1e-5)
    assert not any(alive(pid) for pid in deployment.pids.values())


def test_serve_a_folder_of_models_prints_the_memory_split_and_stops_cleanly(
    tmp_path: Path,
) -> None:
    """`moirai serve FOLDER` (a model file and a model in a sub-folder of its own): both
    planned on the same two devices, the memory split printed in one line, both served by name
    and equal to ONNX Runtime, an unknown model refused naming them; SIGTERM stops every
    process."""
    mlp, branchy = models.mlp(width=32, depth=4), models.branchy()
    folder = tmp_path / "models"
    (folder / "branches").mkdir(parents=True)
    onnx.save(mlp, folder / "chain.onnx")
    onnx.save(branchy, folder / "branches" / "model.onnx")
    (folder / "notes.txt").write_text("not a model\n")
    grpc_port, http_port = free_ports(2)
    serve = subprocess.Popen(
        [sys.executable, "-m", "moirai", "serve", str(folder), "--cpu-devices", "2",
         "--profile", "analytic", "--time-limit", "2", "--grpc-port", str(grpc_port),
         "--http-port", str(http_port), "--workdir", str(tmp_path / "run")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    children: list[str] = []
    try:
        lines = []
        assert serve.stdout is not None
        for line in serve.stdout:
            lines.append(line)
            if line.startswith("serving") or serve.poll() is not None:
                break
        assert lines[-1].startswith("serving branches, chain:"), lines
        memory = [line for line in lines if line.startswith("memory (each CPU stage server")]
        assert len(memory) == 1 and "cpu-0 (" in memory[0] and "cpu-1 (" in memory[0], lines
        assert sum(line.startswith("model ") for line in lines) == 2, lines
        with InferenceClient(f"127.0.0.1:{grpc_port}") as client:
            for name, model in (("chain", mlp), ("branches", branchy)):
                inputs = models.random_inputs(model, seed=4)
                got = client.infer(name, inputs)
                for output, want in _ort(model, inputs).items():
                    np.testing.assert_allclose(got[output], want, rtol=1e-5, atol=1e-6)
            with pytest.raises(grpc.RpcError) as e:
                client.infer("model", models.random_inputs(mlp))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            assert "this endpoint serves 'branches', 'chain'" in (e.value.details() or "")
        children = subprocess.run(
            ["pgrep", "-P", str(serve.pid)], capture_output=True, text=True
        ).stdout.split()
        fronts = [pid for pid in children if " gateway " in cmdline(pid)]
        assert len(fronts) == 1
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=30)
    assert serve.returncode == 0
    assert not any(alive(int(pid)) for pid in children)


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moirai: "), err
    return err[0]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--max-batch-size", "c=8"], "--max-batch-size c=8: no model 'c' is served here"),
        (["--max-batch-size", "a=x"], "--max-batch-size a=x: give a whole number"),
        (["--input-shape", "x=1x64"], "--input-shape x=1x64: serving several models, name the"),
        (["--input-shape", "c:x=1x64"], "--input-shape c:x=1x64: no model 'c' is served"),
        (["--max-batch-size", "a=8"], "model 'a' input 'x' has a fixed first dimension (1)"),
    ],
)
def test_serve_refuses_what_makes_no_sense_for_several_models(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], needle: str
) -> None:
    for name in ("a", "b"):
        onnx.save(models.mlp(width=8, depth=1), tmp_path / f"{name}.onnx")
    grpc_port, http_port = free_ports(2)
    argv = [
        "serve", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"), "--profile", "analytic",
        "--time-limit", "1", "--grpc-port", str(grpc_port), "--http-port", str(http_port), *extra,
    ]  # fmt: skip
    assert needle in one_line_error(capsys, argv)


def test_serve_refuses_two_models_of_one_name_and_names_that_no_url_takes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "x").mkdir()
    for path in (tmp_path / "m.onnx", tmp_path / "x" / "m.onnx", tmp_path / "a b.onnx"):
        onnx.save(models.mlp(width=8, depth=1), path)
    first, second = tmp_path / "m.onnx", tmp_path / "x" / "m.onnx"
    line = one_line_error(capsys, ["serve", str(first), str(second)])
    assert f"{first} and {second} are both model 'm': give one another name, e.g. m-2=" in line
    line = one_line_error(capsys, ["serve", str(tmp_path / "a b.onnx")])
    assert "'a b' cannot name a model in a URL: give NAME=" in line
    line = one_line_error(capsys, ["serve", str(tmp_path / "x" / "none")])
    assert "none: no such model file or folder" in line
    (tmp_path / "empty").mkdir()
    line = one_line_error(capsys, ["serve", str(tmp_path / "empty")])
    assert "no model in this folder" in line


def test_serve_refuses_models_that_fit_only_apart_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A device with room for two stage servers and 2.5 MiB of tasks: a model of 2 MiB and one
    of 1 MiB each serve alone (planned here), together they are refused before anything starts,
    in one line that says how the memory was split."""
    from moirai.devices import load_devices
    from moirai.planning import plan_model
    from moirai.sessions import STAGE_SERVER_OVERHEAD_BYTES

    memory = 2 * STAGE_SERVER_OVERHEAD_BYTES + (5 << 19)
    devices = tmp_path / "devices.yaml"
    devices.write_text(
        "devices:\n"
        "  - {name: cpu, kind: cpu, provider: CPUExecutionProvider, threads: 1,\n"
        f"     peak_flops: 1e+11, memory_bandwidth_bytes_per_s: 1e+10, memory_bytes: {memory}}}\n"
    )
    for name, depth in (("a", 2), ("b", 1)):
        onnx.save(models.mlp(width=512, depth=depth, seed=depth), tmp_path / f"{name}.onnx")
        plan_model(tmp_path / f"{name}.onnx", load_devices(devices), time_limit=1)
    grpc_port, http_port = free_ports(2)
    line = one_line_error(
        capsys,
        ["serve", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"), "--devices", str(devices),
         "--time-limit", "1", "--grpc-port", str(grpc_port), "--http-port", str(http_port)],
    )  # fmt: skip
    assert line.startswith("moirai: model 'b' does not fit beside 'a' in the devices' memory (")
    assert "cpu (258.5 MiB): a 130.0 MiB, 128.5 MiB free" in line
    assert line.endswith("serve fewer models together, or on devices with more memory")
