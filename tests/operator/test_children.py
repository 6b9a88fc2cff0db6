"""The child builders: names, labels, owners, pod templates, the plan ConfigMap, the policy."""

from __future__ import annotations

import dataclasses
import json

import pytest
from moirai_operator.children import (
    METRICS_PORT,
    STAGE_PORT,
    BuildOptions,
    Owner,
    PlanTooLargeError,
    build_children,
    child_name,
    endpoint,
)
from moirai_operator.spec import Defaults, parse_spec
from operator_bodies import GIB, make_plan, make_spec

OWNER = Owner(name="resnet", namespace="ml", uid="uid-1")


def children(options: BuildOptions | None = None, **spec_overrides):
    spec = parse_spec(make_spec(**spec_overrides), Defaults(image="moirai:test"))
    return spec, build_children(OWNER, spec, make_plan(), options or BuildOptions())


def by_name(objs):
    return {(o["kind"], o["metadata"]["name"]): o for o in objs}


def test_one_deployment_and_service_per_device_plus_gateway_plan_and_policy() -> None:
    _, objs = children()
    assert sorted(by_name(objs)) == [
        ("ConfigMap", "resnet-plan"),
        ("Deployment", "resnet-cpu-0"),
        ("Deployment", "resnet-gateway"),
        ("Deployment", "resnet-gpu-0"),
        ("NetworkPolicy", "resnet-gateway"),
        ("NetworkPolicy", "resnet-stages"),
        ("Service", "resnet-cpu-0"),
        ("Service", "resnet-gateway"),
        ("Service", "resnet-gateway-chain"),
        ("Service", "resnet-gpu-0"),
    ]
    for o in objs:
        meta = o["metadata"]
        assert meta["namespace"] == "ml"
        assert meta["labels"]["moirai.dev/placedmodel"] == "resnet"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "moirai-operator"
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "moirai.dev/v1alpha1",
                "kind": "PlacedModel",
                "name": "resnet",
                "uid": "uid-1",
                "controller": True,
            }
        ]
    unguarded = children(BuildOptions(network_policy=False))[1]
    assert not any(o["kind"] == "NetworkPolicy" for o in unguarded)


def test_stage_deployment_binds_to_its_pool_and_requests_its_device() -> None:
    _, objs = children()
    gpu = by_name(objs)[("Deployment", "resnet-gpu-0")]
    pod = gpu["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"moirai.dev/pool": "gpu"}
    container = pod["containers"][0]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert container["command"][:2] == ["moirai", "stage"]
    assert "--device" in container["command"] and "gpu-0" in container["command"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    cpu = by_name(objs)[("Deployment", "resnet-cpu-0")]["spec"]["template"]["spec"]
    assert "tolerations" not in cpu
    assert cpu["containers"][0]["resources"] == {
        "requests": {"cpu": "4", "memory": "8Gi"},
        "limits": {"memory": "8Gi"},
    }
    # The selector picks exactly this Deployment's pods; the template carries the plan digest.
    sel = gpu["spec"]["selector"]["matchLabels"]
    labels = gpu["spec"]["template"]["metadata"]["labels"]
    assert sel.items() <= labels.items() and sel["moirai.dev/child"] == "resnet-gpu-0"
    assert gpu["spec"]["template"]["metadata"]["annotations"]["moirai.dev/plan-digest"]


def test_a_cpu_stage_server_requests_its_planned_memory() -> None:
    """Requests what the plan says the server peaks at; limited to the device's memory."""
    plan = make_plan((("cpu-0", "cpu"),))
    planned = dataclasses.replace(plan.devices[0], memory_bytes=3 * GIB)
    spec = parse_spec(make_spec(), Defaults(image="moirai:test"))
    plan = dataclasses.replace(plan, devices=(planned,))
    objs = build_children(OWNER, spec, plan, BuildOptions())
    pod = by_name(objs)[("Deployment", "resnet-cpu-0")]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"] == {
        "requests": {"cpu": "4", "memory": str(3 * GIB)},
        "limits": {"memory": str(16 * GIB)},
    }


def test_model_is_fetched_and_verified_by_an_init_container() -> None:
    _, objs = children(model={"uri": "https://h/m.onnx", "sha256": "a" * 64})
    gateway = by_name(objs)[("Deployment", "resnet-gateway")]["spec"]["template"]["spec"]
    assert "initContainers" not in gateway  # the gateway needs only the plan
    pod = by_name(objs)[("Deployment", "resnet-gpu-0")]["spec"]["template"]["spec"]
    init = pod["initContainers"][0]
    assert init["command"] == [
        "python",
        "-m",
        "moirai_operator.fetch",
        "https://h/m.onnx",
        "/var/lib/moirai/model/model.onnx",
        "--sha256",
        "a" * 64,
    ]
    assert {"name": "model", "emptyDir": {}} in pod["volumes"]


def test_path_model_mounts_its_claim_read_only() -> None:
    model = {"uri": "/models/m.onnx", "volume": {"claimName": "weights", "mountPath": "/models"}}
    _, objs = children(model=model)
    pod = by_name(objs)[("Deployment", "resnet-cpu-0")]["spec"]["template"]["spec"]
    assert {
        "name": "model",
        "persistentVolumeClaim": {"claimName": "weights", "readOnly": True},
    } in pod["volumes"]
    assert "/models/m.onnx" in pod["containers"][0]["command"]


def test_plan_configmap_names_services_as_endpoints() -> None:
    spec, objs = children()
    plan = json.loads(by_name(objs)[("ConfigMap", "resnet-plan")]["data"]["plan.json"])
    assert plan["endpoints"] == {
        "gpu-0": f"resnet-gpu-0.ml.svc:{STAGE_PORT}",
        "cpu-0": f"resnet-cpu-0.ml.svc:{STAGE_PORT}",
        "gateway": "resnet-gateway-chain.ml.svc:50052",
    }
    assert plan["model"]["path"] == "/var/lib/moirai/model/model.onnx"
    assert plan["model"]["name"] == "resnet"  # served as /v2/models/resnet
    assert endpoint(OWNER, spec) == "http://resnet-gateway.ml.svc:8000"
    svc = by_name(objs)[("Service", "resnet-gateway")]["spec"]
    assert [p["port"] for p in svc["ports"]] == [8000, 8001]  # the chain port is not public
    chain = by_name(objs)[("Service", "resnet-gateway-chain")]["spec"]
    assert [(p["port"], p["targetPort"]) for p in chain["ports"]] == [(50052, "chain")]
    gateway = by_name(objs)[("Deployment", "resnet-gateway")]["spec"]["template"]["spec"]
    command = gateway["containers"][0]["command"]
    assert command[command.index("--chain-port") + 1] == "50052"
    assert chain["selector"]["moirai.dev/child"] == "resnet-gateway"


def test_stage_servers_listen_on_their_pod_ip_over_grpc_only() -> None:
    _, objs = children()
    pod = by_name(objs)[("Deployment", "resnet-cpu-0")]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    command = container["command"]
    assert command[command.index("--host") + 1] == "$(POD_IP)"
    assert {
        "name": "POD_IP",
        "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
    } in container["env"]
    assert "--grpc-only" in command
    assert container["readinessProbe"]["grpc"]["port"] == STAGE_PORT


def test_network_policy_admits_only_peers_and_gateway() -> None:
    _, objs = children()
    policy = by_name(objs)[("NetworkPolicy", "resnet-stages")]["spec"]
    assert policy["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "stage-server"
    (rule,) = policy["ingress"]
    (peer,) = rule["from"]
    assert peer["podSelector"]["matchLabels"]["moirai.dev/placedmodel"] == "resnet"
    assert peer["podSelector"]["matchExpressions"][0]["values"] == ["stage-server", "gateway"]
    assert rule["ports"] == [{"protocol": "TCP", "port": STAGE_PORT}]


def test_gateway_policy_opens_public_ports_and_the_chain_port_to_stages_only() -> None:
    _, objs = children(serving={"port": 9000, "grpcPort": 9001})
    policy = by_name(objs)[("NetworkPolicy", "resnet-gateway")]["spec"]
    assert policy["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"
    public, metrics, chain = policy["ingress"]
    assert "from" not in public and [p["port"] for p in public["ports"]] == [9000, 9001]
    assert metrics == {
        "from": [{"namespaceSelector": {}}],
        "ports": [{"protocol": "TCP", "port": METRICS_PORT}],
    }
    (peer,) = chain["from"]
    assert peer["podSelector"]["matchExpressions"][0]["values"] == ["stage-server"]
    assert chain["ports"] == [{"protocol": "TCP", "port": 50052}]


def test_gateway_serves_metrics_on_a_port_of_its_own() -> None:
    """`/metrics` (no token) is on the container's `metrics` port, not on the public Service."""
    _, objs = children()
    gateway = by_name(objs)[("Deployment", "resnet-gateway")]["spec"]["template"]["spec"]
    (container,) = gateway["containers"]
    command = container["command"]
    assert command[command.index("--metrics-port") + 1] == str(METRICS_PORT)
    assert {"name": "metrics", "containerPort": METRICS_PORT} in container["ports"]
    ports = {p["containerPort"] for p in container["ports"]}
    assert len(ports) == len(container["ports"])  # every port apart
    svc = by_name(objs)[("Service", "resnet-gateway")]["spec"]
    assert METRICS_PORT not in [p["port"] for p in svc["ports"]]


def test_oversized_plan_is_refused() -> None:
    spec = parse_spec(make_spec(), Defaults())
    plan = make_plan()
    big = type(plan)(**{**plan.__dict__, "placement": {"blob": "x" * 1_100_000}})
    with pytest.raises(PlanTooLargeError, match="ConfigMap limit"):
        build_children(OWNER, spec, big, BuildOptions())


def test_names_fit_dns_labels() -> None:
    long = "m" * 80
    name = child_name(long, "gpu-12")
    assert len(name) <= 63 and name.endswith("-gpu-12")
    assert child_name(long, "gpu-12") == name != child_name("n" * 80, "gpu-12")
    assert child_name("9lives", "plan") == "pm-9lives-plan"


def test_profile_job_measures_one_device_of_its_pool_and_reports() -> None:
    from moirai_operator.children import profile_job, profile_secret
    from moirai_operator.pools import match_pool, node_facts
    from operator_bodies import make_node

    spec = parse_spec(
        make_spec(model={"uri": "https://h/m.onnx", "inputShapes": {"x": [1, 3, 8, 8]}}),
        Defaults(image="cpu:1", gpu_image="gpu:1"),
    )
    gpu = match_pool(spec.pools[0], [node_facts(make_node("n", "gpu", gpus=2))])
    job = profile_job(OWNER, spec, gpu, "a1b2c3", BuildOptions())
    assert job["kind"] == "Job" and job["metadata"]["name"] == "resnet-profile-gpu-a1b2c3"
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["nodeSelector"] == {"moirai.dev/pool": "gpu"}
    fetch, profile = pod["initContainers"]
    assert fetch["command"][:3] == ["python", "-m", "moirai_operator.fetch"]
    assert profile["image"] == "gpu:1"
    assert profile["command"][:4] == [
        "moirai",
        "profile",
        "/var/lib/moirai/model/model.onnx",
        "--device",
    ]
    assert "gpu=cuda:0" in profile["command"] and "x=1x3x8x8" in profile["command"]
    assert profile["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    (upload,) = pod["containers"]
    assert upload["command"][:3] == ["python", "-m", "moirai_operator.upload"]
    # The inbox URL, with its one-time token, only in the Secret the Job owns.
    assert upload["env"] == [
        {
            "name": "MOIRAI_PROFILE_URL",
            "valueFrom": {"secretKeyRef": {"name": "resnet-profile-gpu-a1b2c3", "key": "url"}},
        }
    ]
    url = "http://op:8081/profiles/SeCrEt-ToKeN"
    secret = profile_secret(OWNER, gpu, "a1b2c3", url, "job-uid")
    assert secret["metadata"]["name"] == "resnet-profile-gpu-a1b2c3"
    assert secret["stringData"] == {"url": url}
    assert secret["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "name": "resnet-profile-gpu-a1b2c3",
            "uid": "job-uid",
        }
    ]
    assert "ToKeN" not in json.dumps(job)
    assert not any("configMap" in v for v in pod["volumes"])  # no plan exists yet


def test_the_gateway_batches_as_the_spec_says() -> None:
    def command(**serving: object) -> list[str]:
        _, objs = children(serving=serving)
        pod = by_name(objs)[("Deployment", "resnet-gateway")]["spec"]["template"]["spec"]
        return pod["containers"][0]["command"]

    assert "--max-batch-size" not in command()
    batching = {"maxBatchSize": 8, "preferredBatchSizes": [8, 4], "maxQueueDelayMicroseconds": 500}
    assert command(batching=batching)[-6:] == [
        "--max-batch-size", "8", "--preferred-batch-sizes", "4,8", "--max-queue-delay-us", "500",
    ]  # fmt: skip


def test_replicas_are_lanes_each_with_stage_servers_of_its_own() -> None:
    from moirai.stageplan import StagePlan

    _, one = children()
    _, two = children(serving={"replicas": 2})
    names = set(by_name(two)) - set(by_name(one))
    assert names == {
        ("Deployment", "resnet-gpu-0-l1"),
        ("Deployment", "resnet-cpu-0-l1"),
        ("Service", "resnet-gpu-0-l1"),
        ("Service", "resnet-cpu-0-l1"),
    }
    copy = by_name(two)[("Deployment", "resnet-cpu-0-l1")]
    assert copy["metadata"]["labels"]["moirai.dev/lane"] == "1"
    command = copy["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--device") + 1] == "cpu-0-l1"
    # Lane 0 is the plan as solved, and its pods do not roll when lanes come or go.
    digest = "moirai.dev/plan-digest"
    for name in ("resnet-cpu-0", "resnet-gpu-0"):
        before = by_name(one)[("Deployment", name)]["spec"]["template"]
        after = by_name(two)[("Deployment", name)]["spec"]["template"]
        assert before == after
    gateways = [by_name(objs)[("Deployment", "resnet-gateway")] for objs in (one, two)]
    assert [g["spec"]["replicas"] for g in gateways] == [1, 1]  # one gateway for every lane
    assert gateways[0]["spec"]["strategy"] == {"type": "Recreate"}  # never two at once
    assert len({g["spec"]["template"]["metadata"]["annotations"][digest] for g in gateways}) == 2
    # The plan the pods read: two lanes on disjoint devices, each a Service of its own.
    data = json.loads(by_name(two)[("ConfigMap", "resnet-plan")]["data"]["plan.json"])
    plan = StagePlan.from_dict(data)
    assert len(plan.lanes) == 2
    assert plan.devices_of_lane(1) == ("gpu-0-l1", "cpu-0-l1")
    assert plan.routes("x", 1) == ("s0-l1",) and plan.routes("y", 1) == ("gateway",)
    assert plan.endpoints["cpu-0-l1"] == f"resnet-cpu-0-l1.ml.svc:{STAGE_PORT}"


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env") or []}


def test_every_server_reads_the_chain_token_from_the_placed_model_s_secret() -> None:
    from moirai_operator.children import chain_secret, chain_secret_name

    _, objs = children(serving={"replicas": 2})
    deployments = [o for o in objs if o["kind"] == "Deployment"]
    assert len(deployments) == 5  # two lanes of two stage servers, and the gateway
    name = chain_secret_name(OWNER)
    assert name == "resnet-chain-token"
    for d in deployments:
        (container,) = d["spec"]["template"]["spec"]["containers"]
        assert _env(container)["MOIRAI_CHAIN_TOKEN"] == {
            "name": "MOIRAI_CHAIN_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": name, "key": "token"}},
        }
        assert "MOIRAI_AUTH_TOKEN" not in _env(container)  # the endpoint is open by default
    # The Secret itself is not a child built from the spec (its token is made once, elsewhere).
    assert not any(o["kind"] == "Secret" for o in objs)
    secret = chain_secret(OWNER, "s3cret-ToKeN")
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == name
    assert secret["stringData"] == {"token": "s3cret-ToKeN"}
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert secret["metadata"]["labels"]["moirai.dev/placedmodel"] == "resnet"
    assert "ToKeN" not in json.dumps(secret["metadata"])


def test_the_gateway_reads_the_endpoint_token_from_the_secret_the_spec_names() -> None:
    _, objs = children(serving={"authTokenSecret": "resnet-clients"})
    gateway = by_name(objs)[("Deployment", "resnet-gateway")]
    (container,) = gateway["spec"]["template"]["spec"]["containers"]
    assert _env(container)["MOIRAI_AUTH_TOKEN"] == {
        "name": "MOIRAI_AUTH_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "resnet-clients", "key": "token"}},
    }
    # The probes stay open: they call health and readiness, which need no token.
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    stage = by_name(objs)[("Deployment", "resnet-cpu-0")]["spec"]["template"]["spec"]
    assert "MOIRAI_AUTH_TOKEN" not in _env(stage["containers"][0])


def test_the_gateway_serves_tls_from_the_secret_the_spec_names() -> None:
    _, objs = children(serving={"tlsSecret": "resnet-tls"})
    pod = by_name(objs)[("Deployment", "resnet-gateway")]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert {"name": "tls", "secret": {"secretName": "resnet-tls"}} in pod["volumes"]
    mount = {"name": "tls", "mountPath": "/etc/moirai/tls", "readOnly": True}
    assert mount in container["volumeMounts"]
    command = " ".join(container["command"])
    assert "--tls-cert-file /etc/moirai/tls/tls.crt --tls-key-file /etc/moirai/tls/tls.key" in (
        command
    )
    assert container["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert container["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
    spec, _ = children(serving={"tlsSecret": "resnet-tls"})
    assert endpoint(OWNER, spec) == "https://resnet-gateway.ml.svc:8000"  # status.endpoint
    _, plain = children()
    gateway = by_name(plain)[("Deployment", "resnet-gateway")]["spec"]["template"]["spec"]
    assert "--tls-cert-file" not in gateway["containers"][0]["command"]
    assert "scheme" not in gateway["containers"][0]["readinessProbe"]["httpGet"]
    assert all(v["name"] != "tls" for v in gateway["volumes"])


def test_the_secrets_a_running_pod_reads_are_told_from_its_template_alone() -> None:
    """`pod_secrets` reads back what the builders wrote, in their order, so the reconciler can
    roll a Deployment whose spec no longer parses with the annotation a build would give."""
    from moirai_operator.children import (
        gateway_secrets,
        pod_secrets,
        secrets_digest,
        secrets_patch,
        stage_secrets,
    )

    serving = {"authTokenSecret": "clients", "tlsSecret": "endpoint-tls"}
    digests = {"resnet-chain-token": "a", "clients": "b", "endpoint-tls": "c"}
    spec = parse_spec(make_spec(serving=serving), Defaults(image="moirai:test"))
    objs = by_name(build_children(OWNER, spec, make_plan(), BuildOptions(), digests))
    gateway = objs[("Deployment", "resnet-gateway")]["spec"]["template"]
    stage = objs[("Deployment", "resnet-gpu-0")]["spec"]["template"]
    assert pod_secrets(gateway["spec"]) == {
        "resnet-chain-token": ("token",),
        "clients": ("token",),
        "endpoint-tls": ("tls.crt", "tls.key"),
    }
    assert list(pod_secrets(gateway["spec"])) == gateway_secrets(OWNER, spec)
    assert list(pod_secrets(stage["spec"])) == stage_secrets(OWNER)
    for template in (gateway, stage):
        names = list(pod_secrets(template["spec"]))
        patch = secrets_patch(secrets_digest(digests, names))
        assert patch["spec"]["template"]["metadata"]["annotations"] == {
            "moirai.dev/secrets-digest": template["metadata"]["annotations"][
                "moirai.dev/secrets-digest"
            ]
        }
