"""`moirai demo`, the README's main job (`make demo`), as a user runs it: a real process that
plans SqueezeNet, serves it with real stage server processes and checks every output against
single-process ONNX Runtime."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_serves_the_bundled_model_and_matches_onnx_runtime() -> None:
    argv = [sys.executable, "-m", "moirai", "demo", "--profile", "analytic"]
    argv += ["--requests", "3", "--concurrency", "2", "--window", "0.5", "--time-limit", "5"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "model light_squeezenet:" in out  # the plan, described
    assert "outputs equal single-process ONNX Runtime: yes" in out, out
    assert "latency    predicted" in out and "throughput predicted" in out, out
    # The serving processes' CPU per request beside in-process ONNX Runtime's per run.
    cpu = re.search(r"^CPU +([0-9.]+) ms per request, every serving process together", out, re.M)
    assert cpu is not None and float(cpu.group(1)) > 0, out
    assert "(single-process ORT: " in out, out
    assert all(line.startswith("moirai: ") for line in done.stderr.splitlines()), done.stderr
    assert "Traceback" not in done.stderr


def test_demo_takes_your_own_model_file(tmp_path) -> None:
    """`--model` names a file as well as a bundled model: the way to try Moirai on a model of
    one's own, with its symbolic dimensions priced by --input-shape."""
    import onnx

    from . import models

    path = tmp_path / "cnn.onnx"
    onnx.save(models.cnn(), path)
    argv = [sys.executable, "-m", "moirai", "demo", "--model", str(path), "--profile", "analytic"]
    argv += ["--input-shape", "images=1x3x16x16", "--requests", "3", "--concurrency", "2"]
    argv += ["--window", "0.5", "--time-limit", "5"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "model cnn:" in done.stdout and "outputs equal single-process ONNX Runtime: yes" in (
        done.stdout
    ), done.stdout


def test_demo_of_a_model_it_does_not_know(capsys) -> None:
    from moirai.cli import main

    assert main(["demo", "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no bundled model and no file of that name" in err[0], err
    assert "squeezenet" in err[0]
