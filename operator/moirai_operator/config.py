"""Operator-wide configuration, read once at startup from the environment the chart sets.

The Helm chart turns its values (images and the allow-list of `spec.image`, solver defaults,
the endpoint's default token and TLS Secrets, resync period, network policy, device catalogue)
into `MOIRAI_*` environment variables of the operator Deployment; `OperatorConfig` parses them
in one place, with a message naming the variable when one is malformed, so that a bad value
fails the operator's start (visible in the pod's status) rather than some reconcile.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from moirai.errors import MoiraiError
from moirai_operator.children import BuildOptions
from moirai_operator.spec import OBJECTIVES, SECRET_NAME, SOLVERS, Defaults
from stage_server.batchconfig import BatchingConfig


class ConfigError(MoiraiError):
    """An operator environment variable is malformed."""


@dataclass(frozen=True)
class OperatorConfig:
    defaults: Defaults
    options: BuildOptions
    resync_seconds: float
    """How often every PlacedModel is checked for pool changes and readiness."""
    catalogue: Path | None
    """YAML merged over the built-in device catalogue."""
    model_cache: Path
    solver_workers: int
    """PlacedModels solved at once (each solve runs in its own worker thread)."""
    solver_threads: int
    profile_url: str | None
    """Base URL at which profiling Jobs reach the operator's inbox; None: no measured mode."""
    profile_host: str
    profile_port: int
    profile_timeout_seconds: float

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> OperatorConfig:
        def number(key: str, default: float, minimum: float) -> float:
            raw = env.get(key, "")
            try:
                value = float(raw) if raw else default
            except ValueError:
                raise ConfigError(f"{key}={raw!r}: use a number") from None
            if value < minimum:
                raise ConfigError(f"{key}={raw!r}: use a number >= {minimum}")
            return value

        def choice(key: str, allowed: tuple[str, ...], default: str) -> str:
            value = env.get(key) or default
            if value not in allowed:
                raise ConfigError(f"{key}={value!r}: use one of {', '.join(allowed)}")
            return value

        def flag(key: str, default: bool) -> bool:
            raw = env.get(key, "").strip().lower()
            if not raw:
                return default
            if raw not in ("true", "false", "1", "0"):
                raise ConfigError(f"{key}={raw!r}: use true or false")
            return raw in ("true", "1")

        def batching() -> BatchingConfig:
            raw = env.get("MOIRAI_PREFERRED_BATCH_SIZES", "").replace(" ", "")
            try:
                preferred = tuple(int(v) for v in raw.split(",") if v)
            except ValueError:
                raise ConfigError(
                    f"MOIRAI_PREFERRED_BATCH_SIZES={raw!r}: use sizes separated by commas"
                ) from None
            try:
                return BatchingConfig(
                    int(number("MOIRAI_MAX_BATCH_SIZE", 0, 0)),
                    preferred,
                    int(number("MOIRAI_MAX_QUEUE_DELAY_US", 0, 0)),
                )
            except MoiraiError as e:
                raise ConfigError(f"the chart's batching values: {e}") from None

        def patterns(key: str) -> tuple[str, ...]:
            raw = env.get(key, "").strip()
            try:
                value = json.loads(raw) if raw else []
            except ValueError:
                value = None
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise ConfigError(f"{key}={raw!r}: use a JSON list of image patterns")
            return tuple(value)

        def secret_name(key: str) -> str | None:
            raw = env.get(key, "").strip()
            if raw and not (len(raw) <= 253 and SECRET_NAME.fullmatch(raw)):
                raise ConfigError(
                    f"{key}={raw!r}: give a Secret's name (lower-case letters, digits, '-' "
                    "and '.'), or nothing"
                )
            return raw or None

        catalogue = env.get("MOIRAI_CATALOGUE")
        return cls(
            defaults=Defaults(
                solver=choice("MOIRAI_SOLVER", SOLVERS, "auto"),
                objective=choice("MOIRAI_OBJECTIVE", OBJECTIVES, "latency"),
                time_limit_seconds=number("MOIRAI_TIME_LIMIT_SECONDS", 60.0, 1.0),
                image=env.get("MOIRAI_IMAGE") or Defaults.image,
                gpu_image=env.get("MOIRAI_GPU_IMAGE") or Defaults.gpu_image,
                batching=batching(),
                allowed_images=patterns("MOIRAI_ALLOWED_IMAGES"),
                auth_token_secret=secret_name("MOIRAI_DEFAULT_AUTH_TOKEN_SECRET"),
                tls_secret=secret_name("MOIRAI_DEFAULT_TLS_SECRET"),
            ),
            options=BuildOptions(
                network_policy=flag("MOIRAI_NETWORK_POLICY", True),
                image_pull_policy=choice(
                    "MOIRAI_IMAGE_PULL_POLICY", ("Always", "IfNotPresent", "Never"), "IfNotPresent"
                ),
            ),
            resync_seconds=number("MOIRAI_RESYNC_SECONDS", 30.0, 0.1),
            catalogue=Path(catalogue) if catalogue else None,
            model_cache=Path(env.get("MOIRAI_MODEL_CACHE") or "/var/cache/moirai/models"),
            solver_workers=int(number("MOIRAI_SOLVER_WORKERS", 2, 1)),
            solver_threads=int(number("MOIRAI_SOLVER_THREADS", 1, 1)),
            profile_url=env.get("MOIRAI_PROFILE_URL") or None,
            profile_host=env.get("MOIRAI_PROFILE_HOST") or "0.0.0.0",
            profile_port=int(number("MOIRAI_PROFILE_PORT", 8081, 1)),
            profile_timeout_seconds=number("MOIRAI_PROFILE_TIMEOUT_SECONDS", 900.0, 1.0),
        )
