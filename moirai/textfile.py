"""Reading and writing the YAML and JSON files users name (devices, cost graphs, profiles, plans).

One set of helpers, so that every loader refuses an unreadable file, or one that is not text at
all (an `.onnx` model passed to `--devices`), and every writer a path it cannot write, in the
same single line instead of a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moirai.errors import MoiraiError


def read_text(path: str | Path, what: str, error: type[MoiraiError]) -> str:
    """The UTF-8 text of `path`; otherwise `error`, naming the file and the `what` expected."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise error(
            f"{path}: not a YAML/JSON text file (byte {e.start} is not UTF-8), so not a {what}"
        ) from None


def read_json(path: str | Path, what: str, error: type[MoiraiError]) -> Any:
    """The parsed JSON document at `path`; otherwise `error` in one line naming the file."""
    text = read_text(path, what, error)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(
            f"{path}: not valid JSON at line {e.lineno} column {e.colno}: {e.msg}"
        ) from None


def write_json(path: str | Path, data: Any, what: str) -> None:
    """Write `data` as indented JSON; a path that cannot be written is one `MoiraiError` line
    naming it (`-o /proc/x.json`), not a traceback."""
    text = json.dumps(data, indent=1) + "\n"
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as e:
        raise MoiraiError(f"{path}: cannot write {what} ({e.strerror or e})") from None
