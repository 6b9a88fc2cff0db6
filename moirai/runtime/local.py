"""Serve a stage plan on this machine, or several models' plans: one process per device of
each, on loopback.

Each stage server runs as `python -m moirai stage ...`, the command a Kubernetes deployment runs,
so the local runtime exercises the same code paths. The Open Inference Protocol front end runs
inside the process of the plan's first stage (`moirai stage --frontend`, "fused"), so a request
reaches that stage, and a one-stage plan answers, without any hop between processes. A plan of
several lanes has the first stage of every lane in that process too (each device's stages in a
thread of their own, pinned to its cores), so a request reaches its lane, and replicas answer,
without a hop either: a hop costs each request of a light model a third of its CPU time here
(`bench/plans.py`). The price is that a lane's crash takes the others down until the
restart, as a one-lane plan's does. `fused=False` puts the front end in a process of its own
(`moirai gateway`), as on Kubernetes. CPU devices are pinned to disjoint cores (`--cpus`,
applied with `os.sched_setaffinity` in the child: to the whole process, or only to the threads
that run stages in the process of the front end, which may use every core) so that their thread
counts are real; GPU devices get their CUDA device id from the plan. ONNX Runtime's threads
spin between the parallel sections of a run only where they are alone on their cores
(`moirai.sessions`); where stage servers share cores (devices that do not fit them, or several
models on one device) the stage servers are told not to (`--no-spin`, `cores_shared`). The
servers push to each other over the same-host fast path (`stage_server.samehost`) unless
`same_host` is off, which keeps every push on gRPC, the path between hosts. Every push carries
the deployment's chain token (`stage_server.auth`), made afresh for each deployment and handed
to the children in their environment.

Several models (`more`) are served behind one front end, which then runs in a process of its
own (`moirai gateway` with every model's plan): a front end fused into one model's stage server
would go down, with every model's endpoint, whenever that one process dies, and would share that
model's event loop and cores with every other model's requests. Each model's stage servers are
processes of their own (named `MODEL/DEVICE`, their plan and logs in the work directory's
`MODEL/` folder); the models are planned on the same devices (`moirai.planning.together`), and
a device's cores are the same for every model's stage server on it.

No orphans: every child is asked (Linux `PR_SET_PDEATHSIG`) to receive SIGTERM when this process
dies, even by SIGKILL, and `stop` sends SIGTERM, waits, then SIGKILLs what is left. Each child's
output goes to a log file in the work directory; when a child dies during start-up, the error
quotes the end of its log.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import grpc

from moirai.errors import MoiraiError
from moirai.planning.cpu import core_sets
from moirai.stageplan import GATEWAY, StagePlan
from moirai.textfile import write_json
from stage_server.auth import CHAIN_TOKEN_ENV
from stage_server.batchconfig import BatchingConfig
from stage_server.settings import EndpointConfig

if TYPE_CHECKING:
    from stage_server.client import InferenceClient

PR_SET_PDEATHSIG = 1
LOCALHOST = "127.0.0.1"


def free_ports(n: int) -> list[int]:
    """Ports that were free a moment ago (bound together, so they are distinct)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind((LOCALHOST, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _ready(client: InferenceClient) -> bool:
    """Whether the front end that `client` calls reports ready."""
    with contextlib.suppress(grpc.RpcError):
        return client.ready(timeout_s=1.0)
    return False


def _die_with_parent() -> None:
    """In the child, before exec: receive SIGTERM when the parent dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass(frozen=True)
class LocalModel:
    """A model of a deployment: its plan (named as it is served), file and batching."""

    plan: StagePlan
    model_path: Path
    batching: BatchingConfig = field(default_factory=BatchingConfig)

    @property
    def name(self) -> str:
        return self.plan.model_name


def cores_shared(plan: StagePlan, models: int, pinned: bool) -> bool:
    """Whether stage servers of a deployment run on the same cores: several models on the
    plan's devices, or several CPU devices that could not be pinned apart (`core_sets`)."""
    cpus = [d for d in plan.used_devices if plan.device(d).kind == "cpu"]
    return models > 1 or (not pinned and len(cpus) > 1)


@dataclass
class LocalDeployment:
    """Stage servers and the front end as local processes; a context manager."""

    plan: StagePlan
    model_path: Path
    workdir: Path
    grpc_port: int = 0
    http_port: int = 0
    timeout_s: float = 30.0
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    """Dynamic batching at the front end (off by default)."""
    endpoint: EndpointConfig = field(default_factory=EndpointConfig)
    """The front end's limits."""
    pin_cores: bool = True
    same_host: bool = True
    fused: bool = True
    """The front end in the process of the plan's first stage (single-lane plans only)."""
    workers: int | None = None
    """Stages each stage server runs at once (`moirai stage --workers`; None: its default)."""
    more: tuple[LocalModel, ...] = ()
    """Models served beside the first (`plan`), behind the same front end."""
    chain_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    """The secret every push between these processes carries (`stage_server.auth`); they get
    it in their environment, which only this user can read, never on their command line."""
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)
    """Chain address by process name (a device's, or `MODEL/DEVICE` with several models)."""
    cores: dict[str, list[int]] = field(default_factory=dict)
    """Cores by device name (`MODEL/DEVICE` with several models)."""
    _stages: dict[str, tuple[LocalModel, tuple[str, ...]]] = field(default_factory=dict, repr=False)
    """The stage servers by process name: their model and devices."""

    @property
    def models(self) -> list[LocalModel]:
        return [LocalModel(self.plan, self.model_path, self.batching), *self.more]

    def name_of(self, model: LocalModel, device: str) -> str:
        """The process name of a model's stage server of `device`."""
        return f"{model.name}/{device}" if self.more else device

    def plan_path(self, model: LocalModel) -> Path:
        return self.workdir / (f"{model.name}/plan.json" if self.more else "plan.json")

    @property
    def entries(self) -> tuple[str, ...]:
        """The devices whose stage servers share the front end's process, named after the
        first: each lane's first stage's; none when the front end runs alone."""
        if not self.fused or self.more:
            return ()
        firsts = (self.plan.stages_of_lane(k)[0].device for k in range(len(self.plan.lanes)))
        return tuple(dict.fromkeys(firsts))

    @property
    def spin(self) -> bool:
        """Whether ONNX Runtime's threads may spin: not where stage servers share cores."""
        return not cores_shared(self.plan, len(self.models), bool(self.cores))

    def devices_of(self, name: str) -> tuple[str, ...]:
        """The devices a process (by name, as in `pids`) serves: none for a front end alone."""
        return self._stages[name][1] if name in self._stages else ()

    @property
    def grpc_url(self) -> str:
        return f"{LOCALHOST}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{LOCALHOST}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        """Where `/metrics` is: the metrics port's, or else the HTTP port's."""
        port = self.endpoint.metrics_port
        return self.http_url if port is None else f"{LOCALHOST}:{port}"

    def start(self, ready_timeout_s: float = 120.0) -> None:
        entries = self.entries
        self._stages = {
            self.name_of(m, d): (m, (d,))
            for m in self.models
            for d in m.plan.used_devices
            if d not in entries
        }
        if entries:
            self._stages = {entries[0]: (self.models[0], entries), **self._stages}
        host_of = {
            self.name_of(m, d): name for name, (m, devices) in self._stages.items() for d in devices
        }
        ports = free_ports(len(self._stages) + 4)
        self.grpc_port = self.grpc_port or ports[-2]
        self.http_port = self.http_port or ports[-1]
        if self.endpoint.metrics_port == 0:  # any free port: one, kept across restarts
            self.endpoint = replace(self.endpoint, metrics_port=ports[-4])
        self.addresses = {n: f"{LOCALHOST}:{p}" for n, p in zip(self._stages, ports, strict=False)}
        # Where stages push final outputs: the front end's chain port (never a public one).
        chain = self.addresses[entries[0]] if entries else f"{LOCALHOST}:{ports[-3]}"
        self.addresses[GATEWAY] = chain
        # The models share the devices: a device's cores are the same for every model.
        cores = core_sets(self.plan) if self.pin_cores else {}
        for m in self.models:
            plan = m.plan.to_dict()
            plan["endpoints"] = {
                **{d: self.addresses[host_of[self.name_of(m, d)]] for d in m.plan.used_devices},
                GATEWAY: self.addresses[GATEWAY],
            }
            self.plan_path(m).parent.mkdir(parents=True, exist_ok=True)
            write_json(self.plan_path(m), plan, "the stage plan")
            for device in m.plan.used_devices:
                if device in cores:
                    self.cores[self.name_of(m, device)] = cores[device]
        try:
            for name in self._stages:
                self.start_stage(name)
            if not entries:
                self.start_gateway()
            self.wait_ready(ready_timeout_s)
        except BaseException:
            self.stop()
            raise

    def restart(self, name: str) -> None:
        """Start a process again (after it died) on its address and cores."""
        if name == GATEWAY:
            self.start_gateway()
        else:
            self.start_stage(name)

    def start_stage(self, name: str) -> None:
        """(Re)start a stage server (by process name: its device's, or `MODEL/DEVICE`) on its
        address and cores."""
        model, devices = self._stages[name]
        port = self.addresses[name].rsplit(":", 1)[1]
        args = [
            "stage",
            "--plan", str(self.plan_path(model)),
            "--model", str(model.model_path),
            *(a for d in devices for a in ("--device", d)),
            "--port", port,
        ]  # fmt: skip
        for device in devices:
            cores = self.cores.get(self.name_of(model, device))
            if cores:
                cpus = ",".join(map(str, cores))
                args += ["--cpus", f"{device}={cpus}" if len(devices) > 1 else cpus]
        if self.workers is not None:
            args += ["--workers", str(self.workers)]
        if not self.spin:
            args.append("--no-spin")
        if devices == self.entries:
            args += ["--frontend", *self._frontend]
        else:  # how long a request may be held
            args += ["--timeout", str(self.timeout_s)]
        self._spawn(name, [*args, *self._transport])

    def start_gateway(self) -> None:
        """(Re)start the front end alone, in a process of its own, with every model's plan."""
        plans = [arg for m in self.models for arg in ("--plan", str(self.plan_path(m)))]
        chain_port = self.addresses[GATEWAY].rsplit(":", 1)[1]
        self._spawn(GATEWAY, ["gateway", *plans, "--chain-port", chain_port, *self._frontend,
                              *self._transport])  # fmt: skip

    @property
    def _frontend(self) -> list[str]:
        batching = (
            [a for m in self.models for a in m.batching.to_args(m.name)]
            if self.more
            else self.batching.to_args()
        )
        return [
            "--grpc-port", str(self.grpc_port),
            "--http-port", str(self.http_port),
            "--timeout", str(self.timeout_s),
            *batching,
            *self.endpoint.to_args(),
        ]  # fmt: skip

    @property
    def _transport(self) -> list[str]:
        return [] if self.same_host else ["--grpc-only"]

    def _spawn(self, name: str, args: list[str]) -> None:
        log = (self.workdir / f"{name}.log").open("ab")
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "moirai", *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, CHAIN_TOKEN_ENV: self.chain_token},
            preexec_fn=_die_with_parent,
            # Python's descriptors are not inherited anyway (PEP 446). Closing every descriptor
            # between fork and exec would close gRPC's epoll descriptor under the poller thread
            # that gRPC's fork handler restarts in the child: it aborts the child before exec
            # (grpc/grpc#43055) when this process has used gRPC, as `wait_ready` has.
            close_fds=False,
        )
        log.close()

    def wait_ready(self, timeout_s: float) -> None:
        """Until the front end reports ready (the stage servers of a lane SERVING)."""
        from stage_server.client import InferenceClient

        end = time.monotonic() + timeout_s
        with InferenceClient(self.grpc_url) as client:
            while time.monotonic() < end:
                for name, proc in self.processes.items():
                    if proc.poll() is not None:
                        raise MoiraiError(
                            f"{name} exited with status {proc.returncode} during start-up: "
                            f"{self.log_tail(name)}"
                        )
                if self._tls_ready() if self.endpoint.tls else _ready(client):
                    return
                time.sleep(0.1)
        raise MoiraiError(
            f"the servers were not ready within {timeout_s:.0f} s; logs in {self.workdir}"
        )

    def _tls_ready(self) -> bool:
        """Readiness over HTTPS, from this deployment's own front end on loopback: the
        certificate need not name this address, so it is not checked (readiness carries no
        token and no data)."""
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        url = f"https://{self.http_url}/v2/health/ready"
        try:
            with urllib.request.urlopen(url, timeout=1.0, context=context) as response:
                return response.status == 200
        except (OSError, urllib.error.HTTPError):
            return False

    def log_tail(self, name: str, lines: int = 5) -> str:
        path = self.workdir / f"{name}.log"
        text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
        return " | ".join(text.strip().splitlines()[-lines:]) or "(no output)"

    def kill(self, name: str) -> None:
        """SIGKILL one process (the failure tests use it)."""
        proc = self.processes[name]
        proc.kill()
        proc.wait()

    def stop(self, grace_s: float = 5.0) -> None:
        procs = [p for p in self.processes.values() if p.poll() is None]
        for p in procs:
            p.send_signal(signal.SIGTERM)
        end = time.monotonic() + grace_s
        for p in procs:
            try:
                p.wait(timeout=max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    @property
    def pids(self) -> Mapping[str, int]:
        return {name: p.pid for name, p in self.processes.items()}

    def __enter__(self) -> LocalDeployment:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
