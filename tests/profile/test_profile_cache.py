"""The profile cache: a second profile of the same model and device is a hit; another thread
count, other input shapes or a damaged entry are misses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from profiling_support import FAST, ModelFile

from moirai.profile import targets
from moirai.profile.cache import ProfileCache, default_dir
from moirai.profile.measured import MeasuredProfile
from moirai.profile.targets import Target, signature

CPU1 = {"cpu:threads=1": Target("cpu", threads=1)}
CPU2 = {"cpu:threads=2": Target("cpu", threads=2)}


def _profiler(model: ModelFile, cache: ProfileCache) -> MeasuredProfile:
    return MeasuredProfile(model.path, model.input_shapes, settings=FAST, cache=cache)


def test_second_profile_is_a_hit_and_other_threads_miss(
    tiny_bert: ModelFile, tmp_path: Path
) -> None:
    cache = ProfileCache.at(tmp_path)
    first = _profiler(tiny_bert, cache)
    measured = first.measure(CPU1)
    assert first.cache_status == {"cpu:threads=1": "measured"}
    assert len(list(tmp_path.rglob("*.json"))) == 1

    second = _profiler(tiny_bert, cache)
    again = second.measure(CPU1)
    assert second.cache_status == {"cpu:threads=1": "hit"}
    assert again.devices["cpu:threads=1"] == measured.devices["cpu:threads=1"]
    assert second._model is None  # a hit does not even load the model

    third = _profiler(tiny_bert, cache)
    third.measure(CPU2)
    assert third.cache_status == {"cpu:threads=2": "measured"}
    assert len(list(tmp_path.rglob("*.json"))) == 2


def test_key_depends_on_model_shapes_and_signature(tmp_path: Path) -> None:
    cache = ProfileCache.at(tmp_path)
    one = signature(Target("cpu", threads=1))
    path, ingredients = cache.device_path("ab" * 32, {"x": [1, 3]}, one)
    assert ingredients["signature"]["onnxruntime"] and ingredients["signature"]["cpu"]
    assert cache.device_path("ab" * 32, {"x": [1, 3]}, one)[0] == path
    assert cache.device_path("ab" * 32, {"x": [2, 3]}, one)[0] != path
    assert cache.device_path("cd" * 32, {"x": [1, 3]}, one)[0] != path
    assert cache.device_path("ab" * 32, {"x": [1, 3]}, {**one, "onnxruntime": "0.1"})[0] != path


def test_a_new_measuring_method_misses_old_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Profiles of an older method (e.g. one that split a transformer's time differently) are
    not reused once METHOD_VERSION moves on."""
    cache = ProfileCache.at(tmp_path)
    old = signature(Target("cpu", threads=1))
    monkeypatch.setattr(targets, "METHOD_VERSION", targets.METHOD_VERSION + 1)
    new = signature(Target("cpu", threads=1))
    assert new["method"] == old["method"] + 1
    assert cache.device_path("ab" * 32, {}, new)[0] != cache.device_path("ab" * 32, {}, old)[0]


def test_damaged_entry_is_a_miss(tiny_bert: ModelFile, tmp_path: Path) -> None:
    cache = ProfileCache.at(tmp_path)
    _profiler(tiny_bert, cache).measure(CPU1)
    (entry,) = tmp_path.rglob("*.json")
    entry.write_text("{not json", encoding="utf-8")
    again = _profiler(tiny_bert, cache)
    again.measure(CPU1)
    assert again.cache_status == {"cpu:threads=1": "measured"}
    assert json.loads(entry.read_text(encoding="utf-8"))["format"] == "moirai.profile-cache/v1"


def test_default_directory(monkeypatch) -> None:
    monkeypatch.setenv("MOIRAI_CACHE", "/somewhere")
    assert default_dir() == Path("/somewhere/profiles")
    monkeypatch.delenv("MOIRAI_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert default_dir() == Path("/xdg/moirai/profiles")
