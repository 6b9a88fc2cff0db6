"""Argument types the subcommands share: positive (or non-negative) numbers, ports, files and
folders to write; the check that a port is free; and the planning flags' values as the planner
takes them (`resolve_from_args`, `solver_options`: `moirai place`, `serve` and `demo`).

argparse calls the types while it parses, so a bad value is refused with the flag's name and exit
status 2 before any work starts. Without them a `--time-limit nan` solved with no limit, a
`--max-tasks 0` or `--requests 0` ended in a traceback, and an `-o` into a missing folder failed
only after minutes of profiling or solving, losing the result.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moirai.errors import MoiraiError

if TYPE_CHECKING:
    from moirai.planning import PlanningInputs


def _number(text: str, convert: type[int] | type[float], noun: str) -> int | float:
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None


def positive_int(text: str) -> int:
    value = int(_number(text, int, "a whole number"))
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0: seconds, for instance."""
    value = _number(text, float, "a number")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number > 0")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0: seconds that may be none."""
    value = _number(text, float, "a number")
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0")
    return value


def port(text: str) -> int:
    value = int(_number(text, int, "a port number"))
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port: use 1 to 65535")
    return value


def output_file(text: str) -> Path:
    """A file that can be written: its folder exists and is writable, and it is no folder."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder: name a file in it")
    folder = path.parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"folder {folder} does not exist: create it first")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write in folder {folder}")
    return path


def output_folder(text: str) -> Path:
    """A folder to write into, created now (before any work) if it does not exist yet."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot create folder {text} ({e.strerror})") from None
    if not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write in folder {text}")
    return path


def solver_name(text: str) -> str:
    """A solver of `moirai.placement.registry` that can run here: an unknown name used to be
    refused only after the model was loaded and profiled (minutes, when measured)."""
    from moirai.errors import SolverError
    from moirai.placement.registry import get_solver

    try:
        get_solver(text)
    except SolverError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def picture_file(text: str) -> Path:
    """An `output_file` whose suffix names a format matplotlib draws (`.png`, `.svg`, `.pdf`,
    ...): another used to end a finished solve in matplotlib's traceback."""
    path = output_file(text)
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix.lower().lstrip(".") not in formats:
        raise argparse.ArgumentTypeError(
            f"{text}: name a picture file, ending in one of "
            + ", ".join(f".{f}" for f in sorted(formats))
        )
    return path


def check_port_free(flag: str, port: int, host: str = "127.0.0.1") -> None:
    """Refuse a port that something listens on, naming the flag. The probe sets no SO_REUSEPORT,
    so it also sees a gRPC server, which sets it: a second server would otherwise bind the same
    port as the first, and a gateway or stage server then died on its same-host socket with a
    traceback. Port 0 (any free port) needs no check."""
    if port == 0:
        return
    try:
        family, kind, _, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as e:
        raise MoiraiError(f"--host {host}: not an address to listen on ({e.strerror})") from None
    with socket.socket(family, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no listener
        try:
            probe.bind(address)
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise MoiraiError(
                    f"{flag} {port}: cannot listen on {host} ({e.strerror})"
                ) from None
            raise MoiraiError(
                f"{flag} {port}: {host}:{port} is taken; stop what serves there or pick another "
                "port"
            ) from None


def resolve_from_args(
    args: argparse.Namespace,
    model: Path,
    input_shapes: Sequence[str] | Mapping[str, Sequence[int]] | None = None,
) -> PlanningInputs:
    """The planner's inputs for `model` as the planning flags say (`--devices`, `--cpu-devices`,
    `--input-shape` unless `input_shapes` is given, `--profile`), profiling progress on stderr."""
    from moirai.planning import resolve

    return resolve(
        model,
        args.devices,
        cpu_devices=args.cpu_devices,
        input_shapes=args.input_shape if input_shapes is None else input_shapes,
        profile=args.profile,
        progress=lambda message: print(f"moirai: profile: {message}", file=sys.stderr),
    )


def solver_options(args: argparse.Namespace) -> dict[str, Any]:
    """`moirai.planning.plan_model`'s keywords from the solver flags (`--solver`, `--objective`,
    `--time-limit`, `--max-tasks`)."""
    return {
        "solver": args.solver,
        "objective": args.objective,
        "time_limit": args.time_limit,
        "max_tasks": args.max_tasks,
    }
