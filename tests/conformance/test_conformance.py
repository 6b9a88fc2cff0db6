"""Conformance: ONNX's backend test models, planned and cut by Moirai, compute what ONNX Runtime
computes on the whole model (`check.conform`, over `cases.collect`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .cases import collect
from .check import conform

CASES = collect()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_stages_compute_what_onnx_runtime_computes(case, tmp_path: Path) -> None:
    if case.skip:
        pytest.skip(case.skip)
    outcome = conform(case, tmp_path)
    assert outcome.plans or outcome.refused


def test_the_suite_covers_what_it_says() -> None:
    """The folders and the sample of expansions are there, and ONNX Runtime runs most of them:
    a broken install or loader would otherwise pass as a suite of skips."""
    by_source: dict[str, int] = {}
    for case in CASES:
        if not case.skip:
            source = case.name.split("/")[0]
            by_source[source] = by_source.get(source, 0) + 1
    assert by_source.get("light", 0) >= 9, by_source
    assert by_source.get("pytorch-converted", 0) >= 50, by_source
    assert by_source.get("pytorch-operator", 0) >= 20, by_source
    assert by_source.get("simple", 0) >= 15, by_source
    assert by_source.get("node", 0) >= 100, by_source
