"""Serve a stage plan on this machine: one process per device, on loopback.

Each stage server runs as `python -m moirai stage ...`, the command a Kubernetes deployment runs,
so the local runtime exercises the same code paths. The Open Inference Protocol front end runs
inside the process of the plan's first stage (`moirai stage --frontend`, "fused"), so a request
reaches that stage, and a one-stage plan answers, without any hop between processes; a plan of
several lanes (or `fused=False`) gets the front end in a process of its own (`moirai gateway`),
which no lane's failure takes down. CPU devices are pinned to disjoint cores (`--cpus`, applied
with `os.sched_setaffinity` in the child: to the whole process, or only to the threads that run
stages in the process of the front end, which may use every core) so that their thread counts
are real; GPU devices get their CUDA device id from the plan. The servers push to each other
over the same-host fast path (`stage_server.samehost`) unless `same_host` is off, which keeps
every push on gRPC, the path between hosts.

No orphans: every child is asked (Linux `PR_SET_PDEATHSIG`) to receive SIGTERM when this process
dies, even by SIGKILL, and `stop` sends SIGTERM, waits, then SIGKILLs what is left. Each child's
output goes to a log file in the work directory; when a child dies during start-up, the error
quotes the end of its log.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import grpc

from moirai.errors import MoiraiError
from moirai.planning.cpu import core_sets
from moirai.stageplan import GATEWAY, StagePlan
from stage_server.batchconfig import BatchingConfig

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


def _die_with_parent() -> None:
    """In the child, before exec: receive SIGTERM when the parent dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


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
    pin_cores: bool = True
    same_host: bool = True
    fused: bool = True
    """The front end in the process of the plan's first stage (single-lane plans only)."""
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)
    cores: dict[str, list[int]] = field(default_factory=dict)

    @property
    def plan_path(self) -> Path:
        return self.workdir / "plan.json"

    @property
    def entry(self) -> str | None:
        """The device whose process holds the front end; None when it runs alone."""
        if not self.fused or len(self.plan.lanes) > 1:
            return None
        return self.plan.stages[0].device

    @property
    def grpc_url(self) -> str:
        return f"{LOCALHOST}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{LOCALHOST}:{self.http_port}"

    def start(self, ready_timeout_s: float = 120.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        devices = self.plan.used_devices
        ports = free_ports(len(devices) + 2)
        self.grpc_port = self.grpc_port or ports[-2]
        self.http_port = self.http_port or ports[-1]
        self.addresses = {d: f"{LOCALHOST}:{p}" for d, p in zip(devices, ports, strict=False)}
        # Where stages push final outputs: the front end's chain port.
        self.addresses[GATEWAY] = self.addresses[self.entry] if self.entry else self.grpc_url
        plan = self.plan.to_dict()
        plan["endpoints"] = self.addresses
        self.plan_path.write_text(json.dumps(plan, indent=1) + "\n", encoding="utf-8")
        self.cores = core_sets(self.plan) if self.pin_cores else {}
        try:
            for device in devices:
                self.start_stage(device)
            if self.entry is None:
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

    def start_stage(self, device: str) -> None:
        """(Re)start the stage server of one device on its address and cores."""
        port = self.addresses[device].rsplit(":", 1)[1]
        args = [
            "stage",
            "--plan", str(self.plan_path),
            "--model", str(self.model_path),
            "--device", device,
            "--port", port,
        ]  # fmt: skip
        if self.cores.get(device):
            args += ["--cpus", ",".join(map(str, self.cores[device]))]
        if device == self.entry:
            args += ["--frontend", *self._frontend]
        self._spawn(device, [*args, *self._transport])

    def start_gateway(self) -> None:
        """(Re)start the front end alone, in a process of its own."""
        self._spawn(GATEWAY, ["gateway", "--plan", str(self.plan_path), *self._frontend,
                              *self._transport])  # fmt: skip

    @property
    def _frontend(self) -> list[str]:
        return [
            "--grpc-port", str(self.grpc_port),
            "--http-port", str(self.http_port),
            "--timeout", str(self.timeout_s),
            *self.batching.to_args(),
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
                with contextlib.suppress(grpc.RpcError):
                    if client.ready(timeout_s=1.0):
                        return
                time.sleep(0.1)
        raise MoiraiError(
            f"the servers were not ready within {timeout_s:.0f} s; logs in {self.workdir}"
        )

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
