"""A small kubelet for the tests: runs pod specs, exactly as the operator wrote them, as Docker
containers of Moirai's image on this machine (no tests here).

What it honours, as the kubelet does:

- `command`/`args` (the entry point replaced, `$(VAR)` expanded from the container's env) and
  `workingDir`;
- `env`: values, the downward API (`status.podIP`, `metadata.name`, `metadata.namespace`) and
  Secret and ConfigMap keys;
- the security context, pod and container level merged: `runAsUser`/`runAsGroup` (`--user`),
  `fsGroup` (a supplementary group owning the emptyDirs), `runAsNonRoot` (checked),
  `readOnlyRootFilesystem` (`--read-only`), `allowPrivilegeEscalation: false`
  (`no-new-privileges`), `capabilities` (`--cap-drop`/`--cap-add`), `seccompProfile`;
- volumes: each `emptyDir` a tmpfs volume that a pause container holds for the pod's life (so
  the init containers' files are there for the others, as in a pod), ConfigMaps and Secrets as
  read-only files;
- init containers in order, each to success; `restartPolicy` (Always:
  Docker restarts a container whose process dies; Never: the pod runs to completion);
- readiness probes (`grpc`, `httpGet` with scheme HTTP or HTTPS, whose certificate is not
  checked, as the kubelet's is not), which `wait_ready` runs against the pod's IP.

Networking: every container shares the host's network namespace, so all traffic stays on
loopback. Each pod gets a loopback address of its own (127.a.b.c) as its IP, and each Service
resolves, through `/etc/hosts` entries in every container (`--add-host`), to the IP of the pod
it selects, as cluster DNS and kube-proxy would; host networking cannot translate ports, so a
Service port must equal its target port (the operator's are). Everything else a pod spec might
say and this kubelet does not do fails loudly, so that a pod spec never runs differently from
what it says, except what only places or sizes pods: node selectors and tolerations (the
scheduler's), resource requests and limits (the tests' tiny "devices" of 32 KiB would not hold
a process), and liveness probes, which are not run.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import ssl
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kubernetes.utils.quantity import parse_quantity

Manifest = dict[str, Any]
POD_KEYS = {
    "securityContext",
    "automountServiceAccountToken",
    "enableServiceLinks",
    "initContainers",
    "containers",
    "volumes",
    "restartPolicy",
    "nodeSelector",
    "tolerations",
    "affinity",
    "serviceAccountName",
    "terminationGracePeriodSeconds",
    # Filled in by the API server's defaults: the scheduler's, and cluster DNS (here the hosts
    # entries that `expose` makes).
    "schedulerName",
    "dnsPolicy",
}
CONTAINER_KEYS = {
    "name",
    "image",
    "imagePullPolicy",
    "command",
    "args",
    "env",
    "ports",
    "resources",
    "readinessProbe",
    "livenessProbe",
    "volumeMounts",
    "securityContext",
    "workingDir",
    # Filled in by the API server's defaults: where a failed container leaves its last words.
    "terminationMessagePath",
    "terminationMessagePolicy",
}
POD_SECURITY = {"runAsNonRoot", "runAsUser", "runAsGroup", "fsGroup", "seccompProfile"}
CONTAINER_SECURITY = {
    "allowPrivilegeEscalation",
    "readOnlyRootFilesystem",
    "capabilities",
    "runAsNonRoot",
    "runAsUser",
    "runAsGroup",
    "seccompProfile",
}
_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


class PodFailed(AssertionError):
    """A container of a pod failed, or the pod spec asks for what this kubelet cannot do."""


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: defined variables are replaced, `$$` is a `$`, and a
    reference to an undefined variable stays as it is."""

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR.sub(one, text)


def _unknown(where: str, keys: Any, known: set[str]) -> None:
    extra = set(keys) - known
    if extra:
        raise PodFailed(f"{where}: this kubelet does not handle {sorted(extra)}")


def _docker(*args: str, timeout: float = 120, check: bool = True) -> str:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise PodFailed(f"docker {' '.join(args[:2])}: {result.stderr.strip()}")
    return result.stdout.strip()


@dataclass
class Pod:
    name: str
    namespace: str
    ip: str
    spec: Manifest
    labels: dict[str, str]
    containers: dict[str, str] = field(default_factory=dict)
    """Container name in the pod spec → Docker container name."""

    def port(self, name_or_number: str | int) -> int:
        if isinstance(name_or_number, int):
            return name_or_number
        for c in self.spec["containers"]:
            for p in c.get("ports") or []:
                if p["name"] == name_or_number:
                    return int(p["containerPort"])
        raise PodFailed(f"pod {self.name} declares no port {name_or_number!r}")


OWNER_LABEL = "moirai-test"
"""Label of everything a Kubelet makes: `<pid of the test process>-<random>`."""


def remove_orphans() -> None:
    """Remove the containers and volumes of Kubelets whose test process is gone."""
    owner_of = '{{.Label "' + OWNER_LABEL + '"}}'
    for kind, listing in (
        ("container", ["ps", "-a", "--format", "{{.ID}} " + owner_of]),
        ("volume", ["volume", "ls", "--format", "{{.Name}} " + owner_of]),
    ):
        orphans = []
        found = _docker(*listing, "--filter", f"label={OWNER_LABEL}", check=False)
        for line in found.splitlines():
            name, _, owner = line.partition(" ")
            pid = owner.split("-")[0]
            if name and pid.isdigit() and not Path(f"/proc/{pid}").exists():
                orphans.append(name)
        if orphans:
            remove = ["rm", "-f", "-v"] if kind == "container" else ["volume", "rm", "-f"]
            _docker(*remove, *orphans, check=False)


class Kubelet:
    """Runs pods as containers; `close` removes everything it made (containers by label)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        # Containers restart until removed: those of a test process that died are removed here.
        remove_orphans()
        self.label = f"{OWNER_LABEL}={os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.hosts: dict[str, str] = {}
        self.configmaps: dict[str, Mapping[str, str]] = {}
        self.secrets: dict[str, Mapping[str, bytes]] = {}
        self.pods: dict[str, Pod] = {}
        self._ips: set[str] = set()
        self._volumes: list[str] = []

    # ------------------------------------------------------------------ the cluster's objects
    def new_ip(self) -> str:
        while True:
            ip = "127." + ".".join(str(random.randint(1, 254)) for _ in range(3))
            if ip not in self._ips:
                self._ips.add(ip)
                return ip

    def add_object(self, manifest: Manifest) -> None:
        """Remember a ConfigMap or Secret the pods may mount or read."""
        name = manifest["metadata"]["name"]
        if manifest["kind"] == "ConfigMap":
            self.configmaps[name] = dict(manifest.get("data") or {})
        elif manifest["kind"] == "Secret":
            data = {k: base64.b64decode(v) for k, v in (manifest.get("data") or {}).items()}
            data |= {k: v.encode() for k, v in (manifest.get("stringData") or {}).items()}
            self.secrets[name] = data
        else:
            raise PodFailed(f"add_object takes ConfigMaps and Secrets, not {manifest['kind']}")

    def expose(self, service: Manifest, pod: Pod) -> None:
        """Resolve the Service's names to `pod`, which its selector must select."""
        meta, spec = service["metadata"], service["spec"]
        selector = spec.get("selector") or {}
        if not selector.items() <= pod.labels.items():
            raise PodFailed(f"Service {meta['name']} does not select pod {pod.name}")
        for port in spec["ports"]:
            target = port.get("targetPort", port["port"])
            if pod.port(target) != port["port"]:
                raise PodFailed(
                    f"Service {meta['name']} maps port {port['port']} to {target}: host "
                    "networking cannot translate ports"
                )
        base = f"{meta['name']}.{meta['namespace']}"
        for name in (f"{base}.svc", f"{base}.svc.cluster.local"):
            self.hosts[name] = pod.ip

    # ------------------------------------------------------------------ pods
    def pod(
        self, name: str, namespace: str, spec: Manifest, labels: Mapping[str, str] | None = None
    ) -> Pod:
        """A pod with an IP, not started yet (so Services can name it first)."""
        _unknown(f"pod {name}", spec, POD_KEYS)
        if spec.get("enableServiceLinks", True) is not False:
            raise PodFailed(f"pod {name}: Service links (environment variables) are not made")
        pod = Pod(name, namespace, self.new_ip(), spec, dict(labels or {}))
        self.pods[name] = pod
        return pod

    def start(self, pod: Pod, timeout: float = 300) -> None:
        """Volumes, then each init container to success, then the containers: detached when the
        pod restarts them (Always), else each to success in turn."""
        volumes = self._volumes_of(pod)
        self._pause(pod, volumes)
        for container in pod.spec.get("initContainers") or []:
            self._run(pod, container, volumes, detach=False, timeout=timeout)
        policy = pod.spec.get("restartPolicy", "Always")
        if policy not in ("Always", "Never", "OnFailure"):
            raise PodFailed(f"pod {pod.name}: restartPolicy {policy!r}")
        for container in pod.spec["containers"]:
            self._run(pod, container, volumes, detach=policy == "Always", timeout=timeout)

    def _volumes_of(self, pod: Pod) -> dict[str, tuple[str, str]]:
        """Volume name → (`volume` or `bind`, Docker volume name or host directory)."""
        fs_group = (pod.spec.get("securityContext") or {}).get("fsGroup")
        out: dict[str, tuple[str, str]] = {}
        for volume in pod.spec.get("volumes") or []:
            name = volume["name"]
            if "emptyDir" in volume:
                size = (volume["emptyDir"] or {}).get("sizeLimit", "1Gi")
                owner = f"gid={fs_group},mode=2775" if fs_group is not None else "mode=1777"
                docker_name = f"moirai-test-{uuid.uuid4().hex[:12]}"
                _docker(
                    "volume",
                    "create",
                    "--label",
                    self.label,
                    "--driver",
                    "local",
                    "--opt",
                    "type=tmpfs",
                    "--opt",
                    "device=tmpfs",
                    "--opt",
                    f"o=size={int(parse_quantity(size))},{owner}",
                    docker_name,
                )
                self._volumes.append(docker_name)
                out[name] = ("volume", docker_name)
            elif "configMap" in volume or "secret" in volume:
                kind = "configMap" if "configMap" in volume else "secret"
                source = volume[kind]
                _unknown(f"volume {name}", source, {"name", "secretName", "defaultMode"})
                key = source.get("name") or source.get("secretName")
                files = self.configmaps.get(key) if kind == "configMap" else self.secrets.get(key)
                if files is None:
                    raise PodFailed(f"pod {pod.name}: volume {name}: no {kind} {key!r}")
                directory = self.workdir / pod.name / "volumes" / name
                directory.mkdir(parents=True, exist_ok=True)
                directory.chmod(0o755)
                for file, content in files.items():
                    path = directory / file
                    if isinstance(content, bytes):
                        path.write_bytes(content)
                    else:
                        path.write_text(content)
                    path.chmod(source.get("defaultMode", 0o644))
                out[name] = ("bind", str(directory))
            else:
                raise PodFailed(f"pod {pod.name}: volume {name}: type not handled ({volume})")
        return out

    def _pause(self, pod: Pod, volumes: Mapping[str, tuple[str, str]]) -> None:
        """A container that holds the pod's emptyDirs mounted for as long as the pod lives."""
        image = pod.spec["containers"][0]["image"]
        mounts = [
            f"--mount=type=volume,src={source},dst=/pause/{name}"
            for name, (kind, source) in volumes.items()
            if kind == "volume"
        ]
        container = f"{pod.name}-pause-{uuid.uuid4().hex[:6]}"
        _docker(
            "run", "-d", "--name", container, "--label", self.label, "--network", "host",
            "--read-only", "--user", "65534:65534", "--cap-drop", "ALL", *mounts,
            "--entrypoint", "sleep", image, "infinity",
        )  # fmt: skip
        pod.containers["pause"] = container

    def _env(self, pod: Pod, container: Manifest) -> dict[str, str]:
        env: dict[str, str] = {}
        for e in container.get("env") or []:
            name = e["name"]
            if "value" in e:
                env[name] = expand(str(e["value"]), env)
                continue
            source = e["valueFrom"]
            if "fieldRef" in source:
                path = source["fieldRef"]["fieldPath"]
                fields = {
                    "status.podIP": pod.ip,
                    "metadata.name": pod.name,
                    "metadata.namespace": pod.namespace,
                }
                if path not in fields:
                    raise PodFailed(f"env {name}: fieldRef {path} is not handled")
                env[name] = fields[path]
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                env[name] = self.secrets[ref["name"]][ref["key"]].decode()
            elif "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                env[name] = self.configmaps[ref["name"]][ref["key"]]
            else:
                raise PodFailed(f"env {name}: valueFrom {sorted(source)} is not handled")
        return env

    def _security(self, pod: Pod, container: Manifest) -> list[str]:
        pod_sc = pod.spec.get("securityContext") or {}
        sc = container.get("securityContext") or {}
        _unknown(f"pod {pod.name} securityContext", pod_sc, POD_SECURITY)
        _unknown(f"container {container['name']} securityContext", sc, CONTAINER_SECURITY)
        merged = {**pod_sc, **sc}
        args: list[str] = []
        user = merged.get("runAsUser")
        if user is None:
            image_user = _docker("image", "inspect", "-f", "{{.Config.User}}", container["image"])
            user = int(image_user.split(":")[0] or 0)
        if merged.get("runAsNonRoot") and int(user) == 0:
            raise PodFailed(f"container {container['name']}: runAsNonRoot, but the user is root")
        group = merged.get("runAsGroup")
        args += ["--user", f"{user}:{group}" if group is not None else str(user)]
        if pod_sc.get("fsGroup") is not None:
            args += ["--group-add", str(pod_sc["fsGroup"])]
        if sc.get("readOnlyRootFilesystem"):
            args.append("--read-only")
        if sc.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        capabilities = sc.get("capabilities") or {}
        _unknown("capabilities", capabilities, {"drop", "add"})
        args += [f"--cap-drop={c}" for c in capabilities.get("drop") or []]
        args += [f"--cap-add={c}" for c in capabilities.get("add") or []]
        seccomp = (merged.get("seccompProfile") or {}).get("type", "RuntimeDefault")
        if seccomp == "Unconfined":
            args += ["--security-opt", "seccomp=unconfined"]
        elif seccomp != "RuntimeDefault":
            raise PodFailed(f"seccompProfile {seccomp} is not handled")
        return args

    def _run(
        self,
        pod: Pod,
        container: Manifest,
        volumes: Mapping[str, tuple[str, str]],
        detach: bool,
        timeout: float,
    ) -> None:
        cname = container["name"]
        _unknown(f"container {cname}", container, CONTAINER_KEYS)
        if container.get("imagePullPolicy") == "Always":
            raise PodFailed(f"container {cname}: imagePullPolicy Always: no registry here")
        env = self._env(pod, container)
        argv = [expand(a, env) for a in (container.get("command") or [])]
        argv += [expand(a, env) for a in (container.get("args") or [])]
        if not argv:
            raise PodFailed(f"container {cname}: no command (the image's CMD is not used here)")
        args = ["--label", self.label, "--network", "host", *self._security(pod, container)]
        args += [f"--add-host={host}:{ip}" for host, ip in sorted(self.hosts.items())]
        for key, value in env.items():
            args += ["--env", f"{key}={value}"]
        for mount in container.get("volumeMounts") or []:
            _unknown(f"container {cname} volumeMount", mount, {"name", "mountPath", "readOnly"})
            kind, source = volumes[mount["name"]]
            ro = ",readonly" if mount.get("readOnly") or kind == "bind" else ""
            args.append(f"--mount=type={kind},src={source},dst={mount['mountPath']}{ro}")
        if "workingDir" in container:
            args += ["--workdir", container["workingDir"]]
        docker_name = f"{pod.name}-{cname}-{uuid.uuid4().hex[:6]}"
        args += ["--name", docker_name, "--entrypoint", argv[0], container["image"], *argv[1:]]
        pod.containers[cname] = docker_name
        if detach:
            _docker("run", "-d", "--restart", "always", *args)
            return
        _docker("run", "-d", *args)
        code = int(_docker("wait", docker_name, timeout=timeout))
        if code != 0:
            raise PodFailed(
                f"pod {pod.name}: container {cname} exited with {code}:\n{self.logs(docker_name)}"
            )

    # ------------------------------------------------------------------ watching the pods
    def logs(self, docker_name: str, tail: int = 60) -> str:
        result = subprocess.run(
            ["docker", "logs", "--tail", str(tail), docker_name],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return result.stdout + result.stderr

    def inspect(self, docker_name: str) -> dict[str, Any]:
        return json.loads(_docker("inspect", docker_name))[0]

    def state(self, docker_name: str) -> dict[str, Any]:
        return self.inspect(docker_name)["State"]

    def _probe(self, pod: Pod, probe: Manifest) -> bool:
        try:
            if "grpc" in probe:
                port = pod.port(probe["grpc"]["port"])
                with grpc.insecure_channel(f"{pod.ip}:{port}") as channel:
                    stub = health_pb2_grpc.HealthStub(channel)
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    return reply.status == health_pb2.HealthCheckResponse.SERVING
            if "httpGet" in probe:
                get = probe["httpGet"]
                _unknown("httpGet probe", get, {"path", "port", "scheme"})
                scheme = get.get("scheme", "HTTP").lower()
                url = f"{scheme}://{pod.ip}:{pod.port(get['port'])}{get.get('path', '/')}"
                unchecked = ssl.create_default_context()
                unchecked.check_hostname = False
                unchecked.verify_mode = ssl.CERT_NONE
                with urllib.request.urlopen(url, timeout=2, context=unchecked) as response:
                    return 200 <= response.status < 400
        except (OSError, grpc.RpcError):
            return False
        raise PodFailed(f"pod {pod.name}: probe {sorted(probe)} is not handled")

    def ready(self, pod: Pod) -> bool:
        """Every container runs and passes its readiness probe; a container that stopped for
        good raises with its log."""
        for container in pod.spec["containers"]:
            docker_name = pod.containers[container["name"]]
            state = self.state(docker_name)
            if not state["Running"]:
                if state.get("Restarting"):
                    return False
                raise PodFailed(
                    f"pod {pod.name}: container {container['name']} stopped "
                    f"({state['ExitCode']}):\n{self.logs(docker_name)}"
                )
            probe = container.get("readinessProbe")
            if probe and not self._probe(pod, probe):
                return False
        return True

    def wait_ready(self, pods: list[Pod], timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        waiting = list(pods)
        while waiting:
            waiting = [p for p in waiting if not self.ready(p)]
            if waiting and time.monotonic() > deadline:
                logs = "\n".join(
                    f"--- {p.name}/{c}:\n{self.logs(d)}"
                    for p in waiting
                    for c, d in p.containers.items()
                    if c != "pause"
                )
                names = [p.name for p in waiting]
                raise PodFailed(f"not ready after {timeout:.0f}s: {names}\n{logs}")
            time.sleep(0.25)

    def crash(self, pod: Pod, container: str) -> None:
        """Kill the container's process from outside, as an OOM kill or a crash would: Docker
        sees it die (not stopped by hand) and restarts it, as the kubelet would."""
        pid = _docker("inspect", "-f", "{{.State.Pid}}", pod.containers[container])
        subprocess.run(["kill", "-KILL", pid], check=True)

    def close(self) -> None:
        containers = _docker("ps", "-aq", "--filter", f"label={self.label}", check=False)
        if containers:
            _docker("rm", "-f", "-v", *containers.split(), check=False)
        for volume in self._volumes:
            _docker("volume", "rm", "-f", volume, check=False)
