"""Reading the YAML and JSON files users name (devices, cost graphs, profiles, plans).

One helper, so that every loader refuses an unreadable file, or one that is not text at all
(an `.onnx` model passed to `--devices`), in the same single line instead of a traceback.
"""

from __future__ import annotations

from pathlib import Path

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
