"""`moirai stage`: run the stage server of one device of a stage plan (or of several).

    moirai stage --plan plan.json --model model.onnx --device cpu-1 --port 50052 \
        [--host 127.0.0.1] [--peer cpu-0=127.0.0.1:50051 --peer gateway=127.0.0.1:8001] \
        [--threads N] [--cuda-device ID] [--cpus 2,3] [--workers 1] [--no-spin] [--grpc-only] \
        [--frontend [--grpc-port 8001] [--http-port 8000] [--max-request-bytes N] [--timeout 30]
                    [--max-batch-size 8 ...]]

With `--frontend` the stage server is also the model's Open Inference Protocol endpoint (what
`moirai serve` runs in the process of the plan's first stage): its stages get model inputs and
give back final outputs in memory, and the other stage servers push final outputs to `--port`
(give them this server's address as the `gateway` peer). `--cpus` then pins only the threads
that run the stages, so that the front end can use every core.

Several `--device` flags serve several devices from one process (what `moirai serve` runs for a
plan of several lanes: the front end with the first stage of every lane, so that no request
crosses a process to reach its lane): each device's stages run in a thread of its own, pinned
by `--cpus DEVICE=CORES`, and hand tensors to each other in memory.

Peer addresses come from the plan's endpoints, `MOIRAI_PEERS` (JSON) and `--peer`. Every flag
has an environment fallback for containers: MOIRAI_PLAN, MOIRAI_MODEL, MOIRAI_DEVICE,
MOIRAI_HOST, MOIRAI_PORT.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from moirai.cli.gateway import (
    add_chain_arguments,
    add_frontend_arguments,
    chain_options,
    frontend_ports,
)
from moirai.cli.options import check_port_free, port, positive_int
from moirai.errors import MoiraiError
from moirai.runtime.daemon import (
    Stoppable,
    check_model_file,
    peer_addresses,
    run_until_signalled,
)
from moirai.stageplan import StagePlan
from stage_server.settings import DEFAULT_MAX_PENDING_BYTES


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("stage", help="run the stage server of one device")
    env = os.environ.get
    p.add_argument("--plan", default=env("MOIRAI_PLAN"), help="stage plan JSON")
    p.add_argument("--model", default=env("MOIRAI_MODEL"), help="the ONNX model the plan cuts")
    p.add_argument(
        "--device",
        action="append",
        help="device name in the plan; several: serve them all from this process, each "
        "device's stages in a thread of its own (default: MOIRAI_DEVICE)",
    )
    p.add_argument("--host", default=env("MOIRAI_HOST", "127.0.0.1"), help="address to bind")
    p.add_argument("--port", type=port, default=env("MOIRAI_PORT", "50051"))
    p.add_argument("--peer", action="append", default=[], metavar="NAME=HOST:PORT")
    p.add_argument("--threads", type=positive_int, help="intra-op threads (default: the plan's)")
    p.add_argument("--cuda-device", type=int, help="CUDA device id (default: the plan's)")
    p.add_argument(
        "--cpus",
        action="append",
        metavar="[DEVICE=]CORES",
        help="pin this process to these cores, e.g. 0,1; with several devices, each one's "
        "stage threads: cpu-0=0 --cpus cpu-1=1",
    )
    p.add_argument("--workers", type=positive_int, default=1, help="stages run at once (default 1)")
    p.add_argument(
        "--no-spin",
        action="store_true",
        help="ONNX Runtime's threads never spin, even on cores of their own (other stage "
        "servers share them)",
    )
    p.add_argument(
        "--grpc-only",
        action="store_true",
        help="no same-host fast path: every push over gRPC, as between hosts",
    )
    p.add_argument(
        "--frontend",
        action="store_true",
        help="also serve the model's Open Inference Protocol endpoint from this process",
    )
    add_chain_arguments(p)
    p.add_argument(
        "--max-pending-bytes",
        type=positive_int,
        default=DEFAULT_MAX_PENDING_BYTES,
        metavar="N",
        help="bytes of tensors held for requests at most (their memory: a string tensor's "
        "elements too); pushes past it are refused with "
        f"RESOURCE_EXHAUSTED (default {DEFAULT_MAX_PENDING_BYTES})",
    )
    add_frontend_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.device and os.environ.get("MOIRAI_DEVICE"):
        args.device = [os.environ["MOIRAI_DEVICE"]]
    for flag in ("plan", "model", "device"):
        if not getattr(args, flag):
            raise MoiraiError(f"--{flag} is required (or MOIRAI_{flag.upper()})")
    if len(args.device) > 1 and (args.threads or args.cuda_device is not None):
        raise MoiraiError(
            "--threads / --cuda-device apply to one --device: with several, each device "
            "takes the plan's"
        )
    public = frontend_ports(args) if args.frontend else {}
    ports = {"--port": args.port, **public}
    if args.port in public.values():
        raise MoiraiError(
            f"--port {args.port} is also a front-end port: the chain needs a port of its "
            "own, apart from the public endpoint"
        )
    for flag, number in ports.items():
        check_port_free(flag, number, args.host)
    cpus = core_pins(args.cpus or [], args.device)
    if cpus and not args.frontend and len(args.device) == 1:
        # The whole process runs the stages of one device: pin it.
        (cores,) = cpus.values()
        try:
            os.sched_setaffinity(0, cores)
        except OSError as e:
            raise MoiraiError(f"--cpus {args.cpus[0]}: cannot pin to these cores ({e})") from None
    from moirai.graph import load_model
    from stage_server.allocator import keep_freed_memory
    from stage_server.batchconfig import check_model_names
    from stage_server.batchconfig import from_args as batching_from_args
    from stage_server.serve import Frontend, start_stage
    from stage_server.settings import EndpointConfig
    from stage_server.settings import from_args as endpoint_from_args

    endpoint = endpoint_from_args(args) if args.frontend else None
    keep_freed_memory()
    plan = StagePlan.load(args.plan)
    for device in args.device:
        plan.device(device)
    check_model_names(args, [plan.model_name])
    batching = batching_from_args(args, plan.model_name)
    model_path = Path(args.model)
    check_model_file(plan, model_path)
    # The plan's types fix what is static. A plan with a digest names a model that was checked
    # when it was planned: ONNX's checker, which reads the whole file, would only raise this
    # server's peak memory.
    model = load_model(model_path, symbolic=True, check=not plan.model_sha256)
    addresses = peer_addresses(plan, args.peer)
    # Last: it warns of an open chain, which is no news beside a plan or model refused.
    chain = chain_options(args, max_pending_bytes=args.max_pending_bytes)

    async def start() -> Stoppable:
        return await start_stage(
            model,
            plan,
            args.device,
            addresses,
            host=args.host,
            port=args.port,
            threads=args.threads,
            cuda_device=args.cuda_device,
            workers=args.workers,
            same_host=not args.grpc_only,
            cpus=cpus if args.frontend or len(args.device) > 1 else None,
            chain=chain,
            spin=not args.no_spin,
            frontend=Frontend(
                args.grpc_port,
                args.http_port,
                args.max_request_bytes,
                args.timeout,
                batching,
                endpoint or EndpointConfig(),
            )
            if args.frontend
            else None,
        )

    what = f"stage server {', '.join(args.device)} on {args.host}:{args.port}"
    if args.frontend:
        what += f", front end on :{args.grpc_port} (gRPC), :{args.http_port} (HTTP)"
    return run_until_signalled(start, what)


def core_pins(values: list[str], devices: list[str]) -> dict[str, set[int]]:
    """Device -> its cores, from `--cpus` values: `0,1` for the one device, or `DEVICE=0,1`."""
    pins: dict[str, set[int]] = {}
    for value in values:
        device, sep, cores = value.rpartition("=")
        if not sep:
            if len(devices) > 1:
                raise MoiraiError(
                    f"--cpus {value}: with several --device, name the device: "
                    f"--cpus {devices[0]}={value}"
                )
            device = devices[0]
        if device not in devices:
            raise MoiraiError(
                f"--cpus {value}: {device!r} is not a --device of this server "
                f"({', '.join(devices)})"
            )
        try:
            pins[device] = {int(c) for c in cores.split(",")}
        except ValueError:
            raise MoiraiError(f"--cpus {value}: write core numbers, e.g. 0,1") from None
        if not pins[device] <= os.sched_getaffinity(0):
            raise MoiraiError(
                f"--cpus {value}: cannot pin to these cores (not all of them are available to "
                f"this process: {','.join(map(str, sorted(os.sched_getaffinity(0))))})"
            )
    return pins
