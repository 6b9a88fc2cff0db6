"""The public endpoint's limits and security settings and their command-line flags, apart from
the serving stack (`stage_server.limits`, `stage_server.serve`) so that the CLI and the operator
use them without importing it. `moirai serve`, `moirai stage --frontend` and `moirai gateway`
take the same flags."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

from moirai.errors import MoiraiError

DEFAULT_MAX_IN_FLIGHT = 256
DEFAULT_IDLE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class EndpointConfig:
    """Limits of one front end (`stage_server.limits` says what each bounds)."""

    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.max_in_flight < 1:
            raise MoiraiError(f"--max-in-flight {self.max_in_flight}: give 1 or more")
        if not (math.isfinite(self.idle_timeout_s) and self.idle_timeout_s > 0):
            raise MoiraiError(f"--idle-timeout {self.idle_timeout_s}: give seconds > 0")

    def to_args(self) -> list[str]:
        """The command-line flags that give this configuration (`add_arguments`)."""
        args = []
        if self.max_in_flight != DEFAULT_MAX_IN_FLIGHT:
            args += ["--max-in-flight", str(self.max_in_flight)]
        if self.idle_timeout_s != DEFAULT_IDLE_TIMEOUT_S:
            args += ["--idle-timeout", str(self.idle_timeout_s)]
        return args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The endpoint's flags (argparse)."""
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=DEFAULT_MAX_IN_FLIGHT,
        metavar="N",
        help="inference requests held at once, gRPC and HTTP together; more are refused with "
        f"RESOURCE_EXHAUSTED / 429 (default {DEFAULT_MAX_IN_FLIGHT})",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=DEFAULT_IDLE_TIMEOUT_S,
        metavar="S",
        help="close a client connection idle this long, seconds (HTTP keep-alive, and a "
        f"request whose headers never complete; gRPC without calls; default "
        f"{DEFAULT_IDLE_TIMEOUT_S:g})",
    )


def from_args(args: Any) -> EndpointConfig:
    """The configuration of the flags of `add_arguments`."""
    return EndpointConfig(args.max_in_flight, args.idle_timeout)
