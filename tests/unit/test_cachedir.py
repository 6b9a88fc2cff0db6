"""Cache entries are written whole or not at all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moirai.cachedir import cache_dir, write_entry


def test_an_entry_is_written_replaced_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    entry = tmp_path / "links" / "abc.json"
    write_entry(entry, {"format": 1, "value": [1, 2]})
    write_entry(entry, {"format": 1, "value": [3]})
    assert json.loads(entry.read_text()) == {"format": 1, "value": [3]}
    assert [p.name for p in entry.parent.iterdir()] == ["abc.json"]


def test_a_failed_write_keeps_the_entry_before_it(tmp_path: Path) -> None:
    entry = tmp_path / "abc.json"
    write_entry(entry, {"value": 1})
    with pytest.raises(TypeError):
        write_entry(entry, {"value": object()})  # not JSON: fails halfway through the dump
    assert json.loads(entry.read_text()) == {"value": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["abc.json"]


def test_the_cache_lives_where_the_environment_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MOIRAI_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir("profiles") == tmp_path / "xdg" / "moirai" / "profiles"
    monkeypatch.setenv("MOIRAI_CACHE", str(tmp_path / "mine"))
    assert cache_dir("profiles") == tmp_path / "mine" / "profiles"
