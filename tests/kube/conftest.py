"""Fixtures that run a real Kubernetes control plane for the tests in tests/kube.

The binaries come from ``hack/controlplane/build.sh`` (``make controlplane``; Go >= 1.26). When
they are missing the fixtures FAIL with that instruction: these tests never skip.

Fixtures (all on 127.0.0.1, one control plane shared by the whole session, so keep tests
independent with the ``namespace`` fixture or unique names):

``control_plane`` (session) -> ``ControlPlane``
    etcd + kube-apiserver (RBAC, real admission and validation). Fields and helpers:
    ``kubeconfig: Path`` (admin, certificates embedded), ``server: str`` (https URL),
    ``directory: Path`` (component logs ``<name>.log``, pki/), ``api_client()`` (a new
    ``kubernetes.client.ApiClient`` as cluster admin), ``kubectl(*args, stdin=None) -> str`` and
    ``helm(*args) -> str`` (raise ``ControlPlaneError`` with stderr on failure).
    No controllers run unless some test in the session also uses ``scheduling_control_plane``,
    which adds them to this same API server.
``scheduling_control_plane`` (session) -> ``ControlPlane``
    The same plane plus kube-controller-manager (garbage collection, Deployments ->
    ReplicaSets -> Pods, namespace deletion), kube-scheduler and kwok (fake kubelets: pods bound
    to kwok nodes go Running). Create nodes with ``make_node_pool``.
``kube_api`` (session) -> ``kubernetes.client.ApiClient`` for ``control_plane``.
``namespace`` (function) -> ``str``: a fresh namespace, deleted after the test.
``make_node_pool`` (function) -> ``(name, count=1, labels=None, cpu="8", memory="32Gi",
    gpus=0) -> list[str]``: creates kwok nodes ``<name>-<i>`` labelled ``moirai.dev/pool=<name>``
    (plus ``labels``) with that capacity (``nvidia.com/gpu`` when gpus > 0), waits until they are
    schedulable, and deletes them after the test.

Using it from kopf or other code that reads a kubeconfig::

    def test_operator(scheduling_control_plane, monkeypatch):
        monkeypatch.setenv("KUBECONFIG", str(scheduling_control_plane.kubeconfig))
        with kopf.testing.KopfRunner(["run", "-A", "--standalone", "operator.py"]) as runner:
            ...

Helpers for test authors live in ``tests/kube/controlplane.py``, imported as ``controlplane``
(pytest puts this directory on ``sys.path`` while it has no ``__init__.py``):
``wait_for(condition, timeout, what)``, ``ControlPlaneError``, ``POOL_LABEL``, ``GPU_RESOURCE``.
Component logs stay in ``control_plane.directory`` (pytest keeps the last three base temp
dirs) for post-mortems.

``image`` (session) and ``kubelet`` (function): Moirai's image and a kubelet that runs pod specs
    as its containers (``tests/container/container_fixtures.py``).

Tests that use these fixtures get the ``controlplane`` marker automatically, and those that use
``image`` or ``kubelet`` the ``container`` marker.
"""

from __future__ import annotations

import contextlib
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from controlplane import (
    ControlPlane,
    ControlPlaneError,
    NodePools,
    start_control_plane,
    start_scheduling,
)
from kubernetes import client

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "container"))
from container_fixtures import image, kubelet, mark_container_tests  # noqa: F401

CONTROL_PLANE_FIXTURES = frozenset(
    {"control_plane", "scheduling_control_plane", "kube_api", "namespace", "make_node_pool"}
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if CONTROL_PLANE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.controlplane)
    mark_container_tests(items)


@contextlib.contextmanager
def failing_plainly() -> Iterator[None]:
    """Turn a ControlPlaneError into a test failure that shows only its message (and log)."""
    try:
        yield
    except ControlPlaneError as error:
        raise pytest.fail.Exception(str(error), pytrace=False) from None


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    with failing_plainly():
        plane = start_control_plane(tmp_path_factory.mktemp("controlplane"))
    try:
        yield plane
    finally:
        plane.supervisor.stop_all()


@pytest.fixture(scope="session")
def scheduling_control_plane(control_plane: ControlPlane) -> ControlPlane:
    with failing_plainly():
        start_scheduling(control_plane)
    return control_plane


@pytest.fixture(scope="session")
def kube_api(control_plane: ControlPlane) -> Iterator[client.ApiClient]:
    with control_plane.api_client() as api:
        yield api


@pytest.fixture
def namespace(kube_api: client.ApiClient) -> Iterator[str]:
    name = f"test-{uuid.uuid4().hex[:10]}"
    core = client.CoreV1Api(kube_api)
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)


@pytest.fixture
def make_node_pool(
    scheduling_control_plane: ControlPlane, kube_api: client.ApiClient
) -> Iterator[NodePools]:
    pools = NodePools(kube_api)
    yield pools
    pools.delete_all()
