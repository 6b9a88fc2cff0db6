"""Spec parsing: defaults from the operator, checks the schema cannot express."""

from __future__ import annotations

import pytest
from moirai_operator.spec import Defaults, SpecError, parse_spec
from operator_bodies import make_spec

from stage_server.batchconfig import BatchingConfig

DEFAULTS = Defaults(
    solver="heft",
    objective="throughput",
    time_limit_seconds=7,
    image="img:1",
    allowed_images=("mine:*", "reg.example/team/*"),
)


def test_defaults_fill_what_the_spec_leaves_out() -> None:
    spec = parse_spec(make_spec(), DEFAULTS)
    assert spec.placement.solver == "heft"
    assert spec.placement.objective == "throughput"
    assert spec.placement.time_limit_seconds == 7
    assert spec.image == "img:1"
    assert spec.profiling == "analytic"
    assert spec.serving.port == 8000 and spec.serving.grpc_port == 8001
    gpu, cpu = spec.pools
    assert (gpu.kind, gpu.max_devices, gpu.gpus_per_device) == ("gpu", 2, 1)
    assert (cpu.kind, cpu.threads_per_device, cpu.memory_per_device_bytes) == ("cpu", 4, None)


def test_spec_values_win_over_defaults() -> None:
    raw = make_spec(
        placement={"solver": "cpsat", "objective": "latency", "timeLimitSeconds": 3},
        image="mine:2",
        model={"uri": "http://h/m.onnx", "sha256": "A" * 64, "inputShapes": {"x": [1, 3]}},
    )
    spec = parse_spec(raw, DEFAULTS)
    assert spec.placement.solver == "cpsat"
    assert spec.placement.time_limit_seconds == 3.0
    assert spec.image == "mine:2"
    assert spec.model.sha256 == "a" * 64
    assert spec.model.input_shapes == {"x": (1, 3)}
    assert spec.model.is_remote


def test_path_uri_needs_a_volume_that_contains_it() -> None:
    with pytest.raises(SpecError, match=r"spec\.model\.volume is required"):
        parse_spec(make_spec(model={"uri": "/models/m.onnx"}), DEFAULTS)
    with pytest.raises(SpecError, match="not under"):
        parse_spec(
            make_spec(
                model={"uri": "/data/m.onnx", "volume": {"claimName": "c", "mountPath": "/models"}}
            ),
            DEFAULTS,
        )
    spec = parse_spec(
        make_spec(
            model={
                "uri": "file:///models/a/m.onnx",
                "volume": {"claimName": "c", "mountPath": "/models"},
            }
        ),
        DEFAULTS,
    )
    assert spec.model.local_path == "/models/a/m.onnx" and not spec.model.is_remote


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (make_spec(pools=[]), r"spec\.pools is empty"),
        (make_spec(pools=[{"name": "a"}]), r"spec\.pools\[0\]\.kind is missing"),
        (make_spec(pools=[{"name": "a", "kind": "tpu"}]), r"kind is 'tpu'"),
        (
            make_spec(pools=[{"name": "a", "kind": "cpu"}, {"name": "a", "kind": "gpu"}]),
            "appears twice",
        ),
        (make_spec(pools=[{"name": "a", "kind": "cpu", "maxDevices": 0}]), "maxDevices"),
        (
            make_spec(pools=[{"name": "a", "kind": "cpu", "memoryPerDevice": "lots"}]),
            "memoryPerDevice",
        ),
        (make_spec(placement={"solver": "magic"}), r"spec\.placement\.solver"),
        (make_spec(model={"uri": "ftp://h/m.onnx"}), "scheme 'ftp'"),
        (make_spec(model={"uri": "http://h/m", "inputShapes": {"x": [0]}}), "inputShapes"),
        (make_spec(serving={"authTokenSecret": "Not_A_Name"}), r"spec\.serving\.authTokenSecret"),
        (make_spec(serving={"tlsSecret": "Not_A_Name"}), r"spec\.serving\.tlsSecret"),
    ],
)
def test_invalid_specs_name_the_field(raw: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_spec(raw, DEFAULTS)


def test_auth_token_secret_is_a_secret_name_or_left_out() -> None:
    assert parse_spec(make_spec(), DEFAULTS).serving.auth_token_secret is None
    spec = parse_spec(make_spec(serving={"authTokenSecret": "ml.clients-1"}), DEFAULTS)
    assert spec.serving.auth_token_secret == "ml.clients-1"


def test_batching_takes_the_operator_s_defaults_where_the_spec_leaves_it_out() -> None:
    defaults = Defaults(batching=BatchingConfig(8, (4, 8), 2000))
    assert parse_spec(make_spec(), Defaults()).serving.batching == BatchingConfig()  # off
    assert parse_spec(make_spec(), defaults).serving.batching == BatchingConfig(8, (4, 8), 2000)

    def batching(**fields: object) -> BatchingConfig:
        return parse_spec(make_spec(serving={"batching": fields}), defaults).serving.batching

    # Another maxBatchSize drops the default preferred sizes, which may not fit it.
    assert batching(maxBatchSize=16) == BatchingConfig(16, (), 2000)
    assert batching(maxBatchSize=4, preferredBatchSizes=[2]) == BatchingConfig(4, (2,), 2000)
    assert batching(maxQueueDelayMicroseconds=0) == BatchingConfig(8, (4, 8), 0)
    assert batching(maxBatchSize=0) == BatchingConfig()


@pytest.mark.parametrize(
    ("batching", "message"),
    [
        ({"maxBatchSize": 4, "preferredBatchSizes": [8]}, "preferredBatchSizes has 8"),
        ({"maxBatchSize": 0, "preferredBatchSizes": [1]}, "from 1 to maxBatchSize (0)"),
        ({"maxBatchSize": -1}, "spec.serving.batching.maxBatchSize is -1"),
        ({"maxBatchSize": 4, "maxQueueDelayMicroseconds": "soon"}, "maxQueueDelayMicroseconds"),
    ],
)
def test_batching_that_cannot_work_names_the_field(batching: dict, message: str) -> None:
    with pytest.raises(SpecError) as e:
        parse_spec(make_spec(serving={"batching": batching}), DEFAULTS)
    assert message in str(e.value)


def test_spec_image_must_be_the_operators_or_allowed() -> None:
    for image in ("img:1", DEFAULTS.gpu_image, "mine:3", "reg.example/team/moirai:1"):
        assert parse_spec(make_spec(image=image), DEFAULTS).image == image
    for image in ("evil/miner:latest", "reg.example/other/moirai:1", "mine"):
        with pytest.raises(SpecError, match=f"spec.image '{image}' is not allowed.*allowedImages"):
            parse_spec(make_spec(image=image), DEFAULTS)
    # By default no image but the operator's own.
    with pytest.raises(SpecError, match="none beside the operator's own"):
        parse_spec(make_spec(image="mine:2"), Defaults(image="img:1"))


def test_the_operator_s_endpoint_secrets_apply_where_the_spec_names_none() -> None:
    defaults = Defaults(auth_token_secret="clients", tls_secret="endpoint-tls")
    serving = parse_spec(make_spec(), defaults).serving
    assert (serving.auth_token_secret, serving.tls_secret) == ("clients", "endpoint-tls")
    assert serving.defaulted == {"authTokenSecret", "tlsSecret"}
    own = {"authTokenSecret": "mine", "tlsSecret": "my-tls"}
    serving = parse_spec(make_spec(serving=own), defaults).serving
    assert (serving.auth_token_secret, serving.tls_secret) == ("mine", "my-tls")
    assert serving.defaulted == frozenset()
    serving = parse_spec(make_spec(serving={"tlsSecret": "my-tls"}), defaults).serving
    assert (serving.auth_token_secret, serving.tls_secret) == ("clients", "my-tls")
    assert serving.defaulted == {"authTokenSecret"}
    serving = parse_spec(make_spec(), Defaults()).serving
    assert (serving.auth_token_secret, serving.tls_secret, serving.defaulted) == (
        None,
        None,
        frozenset(),
    )


@pytest.mark.parametrize(
    ("serving", "message"),
    [
        (
            {"port": 8000, "grpcPort": 8000},
            "spec.serving.port and spec.serving.grpcPort are both 8000: give the gateway's "
            "HTTP and gRPC ports two different numbers",
        ),
        ({"grpcPort": 8000}, "are both 8000"),  # the default HTTP port
        ({"port": 9090}, "spec.serving.port is 9090, the gateway's own metrics port: choose"),
        ({"grpcPort": 50052}, "spec.serving.grpcPort is 50052, the gateway's own chain port"),
    ],
)
def test_ports_the_gateway_cannot_listen_on_together_are_refused(serving, message) -> None:
    """The schema admits them; the gateway's pod then failed to bind, 'Deploying' forever."""
    with pytest.raises(SpecError) as error:
        parse_spec(make_spec(serving=serving), DEFAULTS)
    assert message in str(error.value)
