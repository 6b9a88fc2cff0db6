"""`moirai gateway`: the Open Inference Protocol endpoint of one stage plan, or of several.

    moirai gateway --plan plan.json [--plan other.json ...] [--grpc-port 8001] [--http-port 8000] \
        [--host 127.0.0.1] [--peer cpu-0=127.0.0.1:50051 ...] [--chain-port PORT] \
        [--max-request-bytes N] [--timeout 30] [--model model.onnx] [--grpc-only] \
        [--max-batch-size [MODEL=]8 [--preferred-batch-sizes [MODEL=]4,8] \
         [--max-queue-delay-us [MODEL=]2000]] [--max-in-flight 256] [--idle-timeout 60]

Stage servers push final outputs to the gateway's `--chain-port` (by default the port of the
plans' `gateway` endpoint), a port of its own: never the public gRPC or HTTP port.
With several `--plan`s the gateway serves every plan's model behind one endpoint, by model name
(`stage_server.repository`), and the stage servers of every model push to the same chain port;
each plan's stage servers are then found at its `endpoints` only (`--peer`, `MOIRAI_PEERS` and
`--model` name one model's). `--model` is optional: given, the gateway refuses a model file other
than the plan's. The batching flags turn on dynamic batching (`stage_server.batching`), for every
model or, with `MODEL=`, for one. Environment fallbacks: MOIRAI_PLAN, MOIRAI_HOST, MOIRAI_PEERS.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moirai.cli.options import check_port_free, port, positive_float, positive_int
from moirai.errors import MoiraiError
from moirai.runtime.daemon import (
    Stoppable,
    check_model_file,
    peer_addresses,
    run_until_signalled,
)
from moirai.stageplan import GATEWAY, StagePlan

if TYPE_CHECKING:
    from stage_server.serve import ChainOptions, ServedModel

log = logging.getLogger(__name__)


def add_frontend_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of an Open Inference Protocol front end (`moirai gateway`, `moirai stage
    --frontend`)."""
    from stage_server.batchconfig import add_arguments as add_batching_arguments
    from stage_server.serve import DEFAULT_MAX_REQUEST_BYTES
    from stage_server.settings import add_arguments as add_endpoint_arguments

    p.add_argument("--grpc-port", type=int, default=8001, help="OIP gRPC port (default 8001)")
    p.add_argument("--http-port", type=int, default=8000, help="OIP HTTP port (default 8000)")
    p.add_argument(
        "--max-request-bytes",
        type=positive_int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help=f"largest request accepted (default {DEFAULT_MAX_REQUEST_BYTES})",
    )
    p.add_argument("--timeout", type=positive_float, default=30.0, help="request deadline, seconds")
    add_batching_arguments(p)
    add_endpoint_arguments(p)


def add_chain_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of a chain port (`moirai stage`, `moirai gateway`)."""
    p.add_argument(
        "--chain-token-file",
        metavar="FILE",
        help="file holding the chain token that the servers of this deployment share (default: "
        "$MOIRAI_CHAIN_TOKEN; none: the chain is open to whoever reaches its port)",
    )


def chain_options(args: argparse.Namespace, **settings: Any) -> ChainOptions:
    """The chain options of the flags (`settings`: more fields of `ChainOptions`); warns when
    the chain has no token."""
    from stage_server.auth import CHAIN_TOKEN_ENV, read_token
    from stage_server.serve import ChainOptions

    token = read_token(args.chain_token_file, CHAIN_TOKEN_ENV, "--chain-token-file")
    if token is None:
        log.warning(
            "the chain is not authenticated: anyone who reaches its port may push to it; give "
            "the servers of this deployment a shared token (%s or --chain-token-file)",
            CHAIN_TOKEN_ENV,
        )
    return ChainOptions(token, timeout_s=args.timeout, **settings)


def frontend_ports(args: argparse.Namespace) -> dict[str, int]:
    """The front end's ports by flag, for `check_port_free`; two flags of one port are
    refused."""
    ports = {"--grpc-port": args.grpc_port, "--http-port": args.http_port}
    if args.metrics_port is not None:
        ports["--metrics-port"] = args.metrics_port
    seen: dict[int, str] = {}
    for flag, number in ports.items():
        if number in seen and number != 0:  # 0: any free port
            raise MoiraiError(f"{seen[number]} and {flag} are both {number}: give two ports")
        seen[number] = flag
    return ports


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("gateway", help="run the inference gateway of a stage plan")
    env = os.environ.get
    p.add_argument(
        "--plan",
        action="append",
        help="stage plan JSON (repeat to serve several models; default MOIRAI_PLAN)",
    )
    p.add_argument("--model", help="check that this model file is the plan's")
    p.add_argument("--host", default=env("MOIRAI_HOST", "127.0.0.1"), help="address to bind")
    add_frontend_arguments(p)
    p.add_argument(
        "--chain-port",
        type=port,
        help="port on which the stage servers push final outputs, never the gRPC or HTTP port "
        "(default: the port of the plans' 'gateway' endpoint)",
    )
    add_chain_arguments(p)
    p.add_argument("--peer", action="append", default=[], metavar="NAME=HOST:PORT")
    p.add_argument(
        "--grpc-only",
        action="store_true",
        help="no same-host fast path: every push over gRPC, as between hosts",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    paths = args.plan or ([os.environ["MOIRAI_PLAN"]] if os.environ.get("MOIRAI_PLAN") else [])
    if not paths:
        raise MoiraiError("--plan is required (or MOIRAI_PLAN)")
    ports = frontend_ports(args)
    if args.chain_port is not None:
        ports["--chain-port"] = _apart(args, args.chain_port)
    for flag, number in ports.items():
        check_port_free(flag, number, args.host)
    from stage_server.allocator import keep_freed_memory
    from stage_server.batchconfig import check_model_names, from_args
    from stage_server.serve import ServedModel, start_front_end
    from stage_server.settings import from_args as endpoint_from_args

    endpoint = endpoint_from_args(args)  # the token files read, before any work
    plans = [StagePlan.load(path) for path in paths]
    names = [plan.model_name for plan in plans]
    for name in names:
        if names.count(name) > 1:
            twice = [
                path for path, plan in zip(paths, plans, strict=True) if plan.model_name == name
            ]
            raise MoiraiError(
                f"--plan {twice[0]} and --plan {twice[1]} both serve model {name!r}: a front end "
                "serves each model name once"
            )
    check_model_names(args, names)
    if len(plans) > 1 and (args.peer or args.model or os.environ.get("MOIRAI_PEERS")):
        raise MoiraiError(
            "--peer, --model and MOIRAI_PEERS name one model's servers and file: with several "
            "--plan, give each plan its stage servers' addresses in its endpoints"
        )
    if args.model:
        check_model_file(plans[0], Path(args.model))
    models = [
        ServedModel(plan, peer_addresses(plan, args.peer), from_args(args, plan.model_name))
        for plan in plans
    ]
    chain_port = _chain_port(args, models)
    # Last: it warns of an open chain, which is no news beside a plan refused.
    chain = chain_options(args)
    keep_freed_memory()

    async def start() -> Stoppable:
        return await start_front_end(
            models,
            host=args.host,
            grpc_port=args.grpc_port,
            http_port=args.http_port,
            chain_port=chain_port,
            chain=chain,
            max_request_bytes=args.max_request_bytes,
            timeout_s=args.timeout,
            same_host=not args.grpc_only,
            endpoint=endpoint,
        )

    served = ", ".join(names)
    return run_until_signalled(
        start,
        f"gateway of {served} on {args.host}:{args.grpc_port} (gRPC), :{args.http_port} (HTTP)",
    )


def _chain_port(args: argparse.Namespace, models: list[ServedModel]) -> int:
    """The port on which the stage servers push final outputs: `--chain-port` (checked with the
    other ports), or the port of the plans' "gateway" endpoint (one for every plan), checked
    here."""
    if args.chain_port is not None:
        return args.chain_port
    addresses = {m.addresses.get(GATEWAY) for m in models}
    if len(addresses) != 1 or None in addresses:
        raise MoiraiError(
            "--chain-port is required: the port on which the stage servers push final outputs "
            "(the plans give no one 'gateway' endpoint to take it from)"
        )
    chain_port = _apart(args, int(addresses.pop().rsplit(":", 1)[1]))
    check_port_free("--chain-port", chain_port, args.host)
    return chain_port


def _apart(args: argparse.Namespace, chain_port: int) -> int:
    """`chain_port`, refused when it is also a public port."""
    if chain_port in frontend_ports(args).values() and chain_port != 0:
        raise MoiraiError(
            f"--chain-port {chain_port} is also a front-end port: the stages' pushes need "
            "a port of their own, apart from the public endpoint"
        )
    return chain_port
