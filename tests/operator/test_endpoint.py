"""The shared endpoint's routes (`moirai_operator.endpoint.routes`) and the chart's
`sharedEndpoint` as rendered; it runs against a real API server in
tests/kube/test_shared_endpoint.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moirai_operator.endpoint import Route, routes
from test_helm_chart import helm, render  # noqa: F401 (helm: the fixture)

from stage_server.remote import TLSTarget


def pm(name: str, namespace: str = "ml", endpoint: str | None = None, **serving: int) -> dict:
    body: dict[str, Any] = {
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"model": {"uri": "/m.onnx"}, "pools": [], "serving": serving},
    }
    if endpoint is not None:
        body["status"] = {"endpoint": endpoint}
    return body


def test_each_placed_model_with_an_endpoint_is_routed_to_its_gateways_grpc_port() -> None:
    found = routes(
        [
            pm("resnet", endpoint="http://resnet-gateway.ml.svc:8000"),
            pm("bert", "nlp", "http://bert-gateway.nlp.svc:9000", grpcPort=9001),
            pm("planning"),  # not deployed yet: no endpoint in its status
        ]
    )
    assert found == {
        "bert": Route("bert", "bert-gateway.nlp.svc:9001"),
        "resnet": Route("resnet", "resnet-gateway.ml.svc:8001"),
    }


PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def test_a_tls_gateway_is_verified_with_its_published_trust_root_for_its_service_name() -> None:
    """`spec.serving.tlsSecret`: an https endpoint. Called over TLS with `status.gatewayCA`,
    its certificate checked for the gateway Service's DNS name whatever host the endpoint
    names; without a PEM trust root, routed nowhere (never called unverified)."""
    tls = pm("resnet", endpoint="https://10.0.0.7:8000", grpcPort=9001)
    tls["status"]["gatewayCA"] = PEM
    assert routes([tls])["resnet"] == Route(
        "resnet",
        "10.0.0.7:9001",
        tls=TLSTarget(
            PEM.encode(),
            "resnet-gateway.ml.svc",
            "its status.gatewayCA (spec.serving.tlsSecret's ca.crt, else its tls.crt)",
        ),
    )
    for ca, what in ((None, "is empty"), ("CERT", "is not a PEM certificate")):
        tls["status"]["gatewayCA"] = ca
        route = routes([tls])["resnet"]
        assert route.address == "" and route.tls is None
        assert route.reason == (
            "its gateway serves TLS, and its status.gatewayCA (the trust root the operator "
            f"publishes from spec.serving.tlsSecret's ca.crt, else tls.crt) {what}: not called "
            "until its certificate can be verified"
        )
    # A gateway without TLS stays in plaintext, whatever its status holds.
    plain = pm("bert", endpoint="http://bert-gateway.ml.svc:8000")
    plain["status"]["gatewayCA"] = PEM
    assert routes([plain])["bert"] == Route("bert", "bert-gateway.ml.svc:8001")


def test_a_name_in_two_namespaces_is_routed_nowhere_and_says_why() -> None:
    found = routes(
        [
            pm("resnet", "b", "http://resnet-gateway.b.svc:8000"),
            pm("resnet", "a", "http://resnet-gateway.a.svc:8000"),
        ]
    )
    (route,) = found.values()
    assert route.address == ""
    assert route.reason == (
        "PlacedModels named 'resnet' in namespaces a and b: the shared endpoint serves a name "
        "once; rename one (each serves on its own Service)"
    )


def _docs(binary: Path, *args: str) -> dict[tuple[str, str, str], dict[str, Any]]:
    """By kind, name and namespace ("" for cluster objects)."""
    return {
        (d["kind"], d["metadata"]["name"], d["metadata"].get("namespace", "")): d
        for d in render(binary, *args)
    }


def test_the_shared_endpoint_is_off_by_default(helm: Path) -> None:  # noqa: F811
    assert not any(name.endswith("-endpoint") for _, name, _ in _docs(helm))


def test_the_shared_endpoint_lists_placed_models_of_the_served_namespaces(
    helm: Path,  # noqa: F811
) -> None:
    docs = _docs(helm, "--set", "sharedEndpoint.enabled=true", "--set", "watchNamespaces={a,b}")
    deployment = docs[("Deployment", "r-moirai-endpoint", "moirai-system")]
    pod = deployment["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"][:3] == ["python", "-m", "moirai_operator.endpoint"]
    assert "--namespace=a" in c["command"] and "--namespace=b" in c["command"]
    assert pod["serviceAccountName"] == "r-moirai-endpoint"
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    # Its pods are not the operator's: the operator Deployment's selector must not match them.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    operator = docs[("Deployment", "r-moirai", "moirai-system")]["spec"]["selector"]["matchLabels"]
    assert not operator.items() <= labels.items()
    service = docs[("Service", "r-moirai-endpoint", "moirai-system")]
    assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == [
        ("http", 8000),
        ("grpc", 8001),
    ]
    assert service["spec"]["selector"].items() <= labels.items()
    for namespace in ("a", "b"):  # no Secret, no ConfigMap: TLS trust roots are in the status
        assert docs[("Role", "r-moirai-endpoint", namespace)]["rules"] == [
            {"apiGroups": ["moirai.dev"], "resources": ["placedmodels"], "verbs": ["list"]}
        ]


def test_the_shared_endpoint_of_every_namespace_has_a_cluster_role(
    helm: Path,  # noqa: F811
) -> None:
    docs = _docs(helm, "--set", "sharedEndpoint.enabled=true", "--set", "watchAllNamespaces=true")
    assert ("ClusterRole", "r-moirai-endpoint", "") in docs
    assert not any(kind == "Role" for kind, _, _ in docs)
    command = docs[("Deployment", "r-moirai-endpoint", "moirai-system")]["spec"]["template"][
        "spec"
    ]["containers"][0]["command"]
    assert "--all-namespaces" in command
