"""Stage servers and the gateway as real processes: `moirai serve`, `moirai infer`, a stage server
killed under load and brought back."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from prometheus_client.parser import text_string_to_metric_families

from moirai.runtime.local import LocalDeployment
from moirai.stageplan import StagePlan
from stage_server.client import InferenceClient

from . import models
from .conftest import laned, split_plan

pytestmark = pytest.mark.timeout(180)


def cmdline(pid: str) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize(
    ("same_host", "fused"),
    [(True, True), (False, True), (True, False)],
    ids=["same-host", "grpc", "gateway-alone"],
)
def test_killed_stage_server_fails_in_flight_requests_then_serving_resumes(
    tmp_path: Path, same_host: bool, fused: bool
) -> None:
    """A stage server dies under load: the front end (in the first stage's process, or alone)
    fails what was in flight with UNAVAILABLE, reports not ready, and serves again once the
    server is back. Alone, the front end pushes to the first stage server, which dies: a
    request in flight then fails both by its push and by the health watch, and the second
    failure, never read, used to be logged by asyncio as an error ("Future exception was never
    retrieved") for every such request."""
    victim = "cpu-1" if fused else "cpu-0"
    model = models.mlp(width=256, depth=8, batch=16)
    path = tmp_path / "mlp.onnx"
    onnx.save(model, path)
    plan = split_plan(model, 2)
    x = models.random_inputs(model)
    want = ort.InferenceSession(model.SerializeToString()).run(None, x)[0]
    deployment = LocalDeployment(
        plan, path, tmp_path / "run", timeout_s=5.0, same_host=same_host, fused=fused
    )
    with deployment, InferenceClient(deployment.grpc_url) as client:
        np.testing.assert_allclose(client.infer("mlp", x)["y"], want, rtol=1e-4, atol=1e-5)
        results: list[tuple[str, float]] = []
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                start = time.monotonic()
                try:
                    client.infer("mlp", x, timeout_s=5.0)
                    results.append(("OK", time.monotonic() - start))
                except grpc.RpcError as e:
                    results.append((e.code().name, time.monotonic() - start))

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        deployment.kill(victim)
        time.sleep(1.0)
        assert not client.ready()
        stop.set()
        for t in threads:
            t.join(timeout=10)
        failures = [(code, s) for code, s in results if code != "OK"]
        assert failures, results
        assert {code for code, _ in failures} == {"UNAVAILABLE"}, failures
        assert max(s for _, s in failures) < 5.0  # within the deadline
        with pytest.raises(grpc.RpcError) as e:
            client.infer("mlp", x)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        deployment.start_stage(victim)
        # Back means ready again, within the same start-up allowance as the first start: a
        # restart imports ONNX Runtime and builds its sessions, which a loaded machine slows.
        deployment.wait_ready(120.0)
        assert client.ready()
        np.testing.assert_allclose(client.infer("mlp", x)["y"], want, rtol=1e-4, atol=1e-5)
    assert not any(alive(pid) for pid in deployment.pids.values())
    logs = "".join(log.read_text(errors="replace") for log in (tmp_path / "run").glob("*.log"))
    assert "never retrieved" not in logs


def test_serve_and_infer_commands_restart_and_sigterm_leaves_no_process(tmp_path: Path) -> None:
    model = models.mlp(width=32, depth=4)
    path = tmp_path / "mlp.onnx"
    onnx.save(model, path)
    moirai = [sys.executable, "-m", "moirai"]
    from moirai.runtime.local import free_ports

    grpc_port, http_port = free_ports(2)
    serve = subprocess.Popen(
        [*moirai, "serve", str(path), "--cpu-devices", "2", "--objective", "throughput",
         "--time-limit", "5", "--grpc-port", str(grpc_port), "--http-port", str(http_port),
         "--workdir", str(tmp_path / "run")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        lines = []
        assert serve.stdout is not None
        for line in serve.stdout:
            lines.append(line)
            if line.startswith("serving"):
                break
        assert any(re.match(r"model mlp: \d+ stages? on ", line) for line in lines), lines
        x = np.ones((1, 32), np.float32)
        np.save(tmp_path / "x.npy", x)
        out = subprocess.run(
            [*moirai, "infer", "--url", f"127.0.0.1:{grpc_port}", "--model", "mlp",
             "--input", f"x={tmp_path / 'x.npy'}", "--save", str(tmp_path / "out")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
        np.testing.assert_allclose(np.load(tmp_path / "out" / "y.npy"), want, rtol=1e-4)
        bad = subprocess.run(
            [*moirai, "infer", "--url", f"127.0.0.1:{grpc_port}", "--model", "mlp",
             "--input", "x=[[1, 2]]"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert bad.returncode == 2 and "INVALID_ARGUMENT" in bad.stderr
        children = subprocess.run(
            ["pgrep", "-P", str(serve.pid)], capture_output=True, text=True
        ).stdout.split()
        # One stage server per used device, the front end inside the first stage's process
        # with the first stage of every lane.
        served = StagePlan.load(tmp_path / "run" / "plan.json")
        firsts = {served.stages_of_lane(k)[0].device for k in range(len(served.lanes))}
        processes = len(served.used_devices) - len(firsts) + 1
        assert len(children) == processes
        # The front end's process dies: `serve` starts it again, and it answers again.
        (front,) = [pid for pid in children if "--frontend" in cmdline(pid)]
        os.kill(int(front), signal.SIGKILL)
        with InferenceClient(f"127.0.0.1:{grpc_port}") as client:
            end = time.monotonic() + 120
            while True:
                try:
                    if client.ready(timeout_s=1.0):
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < end, "the front end did not come back"
                time.sleep(0.2)
            np.testing.assert_allclose(client.infer("mlp", {"x": x})["y"], want, rtol=1e-4)
        children += subprocess.run(
            ["pgrep", "-P", str(serve.pid)], capture_output=True, text=True
        ).stdout.split()
        assert len(set(children)) == processes + 1
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=30)
    assert serve.returncode == 0
    assert not any(alive(int(pid)) for pid in children)


def test_ctrl_c_during_start_up_stops_as_while_planning(tmp_path: Path) -> None:
    """Ctrl-C while the stage servers start (the terminal signals the whole process group)
    used to end `moirai serve` with status 2 and "cpu-0 exited with status 130 during
    start-up": the stage server that the same Ctrl-C stopped was taken for crashed. Now it
    unwinds as while planning: "interrupted", status 130, no process left."""
    path = tmp_path / "mlp.onnx"
    onnx.save(models.mlp(width=32, depth=4), path)
    from moirai.runtime.local import free_ports

    grpc_port, http_port = free_ports(2)
    serve = subprocess.Popen(
        [sys.executable, "-m", "moirai", "serve", str(path), "--cpu-devices", "1",
         "--time-limit", "2", "--grpc-port", str(grpc_port), "--http-port", str(http_port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    assert serve.stdout is not None
    lines = []
    for line in serve.stdout:
        lines.append(line)
        if re.match(r"\s+s0 on ", line):  # the plan is printed: the servers start next
            break
    time.sleep(0.3)  # a stage server takes seconds to import ONNX Runtime and gRPC
    os.killpg(serve.pid, signal.SIGINT)
    output = "".join(lines) + serve.stdout.read()
    assert serve.wait(timeout=30) == 130, output
    assert "moirai: interrupted" in output and "during start-up" not in output, output
    left = subprocess.run(["pgrep", "-s", str(serve.pid)], capture_output=True, text=True)
    assert not left.stdout.split(), left.stdout


def metric(deployment: LocalDeployment, name: str, **labels: str) -> dict[str, float]:
    """Samples of metric `name` with `labels`, by device, from the front end's /metrics."""
    with urllib.request.urlopen(f"http://{deployment.metrics_url}/metrics") as response:
        text = response.read().decode()
    return {
        sample.labels["device"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    }


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "gateway-alone"])
def test_a_plan_of_two_lanes_shares_requests_and_survives_a_lane(
    tmp_path: Path, fused: bool
) -> None:
    """Two lanes of two stages. Fused, the front end shares its process with the first stage of
    each lane, so no request crosses a process to reach its lane; else it runs alone. Both lanes
    take requests; with a lane's other stage server killed, the model stays ready and the other
    lane answers."""
    model = models.mlp(width=32, depth=4)
    path = tmp_path / "mlp.onnx"
    onnx.save(model, path)
    plan = laned(split_plan(model, 2))
    x = models.random_inputs(model)
    want = ort.InferenceSession(model.SerializeToString()).run(None, x)[0]
    deployment = LocalDeployment(plan, path, tmp_path / "run", pin_cores=False, fused=fused)
    with deployment, InferenceClient(deployment.grpc_url) as client:
        if fused:
            assert deployment.entries == ("cpu-0", "cpu-0-l1")
            assert set(deployment.processes) == {"cpu-0", "cpu-1", "cpu-1-l1"}
            assert "--device cpu-0 --device cpu-0-l1" in cmdline(str(deployment.pids["cpu-0"]))
        else:
            assert deployment.entries == ()
            assert set(deployment.processes) == {
                "cpu-0",
                "cpu-1",
                "cpu-0-l1",
                "cpu-1-l1",
                "gateway",
            }
        end = time.monotonic() + 30  # ready is one lane up; the other's watch may lag
        while not all(metric(deployment, "moirai_stage_server_up").values()):
            assert time.monotonic() < end, "a lane did not come up"
            time.sleep(0.1)
        for _ in range(4):
            np.testing.assert_allclose(client.infer("mlp", x)["y"], want, rtol=1e-5)
        computed = metric(deployment, "moirai_stage_seconds_count", kind="compute")
        assert computed["cpu-1"] == computed["cpu-1-l1"] == 2.0  # each lane took two
        deployment.kill("cpu-1-l1")
        # Until the health watch notices, a request sent to lane 1 fails UNAVAILABLE; then
        # every request goes to lane 0.
        in_a_row, end = 0, time.monotonic() + 30
        while in_a_row < 8:
            assert time.monotonic() < end, "lane 0 did not take every request"
            try:
                np.testing.assert_allclose(client.infer("mlp", x)["y"], want, rtol=1e-5)
                in_a_row += 1
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE
                in_a_row = 0
        assert client.ready()


def test_serve_removes_the_working_folders_of_killed_runs(tmp_path: Path, monkeypatch) -> None:
    """A `moirai serve` killed with SIGKILL leaves its temporary working folder (plan, logs);
    the next one removes those whose owner process is gone, and no other."""
    import tempfile

    from moirai.cli.serve import OWNER_FILE, WORKDIR_PREFIX, remove_abandoned_workdirs

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen(["true"])
    gone.wait()
    folders = {}
    for label, pid in (("killed", gone.pid), ("running", os.getpid()), ("starting", None)):
        folders[label] = tmp_path / f"{WORKDIR_PREFIX}{label}"
        folders[label].mkdir()
        if pid is not None:
            (folders[label] / OWNER_FILE).write_text(str(pid))
    remove_abandoned_workdirs()
    assert not folders["killed"].exists()
    assert folders["running"].exists() and folders["starting"].exists()
