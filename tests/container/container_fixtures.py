"""The container tests' fixtures, imported by tests/container/conftest.py and tests/kube/conftest.py
(no tests here):

``image`` (session) -> ``str``: the tag of Moirai's CPU image, built by ``hack/image/build.sh``
    (``image.py``; one build per test process).
``kubelet`` (function) -> ``Kubelet``: runs pod specs as containers of that image
    (``kubelet.py``) and removes them, and their volumes, after the test.

Tests that use either get the ``container`` marker (``mark_container_tests``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from image import image as build_image
from kubelet import Kubelet

CONTAINER_FIXTURES = frozenset({"image", "kubelet"})


def mark_container_tests(items: list[pytest.Item]) -> None:
    for item in items:
        if CONTAINER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.container)


@pytest.fixture(scope="session")
def image() -> str:
    return build_image("cpu")


@pytest.fixture
def kubelet(image: str, tmp_path: Path) -> Iterator[Kubelet]:
    node = Kubelet(tmp_path / "kubelet")
    try:
        yield node
    finally:
        node.close()
