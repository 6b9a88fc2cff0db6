"""Operator configuration from the environment the chart sets."""

from __future__ import annotations

from pathlib import Path

import pytest
from moirai_operator.config import ConfigError, OperatorConfig

from stage_server.batchconfig import BatchingConfig


def test_defaults_without_environment() -> None:
    config = OperatorConfig.from_env({})
    assert config.defaults.solver == "auto" and config.defaults.time_limit_seconds == 60
    assert config.options.network_policy is True
    assert config.resync_seconds == 30 and config.profile_url is None
    assert config.catalogue is None
    assert not config.defaults.batching.enabled


def test_the_chart_s_batching_defaults_arrive() -> None:
    env = {
        "MOIRAI_MAX_BATCH_SIZE": "8",
        "MOIRAI_PREFERRED_BATCH_SIZES": "4,8",
        "MOIRAI_MAX_QUEUE_DELAY_US": "2000",
    }
    assert OperatorConfig.from_env(env).defaults.batching == BatchingConfig(8, (4, 8), 2000)
    off = {"MOIRAI_MAX_BATCH_SIZE": "0", "MOIRAI_PREFERRED_BATCH_SIZES": ""}
    assert OperatorConfig.from_env(off).defaults.batching == BatchingConfig()
    with pytest.raises(ConfigError, match="MOIRAI_PREFERRED_BATCH_SIZES"):
        OperatorConfig.from_env({**env, "MOIRAI_PREFERRED_BATCH_SIZES": "4;8"})
    with pytest.raises(ConfigError, match="batching values: --preferred-batch-sizes 16"):
        OperatorConfig.from_env({**env, "MOIRAI_PREFERRED_BATCH_SIZES": "16"})


def test_chart_values_arrive() -> None:
    config = OperatorConfig.from_env(
        {
            "MOIRAI_SOLVER": "cpsat",
            "MOIRAI_OBJECTIVE": "throughput",
            "MOIRAI_TIME_LIMIT_SECONDS": "12.5",
            "MOIRAI_IMAGE": "reg/moirai:1",
            "MOIRAI_GPU_IMAGE": "reg/moirai:1-gpu",
            "MOIRAI_NETWORK_POLICY": "false",
            "MOIRAI_CATALOGUE": "/etc/c.yaml",
            "MOIRAI_PROFILE_URL": "http://moirai.ns.svc:8081",
            "MOIRAI_SOLVER_WORKERS": "3",
        }
    )
    assert (config.defaults.solver, config.defaults.objective) == ("cpsat", "throughput")
    assert config.defaults.time_limit_seconds == 12.5
    assert config.defaults.gpu_image == "reg/moirai:1-gpu"
    assert config.options.network_policy is False
    assert config.catalogue == Path("/etc/c.yaml")
    assert config.profile_url == "http://moirai.ns.svc:8081" and config.solver_workers == 3


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("MOIRAI_SOLVER", "magic"),
        ("MOIRAI_TIME_LIMIT_SECONDS", "soon"),
        ("MOIRAI_RESYNC_SECONDS", "0"),
        ("MOIRAI_NETWORK_POLICY", "maybe"),
        ("MOIRAI_DEFAULT_AUTH_TOKEN_SECRET", "Clients"),
        ("MOIRAI_DEFAULT_TLS_SECRET", "tls/secret"),
    ],
)
def test_malformed_values_name_the_variable(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=key):
        OperatorConfig.from_env({key: value})


def test_allowed_images_are_a_json_list() -> None:
    env = {"MOIRAI_ALLOWED_IMAGES": '["reg.example/moirai:*", "mine:1"]'}
    assert OperatorConfig.from_env(env).defaults.allowed_images == (
        "reg.example/moirai:*",
        "mine:1",
    )
    assert OperatorConfig.from_env({}).defaults.allowed_images == ()
    for bad in ("reg.example/moirai:*", '{"a": 1}', '[""]'):
        with pytest.raises(ConfigError, match=r"MOIRAI_ALLOWED_IMAGES=.*JSON list"):
            OperatorConfig.from_env({"MOIRAI_ALLOWED_IMAGES": bad})


def test_the_endpoint_s_default_secrets_arrive() -> None:
    env = {"MOIRAI_DEFAULT_AUTH_TOKEN_SECRET": "clients", "MOIRAI_DEFAULT_TLS_SECRET": "tls"}
    defaults = OperatorConfig.from_env(env).defaults
    assert (defaults.auth_token_secret, defaults.tls_secret) == ("clients", "tls")
    empty = {"MOIRAI_DEFAULT_AUTH_TOKEN_SECRET": "", "MOIRAI_DEFAULT_TLS_SECRET": ""}
    defaults = OperatorConfig.from_env(empty).defaults
    assert (defaults.auth_token_secret, defaults.tls_secret) == (None, None)
    with pytest.raises(ConfigError) as e:
        OperatorConfig.from_env({"MOIRAI_DEFAULT_TLS_SECRET": "My_TLS"})
    assert str(e.value) == (
        "MOIRAI_DEFAULT_TLS_SECRET='My_TLS': give a Secret's name (lower-case letters, digits, "
        "'-' and '.'), or nothing"
    )
