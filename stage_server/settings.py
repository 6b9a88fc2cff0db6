"""The servers' limits and security settings and their command-line flags, apart from the
serving stack (`stage_server.limits`, `stage_server.serve`) so that the CLI and the operator use
them without importing it. The endpoint's (`EndpointConfig`): `moirai serve`, `moirai stage
--frontend` and `moirai gateway` take the same flags."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moirai.errors import MoiraiError

DEFAULT_MAX_PENDING_BYTES = 2 << 30
"""Bytes of tensors a stage server holds for requests at most (`--max-pending-bytes`)."""
DEFAULT_MAX_IN_FLIGHT = 256
DEFAULT_IDLE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class EndpointConfig:
    """Limits of one front end (`stage_server.limits` says what each bounds)."""

    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    auth_token: str | None = field(default=None, repr=False)
    """The bearer token clients must present (`stage_server.auth`); None: no authentication."""
    auth_token_file: str | None = None
    """The file it was read from, passed on to child processes (the token itself never goes
    on a command line; from the environment, children inherit it)."""
    metrics_port: int | None = None
    """The port that serves `/metrics` alone, with no token (for a scrape port that the
    network restricts); None: `/metrics` is on the HTTP port, behind the token if any."""
    tls_cert_file: str | None = None
    """PEM certificate chain of the endpoint: with `tls_key_file`, gRPC and HTTP serve TLS
    only (the metrics port stays plain); None: plaintext."""
    tls_key_file: str | None = None
    allow_shared_memory: bool = False
    """Whether clients may hand tensors over in shared memory of this host
    (`stage_server.regions`)."""

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    def __post_init__(self) -> None:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise MoiraiError("--tls-cert-file and --tls-key-file go together: give both")
        if self.max_in_flight < 1:
            raise MoiraiError(f"--max-in-flight {self.max_in_flight}: give 1 or more")
        if not (math.isfinite(self.idle_timeout_s) and self.idle_timeout_s > 0):
            raise MoiraiError(f"--idle-timeout {self.idle_timeout_s}: give seconds > 0")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise MoiraiError(f"--metrics-port {self.metrics_port}: give a port, 0 to 65535")

    def to_args(self) -> list[str]:
        """The command-line flags that give this configuration (`add_arguments`)."""
        args = []
        if self.max_in_flight != DEFAULT_MAX_IN_FLIGHT:
            args += ["--max-in-flight", str(self.max_in_flight)]
        if self.idle_timeout_s != DEFAULT_IDLE_TIMEOUT_S:
            args += ["--idle-timeout", str(self.idle_timeout_s)]
        if self.auth_token_file:
            args += ["--auth-token-file", self.auth_token_file]
        if self.metrics_port is not None:
            args += ["--metrics-port", str(self.metrics_port)]
        if self.tls_cert_file and self.tls_key_file:
            args += ["--tls-cert-file", self.tls_cert_file, "--tls-key-file", self.tls_key_file]
        if self.allow_shared_memory:
            args.append("--allow-shared-memory")
        return args

    def tls_files(self) -> tuple[bytes, bytes]:
        """The certificate chain and the private key, as PEM bytes; one line when unreadable."""
        assert self.tls_cert_file is not None and self.tls_key_file is not None
        return read_pem(self.tls_cert_file, "--tls-cert-file"), read_pem(
            self.tls_key_file, "--tls-key-file"
        )


def read_pem(path: str, flag: str) -> bytes:
    """A PEM file's bytes; one line naming `flag` when it is unreadable or not PEM."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise MoiraiError(f"{flag} {path}: cannot read it ({e.strerror})") from None
    if b"-----BEGIN" not in data:
        raise MoiraiError(f"{flag} {path}: not a PEM file (give the PEM text, '-----BEGIN ...')")
    return data


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
    parser.add_argument(
        "--auth-token-file",
        metavar="FILE",
        help="file holding the token that clients must send as 'Authorization: Bearer <token>' "
        "(default: $MOIRAI_AUTH_TOKEN; none: the endpoint is open); health and readiness stay "
        "open",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus /metrics on this port alone, with no token (restrict who reaches "
        "it), and not on the HTTP port (default: /metrics on the HTTP port)",
    )
    parser.add_argument(
        "--tls-cert-file",
        metavar="FILE",
        help="PEM certificate chain: serve gRPC and HTTP over TLS only, with --tls-key-file "
        "(the metrics port stays plain; default: plaintext)",
    )
    parser.add_argument("--tls-key-file", metavar="FILE", help="PEM private key of the certificate")
    parser.add_argument(
        "--allow-shared-memory",
        action="store_true",
        help="let clients on this host pass tensors in POSIX shared memory (Triton's system "
        "shared-memory extension); whoever may call the endpoint may then read and write "
        "this user's /dev/shm objects through the model (default: off)",
    )


def from_args(args: Any) -> EndpointConfig:
    """The configuration of the flags of `add_arguments`."""
    from stage_server.auth import AUTH_TOKEN_ENV, read_token

    token = read_token(args.auth_token_file, AUTH_TOKEN_ENV, "--auth-token-file")
    path = str(Path(args.auth_token_file).resolve()) if args.auth_token_file else None
    cert, key = (
        str(Path(f).resolve()) if f else None for f in (args.tls_cert_file, args.tls_key_file)
    )
    config = EndpointConfig(
        args.max_in_flight,
        args.idle_timeout,
        token,
        path,
        args.metrics_port,
        cert,
        key,
        args.allow_shared_memory,
    )
    if config.tls:
        config.tls_files()  # unreadable files fail here, before any work
    return config
