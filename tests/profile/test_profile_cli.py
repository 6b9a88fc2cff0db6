"""`moirai profile` as a user runs it: a profile file out, progress on stderr, the cache hit on
the second run, and one-line errors for bad devices and a missing CUDA provider."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import pytest
from profiling_support import ModelFile

from moirai.cli import main
from moirai.profile.document import ProfileDocument


def _profile(model: ModelFile, *extra: str) -> int:
    shapes = [f"--input-shape={k}={'x'.join(map(str, v))}" for k, v in model.input_shapes.items()]
    return main(
        [
            "profile",
            str(model.path),
            *shapes,
            "--warmup=1",
            "--repeats=3",
            "--min-seconds=0",
            "--patience-seconds=0",
            *extra,
        ]
    )


def test_profile_writes_a_file_and_hits_the_cache_the_second_time(
    tiny_bert: ModelFile, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "profile.json"
    cache = f"--cache-dir={tmp_path / 'cache'}"
    args = ("--device=cpu:threads=1", "--device=two=cpu:threads=2", "--no-links", cache)
    assert _profile(tiny_bert, *args, "-o", str(out)) == 0
    captured = capsys.readouterr()
    assert "moirai profile: cpu:threads=1: whole model, run 1/4 (warm-up)" in captured.err
    assert "measured" in captured.out and f"wrote {out}" in captured.out
    document = ProfileDocument.load(out)
    assert set(document.devices) == {"cpu:threads=1", "two"}
    assert document.devices["two"].target == "cpu:threads=2"
    assert document.link is None
    assert _profile(tiny_bert, *args) == 0
    captured = capsys.readouterr()
    assert "cached" in captured.err and captured.out.count(" hit") == 2


@pytest.mark.parametrize("device", ["gpu:x", "cpu:threads=zero", "npu"])
def test_bad_device_is_one_line(
    tiny_bert: ModelFile, device: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _profile(tiny_bert, f"--device={device}") == 2
    err = capsys.readouterr().err
    assert err.startswith("moirai: --device") and err.count("\n") == 1


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(), reason="this machine has CUDA"
)
def test_cuda_missing_is_one_line(tiny_bert: ModelFile, capsys: pytest.CaptureFixture[str]) -> None:
    assert _profile(tiny_bert, "--device=cuda:0") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA provider" in err and "onnxruntime-gpu" in err


def test_same_device_name_twice_is_refused(
    tiny_bert: ModelFile, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _profile(tiny_bert, "--device=cpu", "--device=cpu") == 2
    assert "given twice" in capsys.readouterr().err


def test_missing_model_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Was a FileNotFoundError traceback from hashing the model."""
    missing = tmp_path / "missing.onnx"
    assert main(["profile", str(missing), "--no-cache"]) == 2
    err = capsys.readouterr().err
    assert err == f"moirai: {missing}: no such ONNX file\n"


def test_cache_folder_that_cannot_be_made_fails_before_measuring(
    tiny_bert: ModelFile, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Was a traceback after all the measuring, when the first result was written; now the
    flag is refused as it is parsed."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    cache = blocker / "cache"  # under a file: no folder can be made there
    with pytest.raises(SystemExit) as exit_:
        _profile(tiny_bert, "--device=cpu:threads=1", f"--cache-dir={cache}")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"moirai: argument --cache-dir: cannot create folder {cache}")
    assert err.count("\n") == 1 and "run 1/" not in err  # nothing was measured
