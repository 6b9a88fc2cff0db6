"""Fixtures of the operator's unit tests."""

from __future__ import annotations

from typing import Any

import pytest
from operator_bodies import make_node


@pytest.fixture
def nodes() -> list[dict[str, Any]]:
    return [
        make_node("gpu-a", "gpu", gpus=1, product="Tesla-T4"),
        make_node("gpu-b", "gpu", gpus=2, product="NVIDIA-A100-SXM4-80GB"),
        make_node("cpu-a", "cpu", cpu="16", memory="64Gi"),
    ]
