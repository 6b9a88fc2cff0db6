"""`moirai serve`: plan a model over this machine's devices and serve it on loopback.

    moirai serve model.onnx [--devices local|devices.yaml] [--cpu-devices N] \
        [--profile analytic|measured|FILE] [--solver auto] [--objective latency|throughput] \
        [--time-limit 10] [--max-tasks N] \
        [--input-shape input=1x3x224x224] [--grpc-port 8001] [--http-port 8000] \
        [--max-batch-size 8 [--preferred-batch-sizes 4,8] [--max-queue-delay-us 2000]]

Plans with a measured profile of this machine's devices (cached; `--profile analytic|FILE`
otherwise; analytic by default with a devices file), choosing how to group the CPU's cores into
stage servers unless `--cpu-devices` says, and for a throughput plan how many lanes (copies of
the model) to run; starts one stage server per used device as local processes (the Open
Inference Protocol front end inside the first stage's), prints the plan (with its latency
predicted as served, and its period for a throughput plan) and the endpoint, and serves until
Ctrl-C or SIGTERM, then stops every process. A process that dies, the front end's included, is
restarted on its address. `--max-batch-size` turns on dynamic batching at the front end
(`stage_server.batching`), for a model whose inputs and outputs have a symbolic batch dimension.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import tempfile
import time
from pathlib import Path

from moirai.cli.options import (
    check_port_free,
    output_folder,
    port,
    positive_float,
    positive_int,
)
from moirai.errors import MoiraiError
from stage_server.batchconfig import add_arguments as add_batching_arguments
from stage_server.batchconfig import from_args as batching_from_args

log = logging.getLogger(__name__)


def add_planning_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--devices", default="local", help="'local' or a devices YAML file")
    p.add_argument(
        "--cpu-devices",
        type=positive_int,
        help="with --devices local: split the CPU into this many devices (default: the "
        "planner chooses how to group the cores, by predicted served time)",
    )
    p.add_argument(
        "--profile",
        metavar="measured|analytic|FILE",
        help="task costs: 'measured' on this machine's devices (cached; the default with "
        "--devices local), 'analytic' (the default with a devices file), or a profile file from "
        "`moirai profile`",
    )
    p.add_argument("--solver", default="auto", help="placement solver (default auto)")
    p.add_argument("--objective", choices=("latency", "throughput"), default="latency")
    p.add_argument(
        "--time-limit", type=positive_float, default=10.0, help="solver time limit, seconds"
    )
    p.add_argument(
        "--max-tasks",
        type=positive_int,
        help="coarsen the model to at most this many tasks before solving: fewer possible "
        "stages, each of which costs a hop (default: every fusion group a task)",
    )
    p.add_argument(
        "--input-shape", action="append", default=[], metavar="NAME=DIMS", help="e.g. x=1x3x224x224"
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="plan a model and serve it on this machine")
    p.add_argument("model", type=Path, help="ONNX model file")
    add_planning_arguments(p)
    p.add_argument("--grpc-port", type=port, default=8001, help="OIP gRPC port (default 8001)")
    p.add_argument("--http-port", type=port, default=8000, help="OIP HTTP port (default 8000)")
    p.add_argument("--timeout", type=positive_float, default=30.0, help="request deadline, seconds")
    p.add_argument(
        "--workdir", type=output_folder, help="where the plan and logs go (default: temporary)"
    )
    add_batching_arguments(p)
    p.set_defaults(func=run)


def plan_from_args(args: argparse.Namespace, model: Path, input_shapes: object = None):
    """Plan `model` as the planning flags say (`input_shapes` overrides `--input-shape`)."""
    from moirai.planning import plan_model, resolve

    inputs = resolve(
        model,
        args.devices,
        cpu_devices=args.cpu_devices,
        input_shapes=args.input_shape if input_shapes is None else input_shapes,
        profile=args.profile,
        progress=lambda message: print(f"moirai: profile: {message}", file=sys.stderr),
    )
    return plan_model(
        inputs.model,
        inputs.device_sets,
        solver=args.solver,
        objective=args.objective,
        time_limit=args.time_limit,
        profile=inputs.profile,
        max_tasks=args.max_tasks,
    )


def run(args: argparse.Namespace) -> int:
    from moirai.planning import describe
    from moirai.runtime.local import LocalDeployment
    from stage_server.batchconfig import check_batchable

    batching = batching_from_args(args)
    if args.grpc_port == args.http_port:
        raise MoiraiError(f"--grpc-port and --http-port are both {args.grpc_port}: give two ports")
    check_port_free("--grpc-port", args.grpc_port)
    check_port_free("--http-port", args.http_port)
    planned = plan_from_args(args, args.model)
    print(describe(planned.plan), flush=True)
    if batching.enabled:
        check_batchable(planned.plan.model_name, planned.plan.inputs, planned.plan.outputs)
    with tempfile.TemporaryDirectory(prefix="moirai-serve-") as tmp:
        deployment = LocalDeployment(
            planned.plan,
            args.model.resolve(),
            args.workdir or Path(tmp),
            grpc_port=args.grpc_port,
            http_port=args.http_port,
            timeout_s=args.timeout,
            batching=batching,
        )
        stopping = False

        def on_signal(signum: int, frame: object) -> None:
            nonlocal stopping
            stopping = True

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            deployment.start()
            print(
                f"serving {planned.plan.model_name}: gRPC {deployment.grpc_url}, "
                f"HTTP http://{deployment.http_url} (Open Inference Protocol); "
                f"metrics at http://{deployment.http_url}/metrics; Ctrl-C stops",
                flush=True,
            )
            while not stopping:
                time.sleep(0.2)
                for name, proc in deployment.processes.items():
                    if proc.poll() is not None and not stopping:
                        log.warning(
                            "%s exited (%s); restarting it: %s",
                            name,
                            proc.returncode,
                            deployment.log_tail(name, 2),
                        )
                        deployment.restart(name)
        finally:
            deployment.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)
        print("stopped", flush=True)
    return 0
