"""The chart and the CRD, without a cluster: the CRD copy, the schema, values and templates.

The rendering tests run the real helm binary that `hack/controlplane/build.sh` puts in the
control plane's cache (found the same way the kube fixtures find it); the server-side dry-run of
the rendered manifests is in tests/kube/test_chart_install.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from operator_bodies import COMMON_VALUES, CRD, schema

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "moirai"


def test_chart_carries_an_identical_copy_of_the_crd() -> None:
    copy = CHART / "crds" / CRD.name
    assert copy.read_bytes() == CRD.read_bytes(), (
        f"{copy} differs from {CRD}: crds/ is the source of truth; copy it over"
    )
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == sorted(
        p.name for p in CRD.parent.iterdir()
    )


def test_crd_placement_enums_are_the_registry_names() -> None:
    """The operator takes its solver and objective names from the placement registry; the
    CRD's schema must admit exactly those."""
    from moirai_operator.spec import SOLVERS

    from moirai.placement import OBJECTIVES, solvers

    placement = schema()["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
        "placement"
    ]["properties"]
    assert sorted(placement["solver"]["enum"]) == sorted(s.name for s in solvers())
    assert sorted(SOLVERS) == sorted(s.name for s in solvers())
    assert placement["objective"]["enum"] == list(OBJECTIVES)


def test_crd_admits_the_secret_names_the_operator_takes() -> None:
    from moirai_operator.spec import SECRET_NAME

    serving = schema()["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["serving"][
        "properties"
    ]
    for field in ("authTokenSecret", "tlsSecret"):
        assert serving[field]["pattern"] == f"^{SECRET_NAME.pattern}$"
        assert serving[field]["maxLength"] == 253


def test_crd_admits_the_names_the_operator_takes() -> None:
    """A name the operator refuses (`check_name`: its Services could not be named) is refused
    at admission already."""
    from moirai_operator.spec import NAME

    name = schema()["schema"]["openAPIV3Schema"]["properties"]["metadata"]["properties"]["name"]
    assert name["pattern"] == f"^{NAME.pattern}$" and name["maxLength"] == 63


def test_crd_names_columns_and_status_subresource() -> None:
    crd = yaml.safe_load(CRD.read_text())
    assert crd["spec"]["group"] == "moirai.dev"
    assert crd["spec"]["names"]["shortNames"] == ["pm"]
    version = schema()
    assert version["name"] == "v1alpha1"
    # Lanes scale like replicas: `kubectl scale pm/NAME --replicas 3`, or an autoscaler.
    assert version["subresources"] == {
        "status": {},
        "scale": {
            "specReplicasPath": ".spec.serving.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        },
    }
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Phase",
        "Devices",
        "Latency",
        "Endpoint",
        "Age",
    ]


def _walk(node: dict[str, Any], path: str = ""):
    yield path, node
    for key, child in (node.get("properties") or {}).items():
        yield from _walk(child, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural_and_validates() -> None:
    root = schema()["schema"]["openAPIV3Schema"]
    for path, node in _walk(root):
        assert "type" in node, f"{path or '.'} has no type: a structural schema needs one"
    spec = root["properties"]["spec"]
    assert spec["required"] == ["model", "pools"]
    pool = spec["properties"]["pools"]["items"]
    assert pool["properties"]["kind"]["enum"] == ["cpu", "gpu"]
    assert pool["properties"]["maxDevices"]["minimum"] == 1
    placement = spec["properties"]["placement"]["properties"]
    assert "cpsat" in placement["solver"]["enum"]
    assert placement["objective"]["enum"] == ["latency", "throughput"]


def test_examples_follow_the_schema_keys() -> None:
    spec_schema = schema()["schema"]["openAPIV3Schema"]["properties"]["spec"]

    def check(value: Any, node: dict[str, Any], path: str) -> None:
        if node.get("type") == "object" and isinstance(value, dict):
            props = node.get("properties")
            for key, child in value.items():
                if props is not None:
                    assert key in props, f"{path}.{key} is not in the schema"
                    check(child, props[key], f"{path}.{key}")
        if node.get("type") == "array":
            for item in value:
                check(item, node["items"], f"{path}[]")
        if "enum" in node:
            assert value in node["enum"], f"{path}: {value!r} not in {node['enum']}"

    examples = sorted((REPO / "examples").glob("placedmodel*.yaml"))
    assert examples
    for example in examples:
        doc = yaml.safe_load(example.read_text())
        assert doc["apiVersion"] == "moirai.dev/v1alpha1" and doc["kind"] == "PlacedModel"
        check(doc["spec"], spec_schema, example.name)


def test_every_value_is_documented() -> None:
    """Each top-level value, and each key of an undocumented section, has a `# --` comment in
    the comment block right above it."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    section_documented = False
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "-")) or line.startswith(" " * 4):
            continue
        block = []
        for prev in reversed(lines[:i]):
            if not prev.strip().startswith("#"):
                break
            block.append(prev.strip())
        documented = any(c.startswith("# --") for c in block)
        if not line.startswith(" "):
            section_documented = documented
            if stripped.endswith(":") and not documented:
                continue  # a section: its keys must be documented instead
        elif section_documented:
            continue
        assert documented, f"values.yaml line {i + 1} ({stripped}) has no '# --' comment above it"


@pytest.fixture(scope="module")
def helm() -> Path:
    out = subprocess.run(
        ["bash", str(REPO / "hack" / "controlplane" / "build.sh"), "--print-dir"],
        capture_output=True,
        text=True,
        check=True,
    )
    path = Path(out.stdout.strip().splitlines()[-1]) / "bin" / "helm"
    assert path.exists(), f"{path} missing: run make controlplane"
    return path


def render(helm: Path, *args: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [str(helm), "template", "r", str(CHART), "--namespace", "moirai-system", *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_helm_lint_passes(helm: Path) -> None:
    subprocess.run([str(helm), "lint", "--strict", str(CHART)], check=True, capture_output=True)


def test_operator_deployment_has_probes_and_runs_kopf(helm: Path) -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in render(helm)}
    pod = docs[("Deployment", "r-moirai")]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"][:3] == ["kopf", "run", "--standalone"]
    assert "--liveness=http://0.0.0.0:8080/healthz" in c["command"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["MOIRAI_SOLVER"] == "auto" and env["MOIRAI_IMAGE"] == "moirai:0.1.0"
    assert env["MOIRAI_GPU_IMAGE"] == "moirai:0.1.0-gpu"
    assert env["MOIRAI_ALLOWED_IMAGES"] == "[]"  # spec.image: none but these two by default


def test_the_endpoint_s_default_secrets_reach_the_operator(helm: Path) -> None:
    def env(*args: str) -> dict[str, str]:
        deployment = next(d for d in render(helm, *args) if d["kind"] == "Deployment")
        (c,) = deployment["spec"]["template"]["spec"]["containers"]
        return {e["name"]: e["value"] for e in c["env"]}

    off = env()
    assert off["MOIRAI_DEFAULT_AUTH_TOKEN_SECRET"] == off["MOIRAI_DEFAULT_TLS_SECRET"] == ""
    on = env("--set", "serving.authTokenSecret=clients", "--set", "serving.tlsSecret=tls")
    assert on["MOIRAI_DEFAULT_AUTH_TOKEN_SECRET"] == "clients"
    assert on["MOIRAI_DEFAULT_TLS_SECRET"] == "tls"


def _command(docs: list[dict[str, Any]]) -> list[str]:
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    return deployment["spec"]["template"]["spec"]["containers"][0]["command"]


def _inbox_namespaces(docs: list[dict[str, Any]]) -> Any:
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy")
    (peer,) = policy["spec"]["ingress"][0]["from"]
    assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "profiler"
    return peer["namespaceSelector"]


def test_by_default_the_operator_serves_its_own_namespace_only(helm: Path) -> None:
    docs = render(helm)
    roles = [(d["kind"], d["metadata"].get("namespace")) for d in docs if "Role" in d["kind"]]
    assert sorted(roles) == [
        ("ClusterRole", None),
        ("ClusterRoleBinding", None),
        ("Role", "moirai-system"),
        ("RoleBinding", "moirai-system"),
    ]
    (cluster_role,) = [d for d in docs if d["kind"] == "ClusterRole"]
    assert cluster_role["rules"] == [
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["list", "watch"]}
    ]
    command = _command(docs)
    assert "--namespace=moirai-system" in command and "--all-namespaces" not in command
    assert not any("kube-system" in yaml.safe_dump(d) for d in docs)
    # Only profiling Jobs of that namespace may reach the inbox.
    assert _inbox_namespaces(docs) == {
        "matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["moirai-system"]}
        ]
    }


def test_watch_namespaces_gives_roles_not_a_clusterrole(helm: Path) -> None:
    docs = render(helm, "--set", "watchNamespaces={a,b}", "--set", "networkPolicy.enabled=false")
    kinds = sorted((d["kind"], d["metadata"].get("namespace", "")) for d in docs)
    assert ("Role", "a") in kinds and ("Role", "b") in kinds
    assert ("Role", "moirai-system") not in kinds
    cluster_roles = [d for d in docs if d["kind"] == "ClusterRole"]
    assert [r["rules"][0]["resources"] for r in cluster_roles] == [["nodes"]]
    role = next(d for d in docs if d["kind"] == "Role")
    assert not any("networkpolicies" in r["resources"] for r in role["rules"])
    command = _command(docs)
    assert "--namespace=a" in command and "--all-namespaces" not in command
    assert _inbox_namespaces(render(helm, "--set", "watchNamespaces={a,b}"))["matchExpressions"][0][
        "values"
    ] == ["a", "b"]


def test_all_namespaces_only_when_asked(helm: Path) -> None:
    docs = render(helm, "--set", "watchAllNamespaces=true")
    assert not any(d["kind"] == "Role" for d in docs)
    cluster_roles = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ClusterRole"}
    assert any("placedmodels" in r["resources"] for r in cluster_roles["r-moirai"]["rules"])
    assert "--all-namespaces" in _command(docs)
    assert _inbox_namespaces(docs) == {}


def test_allowed_images_reach_the_operator(helm: Path) -> None:
    docs = render(helm, "--set", "allowedImages={reg.example/moirai:*,mine:1}")
    env = {e["name"]: e["value"] for e in _command_env(docs)}
    assert json.loads(env["MOIRAI_ALLOWED_IMAGES"]) == ["reg.example/moirai:*", "mine:1"]


def _command_env(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    return deployment["spec"]["template"]["spec"]["containers"][0]["env"]


def test_values_users_commonly_set_render(helm: Path) -> None:
    docs = render(helm, *COMMON_VALUES)
    operator = next(
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "r-moirai"
    )
    pod = operator["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "registry.example.com/team/moirai:20240101"
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["MOIRAI_GPU_IMAGE"] == "registry.example.com/team/moirai:20240101-gpu"
    assert env["MOIRAI_DEFAULT_AUTH_TOKEN_SECRET"] == "clients"
    assert env["MOIRAI_PREFERRED_BATCH_SIZES"] == "4,8"
    assert c["resources"]["requests"] == {"cpu": 2, "memory": "4Gi"}
    assert {"name": "models", "mountPath": "/models"} in c["volumeMounts"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    # The operator's environment parses: a chart that renders starts the operator.
    from moirai_operator.config import OperatorConfig

    config = OperatorConfig.from_env(env)
    assert config.defaults.solver == "cpsat" and config.defaults.batching.max_batch_size == 8


@pytest.mark.parametrize(
    ("values", "message"),
    [
        # A number, which the image reference printed as 'moirai:%!s(int64=2)'.
        (("--set", "image.tag=2"), "at '/image/tag': got number, want string"),
        (("--set", "image.pullPolicy=Sometimes"), "at '/image/pullPolicy': value must be one of"),
        (("--set", "solver.name=magic"), "at '/solver/name': value must be one of"),
        (("--set", "solver.objective=speed"), "at '/solver/objective'"),
        (("--set", "solver.timeLimitSeconds=0"), "at '/solver/timeLimitSeconds'"),
        (("--set", "resources=2Gi"), "at '/resources': got string, want object"),
        # A string, which rendered YAML that did not parse ('mapping values are not allowed').
        (("--set", "watchNamespaces=ml"), "at '/watchNamespaces': got string, want array"),
        (("--set", "watchNamespaces={ML}"), "at '/watchNamespaces/0'"),
        (("--set", "serving.authTokenSecret=My_Token"), "at '/serving/authTokenSecret'"),
        (("--set", "podAnnotations.replicas=2"), "at '/podAnnotations/replicas'"),
        (("--set", "sharedEndpoint.serviceType=Ingress"), "at '/sharedEndpoint/serviceType'"),
        (("--set", "solvers.name=cpsat"), "additional properties 'solvers' not allowed"),
        (("--set", "profiling.port=8080"), "profiling.port 8080 is the operator's health port"),
        (
            ("--set", "batching.preferredBatchSizes={16}"),
            "batching.preferredBatchSizes has 16, above batching.maxBatchSize (0)",
        ),
    ],
)
def test_a_wrong_value_fails_the_render_naming_it(helm: Path, values, message: str) -> None:
    """Before values.schema.json these rendered, and the operator failed at its start (a
    ConfigError in a crash-looping pod) or the API server refused a manifest."""
    out = subprocess.run(
        [str(helm), "template", "r", str(CHART), "--namespace", "moirai-system", *values],
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0 and message in out.stderr, out.stderr


def test_the_values_schema_admits_the_operator_s_solvers_and_objectives() -> None:
    from moirai_operator.spec import SOLVERS

    from moirai.placement import OBJECTIVES

    values = json.loads((CHART / "values.schema.json").read_text())["properties"]
    assert values["solver"]["properties"]["name"]["enum"] == list(SOLVERS)
    assert values["solver"]["properties"]["objective"]["enum"] == list(OBJECTIVES)
