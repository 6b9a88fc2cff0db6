"""The `moirai` command line: a thin shell over the library.

Each subcommand lives in its own module (`moirai/cli/<name>.py`) exposing
`register(subparsers) -> None`, which adds its parser and sets `func=run`, where
`run(args) -> int` returns the exit status. `main` turns every `MoiraiError`, and every
`OSError` (a path the system refuses to write), into one line on stderr and exit status 2, and
Ctrl-C into status 130, so users never see a traceback for bad input. argparse's own errors (a
missing argument, a value its type refuses) take the same form, one `moirai: ` line and status 2,
instead of the usage followed by the error.

SIGTERM (`kill`, a pod being stopped) unwinds as Ctrl-C does (`Terminated`), ending in status
143: it used to end the process where it stood, so that one sent while `moirai serve` or `moirai
place` profiled or planned left their temporary folders behind. A command that serves installs
its own handler once it serves (`moirai serve` stops its processes).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import NoReturn

from moirai import __version__
from moirai.errors import MoiraiError

SUBCOMMANDS = ("place", "profile", "serve", "infer", "demo", "stage", "gateway")


class _Parser(argparse.ArgumentParser):
    """The subcommands' parsers are of this class too (argparse makes them of the parent's)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"moirai: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="moirai",
        description="Place an ONNX model across heterogeneous devices and serve it.",
    )
    parser.add_argument("--version", action="version", version=f"moirai {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"moirai.cli.{name}").register(subparsers)
    return parser


SERVERS = ("serve", "stage", "gateway")
"""Subcommands that run until stopped: their log lines carry the time; the others' (`demo` too,
whose servers are child processes logging to files) read as the rest of their messages to a
person, `moirai: ...` (`_OneLine`)."""


class _OneLine(logging.Formatter):
    """`moirai: message`, and `moirai: warning: message` above INFO."""

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno <= logging.INFO else f"{record.levelname.lower()}: "
        return f"moirai: {level}{super().format(record)}"


class _Once(logging.Filter):
    """A warning said again word for word is not said again. Planning analyses one model for
    every device it profiles, and each analysis meets the same problem: the first `moirai place`
    of a QDQ-quantised MobileNetV3 exported from torchvision said that its CPU fusions came from
    the extended level only, and why, 5 times. Only for the commands that end (not `SERVERS`,
    where a warning that comes back later is news)."""

    def __init__(self) -> None:
        super().__init__()
        self._said: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        message = record.getMessage()
        if message in self._said:
            return False
        self._said.add(message)
        return True


def _handler(command: str) -> logging.Handler:
    handler = logging.StreamHandler()
    if command in SERVERS:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(_OneLine())
        handler.addFilter(_Once())
    return handler


def _configure_logging(command: str, verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, handlers=[_handler(command)])


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program stands, so that it unwinds as from Ctrl-C: temporary
    folders removed, child processes stopped, priorities put back."""


def _terminate(signum: int, frame: object) -> NoReturn:
    raise Terminated


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM raises `Terminated` while the block lasts, unless it is ignored (`nohup`) or this
    is not the main thread (which alone may set handlers)."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    ):
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        with _sigterm_unwinds():
            return _run(argv)
    except Terminated:
        print("moirai: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:  # also while the subcommands' imports load, before any work
        print("moirai: interrupted", file=sys.stderr)
        return 130


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.command, args.verbose)
    try:
        return int(args.func(args) or 0)
    except MoiraiError as e:
        print(f"moirai: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file or folder the system refused (`-o /proc/x.json`, a full disk)
        where = f"{e.filename}: " if e.filename else ""
        print(f"moirai: {where}{e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
