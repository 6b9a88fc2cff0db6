"""`moirai serve`: plan models over this machine's devices and serve them on loopback.

    moirai serve model.onnx [other.onnx | models/ | NAME=model.onnx ...] \
        [--devices local|devices.yaml] [--cpu-devices N] \
        [--profile analytic|measured|FILE] [--solver auto] [--objective latency|throughput] \
        [--time-limit 10] [--max-tasks N] \
        [--input-shape input=1x3x224x224] [--grpc-port 8001] [--http-port 8000] \
        [--max-batch-size [MODEL=]8 [--preferred-batch-sizes [MODEL=]4,8] \
         [--max-queue-delay-us [MODEL=]2000]]

Plans with a measured profile of this machine's devices (cached; `--profile analytic|FILE`
otherwise; analytic by default with a devices file), choosing how to group the CPU's cores into
stage servers unless `--cpu-devices` says, and for a throughput plan how many lanes (copies of
the model) to run; starts one stage server per used device as local processes (the Open
Inference Protocol front end inside the first stage's), prints the plan (with its latency
predicted as served, and its period for a throughput plan) and the endpoint, and serves until
Ctrl-C or SIGTERM, then stops every process. A process that dies, the front end's included, is
restarted on its address. `--max-batch-size` turns on dynamic batching at the front end
(`stage_server.batching`), for a model whose inputs and outputs have a symbolic batch dimension.

Several models (several files, a folder of models, `NAME=PATH` to name one) are served behind
one endpoint, each under its name (the file's stem): each is planned on the same devices, their
memory shared (`moirai.planning.together`: the plans and then one line of how the memory was
split are printed, and models that do not fit together are refused before anything starts), and
the front end runs in a process of its own (`moirai.runtime.local`). `--input-shape` then names
its model (`MODEL:INPUT=DIMS`), and a batching flag applies to every model unless it names one
(`--max-batch-size MODEL=8`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from moirai.cli.options import (
    check_port_free,
    output_folder,
    port,
    positive_float,
    positive_int,
    resolve_from_args,
    solver_name,
    solver_options,
)
from moirai.errors import MoiraiError
from moirai.stageplan import StagePlan
from stage_server.batchconfig import add_arguments as add_batching_arguments
from stage_server.batchconfig import check_model_names
from stage_server.batchconfig import from_args as batching_from_args
from stage_server.settings import add_arguments as add_endpoint_arguments
from stage_server.settings import from_args as endpoint_from_args

if TYPE_CHECKING:
    import onnx

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
    p.add_argument(
        "--solver", type=solver_name, default="auto", help="placement solver (default auto)"
    )
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
        "--input-shape",
        action="append",
        default=[],
        metavar="NAME=DIMS",
        help="e.g. x=1x3x224x224, or a symbolic dimension of every input, e.g. sequence=128 "
        "(serving several models: MODEL:NAME=DIMS)",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="plan a model and serve it on this machine")
    p.add_argument(
        "model",
        nargs="+",
        help="ONNX model file, a folder of models, or NAME=FILE to serve it as NAME; several "
        "are served behind one endpoint",
    )
    add_planning_arguments(p)
    p.add_argument("--grpc-port", type=port, default=8001, help="OIP gRPC port (default 8001)")
    p.add_argument("--http-port", type=port, default=8000, help="OIP HTTP port (default 8000)")
    p.add_argument("--timeout", type=positive_float, default=30.0, help="request deadline, seconds")
    p.add_argument(
        "--workdir", type=output_folder, help="where the plan and logs go (default: temporary)"
    )
    add_batching_arguments(p)
    add_endpoint_arguments(p)
    p.set_defaults(func=run)


def plan_from_args(
    args: argparse.Namespace,
    model: Path,
    input_shapes: Sequence[str] | Mapping[str, Sequence[int]] | None = None,
):
    """Plan `model` as the planning flags say (`input_shapes` overrides `--input-shape`)."""
    from moirai.planning import plan_model

    inputs = resolve_from_args(args, model, input_shapes)
    return plan_model(
        inputs.model, inputs.device_sets, profile=inputs.profile, **solver_options(args)
    )


MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def model_files(values: Sequence[str]) -> dict[str, Path]:
    """Model name -> file, from `moirai serve`'s arguments: a file (named by its stem),
    `NAME=FILE`, or a folder, which serves each `*.onnx` file in it and each sub-folder that
    holds exactly one (named by the sub-folder: a model with its external data files)."""
    found: dict[str, Path] = {}
    for value in values:
        name, sep, rest = value.partition("=")
        named = bool(sep) and not Path(value).exists()
        path = Path(rest if named else value)
        if path.is_dir() and not named:
            entries = _folder(path)
        elif path.is_file():
            entries = [(name if named else path.stem, path)]
        else:
            raise MoiraiError(f"{path}: no such model file" + ("" if named else " or folder"))
        for model, file in entries:
            if not MODEL_NAME.fullmatch(model):
                raise MoiraiError(
                    f"{file}: {model!r} cannot name a model in a URL: give NAME={file} with a "
                    "name of letters, digits, '_', '.' and '-'"
                )
            if model in found:
                raise MoiraiError(
                    f"{found[model]} and {file} are both model {model!r}: give one another "
                    f"name, e.g. {model}-2={file}"
                )
            found[model] = file
    return found


def _folder(path: Path) -> list[tuple[str, Path]]:
    entries = []
    for entry in sorted(path.iterdir()):
        if entry.is_file() and entry.suffix == ".onnx":
            entries.append((entry.stem, entry))
        elif entry.is_dir():
            inside = sorted(entry.glob("*.onnx"))
            if len(inside) == 1:
                entries.append((entry.name, inside[0]))
    if not entries:
        raise MoiraiError(
            f"{path}: no model in this folder (*.onnx files, or sub-folders holding one each)"
        )
    return entries


def _input_shapes(values: Sequence[str], name: str, names: Sequence[str]) -> list[str]:
    """The `--input-shape` flags of model `name` among several: `MODEL:INPUT=DIMS`."""
    out = []
    for value in values:
        model, sep, rest = value.partition(":")
        if not sep or "=" in model:
            raise MoiraiError(
                f"--input-shape {value}: serving several models, name the model too: "
                f"MODEL:{value}, e.g. {names[0]}:{value}"
            )
        if model not in names:
            raise MoiraiError(
                f"--input-shape {value}: no model {model!r} is served; the models are "
                + ", ".join(names)
            )
        if model == name:
            out.append(rest)
    return out


def _named(plan: StagePlan, name: str) -> StagePlan:
    return plan if plan.model_name == name else dataclasses.replace(plan, model_name=name)


def plan_several(args: argparse.Namespace, files: dict[str, Path]) -> dict[str, StagePlan]:
    """Plan several models on shared devices (`moirai.planning.together`), print each plan and
    how the memory was split; their plans by name."""
    from moirai.planning import describe, plan_model
    from moirai.planning.together import plan_together

    names = list(files)
    models = {
        name: resolve_from_args(args, path, _input_shapes(args.input_shape, name, names))
        for name, path in files.items()
    }
    together = plan_together(
        models,
        lambda inputs, device_sets: plan_model(
            inputs.model,
            device_sets,
            profile=inputs.profile,
            fused_front_end=False,  # several models: the front end runs alone
            **solver_options(args),
        ),
    )
    plans = {name: _named(p.plan, name) for name, p in together.planned.items()}
    for plan in plans.values():
        print(describe(plan), flush=True)
    print(together.describe_memory(), flush=True)
    return plans


def _check_declared_batch(name: str, path: Path) -> None:
    """Refuse batching for a model whose file fixes the first dimension of an input or output,
    before any profiling or solving (minutes, for a large model); the plan's tensors are
    checked again once planned."""
    from moirai.graph import dynamic_shapes
    from moirai.stageplan import TensorSpec
    from moirai.weights import read_skeleton
    from stage_server.batchconfig import check_batchable

    graph = read_skeleton(path).graph
    shapes = dynamic_shapes(path)
    weights = {i.name for i in graph.initializer}

    def declared(values: Sequence[onnx.ValueInfoProto]) -> list[TensorSpec]:
        return [
            TensorSpec(v.name, "", shapes[v.name])
            for v in values
            if v.name in shapes and v.name not in weights
        ]

    check_batchable(name, declared(graph.input), declared(graph.output))


WORKDIR_PREFIX = "moirai-serve-"
OWNER_FILE = "serve.pid"
"""In a temporary working folder, the process id of the `moirai serve` that made it."""


def remove_abandoned_workdirs() -> None:
    """Remove the temporary working folders (plan, logs) of `moirai serve` runs that were
    killed (SIGKILL: nothing of theirs ran to remove them), so they do not pile up: this user's
    folders whose owner process is gone. A folder with no owner file, or whose process id
    names a live process, stays."""
    for folder in Path(tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}*"):
        try:
            if folder.stat().st_uid != os.getuid():
                continue
            pid = int((folder / OWNER_FILE).read_text())
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (OSError, ValueError):
            continue  # no owner file yet, not ours, or a live process of another user


def run(args: argparse.Namespace) -> int:
    from moirai.cli.gateway import frontend_ports
    from moirai.planning import describe
    from moirai.runtime.local import LocalDeployment, LocalModel
    from stage_server.batchconfig import check_batchable

    batching_from_args(args)  # the flags for every model make sense, before any work
    endpoint = endpoint_from_args(args)
    for flag, number in frontend_ports(args).items():
        check_port_free(flag, number)
    files = model_files(args.model)
    names = list(files)
    check_model_names(args, names)
    batching = {name: batching_from_args(args, name) for name in names}
    for name, path in files.items():
        if batching[name].enabled:
            _check_declared_batch(name, path)
    if len(files) == 1:
        planned = plan_from_args(args, files[names[0]])
        plans = {names[0]: _named(planned.plan, names[0])}
        print(describe(plans[names[0]]), flush=True)
    else:
        plans = plan_several(args, files)
    for name, plan in plans.items():
        if batching[name].enabled:
            check_batchable(name, plan.inputs, plan.outputs)
    models = [LocalModel(plans[n], files[n].resolve(), batching[n]) for n in names]
    remove_abandoned_workdirs()
    with tempfile.TemporaryDirectory(prefix=WORKDIR_PREFIX) as tmp:
        (Path(tmp) / OWNER_FILE).write_text(str(os.getpid()))
        first, *more = models
        deployment = LocalDeployment(
            first.plan,
            first.model_path,
            args.workdir or Path(tmp),
            grpc_port=args.grpc_port,
            http_port=args.http_port,
            timeout_s=args.timeout,
            batching=first.batching,
            more=tuple(more),
            endpoint=endpoint,
        )
        stopping = False

        def on_signal(signum: int, frame: object) -> None:
            nonlocal stopping
            stopping = True

        previous: dict[int, object] = {}
        try:
            # Until every server is up, Ctrl-C and SIGTERM unwind as while planning (`moirai.cli`:
            # status 130 or 143, the servers started so far stopped), rather than leave start-up
            # waiting and then take the stage servers that the same Ctrl-C stopped for crashed.
            deployment.start()
            previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
            endpoint = deployment.endpoint
            web = "https" if endpoint.tls else "http"
            scrape = "https" if endpoint.tls and endpoint.metrics_port is None else "http"
            print(
                f"serving {', '.join(names)}: gRPC {deployment.grpc_url}"
                + (" (TLS)" if endpoint.tls else "")
                + f", HTTP {web}://{deployment.http_url} (Open Inference Protocol); "
                f"metrics at {scrape}://{deployment.metrics_url}/metrics; Ctrl-C stops",
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
