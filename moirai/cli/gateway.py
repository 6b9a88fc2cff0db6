"""`moirai gateway`: the Open Inference Protocol endpoint of a stage plan.

    moirai gateway --plan plan.json [--grpc-port 8001] [--http-port 8000] [--host 127.0.0.1] \
        [--peer cpu-0=127.0.0.1:50051 ...] [--chain-port PORT] [--max-request-bytes N] \
        [--timeout 30] [--model model.onnx] [--grpc-only] \
        [--max-batch-size 8 [--preferred-batch-sizes 4,8] [--max-queue-delay-us 2000]]

Stage servers push final outputs to the gateway's `--chain-port` (by default the gRPC port).
`--model` is optional: given, the gateway refuses a model file other than the plan's. The batching
flags turn on dynamic batching (`stage_server.batching`). Environment fallbacks: MOIRAI_PLAN,
MOIRAI_HOST, MOIRAI_PEERS.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from moirai.cli.options import check_port_free, positive_float, positive_int
from moirai.errors import MoiraiError
from moirai.runtime.daemon import (
    Stoppable,
    check_model_file,
    peer_addresses,
    run_until_signalled,
)
from moirai.stageplan import StagePlan


def add_frontend_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of an Open Inference Protocol front end (`moirai gateway`, `moirai stage
    --frontend`)."""
    from stage_server.batchconfig import add_arguments as add_batching_arguments
    from stage_server.serve import DEFAULT_MAX_REQUEST_BYTES

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


def frontend_ports(args: argparse.Namespace) -> dict[str, int]:
    """The front end's ports by flag, for `check_port_free`."""
    if args.grpc_port == args.http_port != 0:  # 0: any free port
        raise MoiraiError(f"--grpc-port and --http-port are both {args.grpc_port}: give two ports")
    return {"--grpc-port": args.grpc_port, "--http-port": args.http_port}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("gateway", help="run the inference gateway of a stage plan")
    env = os.environ.get
    p.add_argument("--plan", default=env("MOIRAI_PLAN"), help="stage plan JSON")
    p.add_argument("--model", help="check that this model file is the plan's")
    p.add_argument("--host", default=env("MOIRAI_HOST", "127.0.0.1"), help="address to bind")
    add_frontend_arguments(p)
    p.add_argument("--chain-port", type=int, help="port for stage pushes (default: gRPC port)")
    p.add_argument("--peer", action="append", default=[], metavar="NAME=HOST:PORT")
    p.add_argument(
        "--grpc-only",
        action="store_true",
        help="no same-host fast path: every push over gRPC, as between hosts",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.plan:
        raise MoiraiError("--plan is required (or MOIRAI_PLAN)")
    ports = frontend_ports(args)
    if args.chain_port is not None:
        ports["--chain-port"] = args.chain_port
    for flag, number in ports.items():
        check_port_free(flag, number, args.host)
    from stage_server.allocator import keep_freed_memory
    from stage_server.batchconfig import from_args
    from stage_server.serve import start_gateway

    batching = from_args(args)
    keep_freed_memory()
    plan = StagePlan.load(args.plan)
    if args.model:
        check_model_file(plan, Path(args.model))
    addresses = peer_addresses(plan, args.peer)

    async def start() -> Stoppable:
        return await start_gateway(
            plan,
            addresses,
            host=args.host,
            grpc_port=args.grpc_port,
            http_port=args.http_port,
            chain_port=args.chain_port,
            max_request_bytes=args.max_request_bytes,
            timeout_s=args.timeout,
            same_host=not args.grpc_only,
            batching=batching,
        )

    return run_until_signalled(
        start, f"gateway on {args.host}:{args.grpc_port} (gRPC), :{args.http_port} (HTTP)"
    )
