"""The `moirai` command line: a thin shell over the library.

Each subcommand lives in its own module (`moirai/cli/<name>.py`) exposing
`register(subparsers) -> None`, which adds its parser and sets `func=run`, where
`run(args) -> int` returns the exit status. `main` turns every `MoiraiError`, and every
`OSError` (a path the system refuses to write), into one line on stderr and exit status 2, and
Ctrl-C into status 130, so users never see a traceback for bad input. argparse's own errors (a
missing argument, a value its type refuses) take the same form, one `moirai: ` line and status 2,
instead of the usage followed by the error.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
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


def _configure_logging(command: str, verbose: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        if command in SERVERS
        else _OneLine()
    )
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _run(argv)
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
