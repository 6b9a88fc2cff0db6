"""Fixtures of the container tests (`container_fixtures.py`): Moirai's image, and a kubelet that
runs pod specs as its containers."""

from __future__ import annotations

import pytest
from container_fixtures import image, kubelet, mark_container_tests  # noqa: F401


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    mark_container_tests(items)
