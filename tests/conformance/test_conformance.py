"""Conformance: ONNX's backend test models, planned and cut by Moirai, compute what ONNX Runtime
computes on the whole model (`check.conform`, over `cases.collect`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .cases import collect
from .check import conform

CASES = collect()
RUNNABLE = [c for c in CASES if not c.skip]
"""The cases: the models ONNX Runtime itself runs whole (the others are no reference)."""


@pytest.mark.parametrize("case", RUNNABLE, ids=[c.name for c in RUNNABLE])
def test_stages_compute_what_onnx_runtime_computes(case, tmp_path: Path) -> None:
    outcome = conform(case, tmp_path)
    assert outcome.plans or outcome.refused


def test_the_suite_covers_what_it_says() -> None:
    """The folders and the sample of expansions are there, and ONNX Runtime runs most of them:
    a broken install or loader would otherwise leave a suite of nothing. Only models ONNX
    Runtime cannot run whole are left out (`Case.skip` says why)."""
    left_out = [c for c in CASES if c.skip]
    assert all(c.skip.startswith("ONNX Runtime cannot run") for c in left_out)
    assert len(left_out) <= len(CASES) // 4, [f"{c.name}: {c.skip}" for c in left_out]
    by_source: dict[str, int] = {}
    for case in RUNNABLE:
        source = case.name.split("/")[0]
        by_source[source] = by_source.get(source, 0) + 1
    assert by_source.get("light", 0) >= 9, by_source
    assert by_source.get("pytorch-converted", 0) >= 50, by_source
    assert by_source.get("pytorch-operator", 0) >= 20, by_source
    assert by_source.get("simple", 0) >= 15, by_source
    assert by_source.get("node", 0) >= 100, by_source
