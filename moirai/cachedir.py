"""Where Moirai caches what it can compute again: `$MOIRAI_CACHE`, else
`$XDG_CACHE_HOME/moirai`, else `~/.cache/moirai`; each kind of entry in a folder of its own
(`zoo`, `profiles`, `digests`). Entries are written whole or not at all (`write_entry`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def cache_dir(kind: str) -> Path:
    if "MOIRAI_CACHE" in os.environ:
        return Path(os.environ["MOIRAI_CACHE"]) / kind
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moirai" / kind


def write_entry(path: Path, data: Any) -> None:
    """Write a cache entry as JSON, atomically: into a temporary file beside it, then renamed
    over it, so that another process reading the cache meanwhile never sees half an entry, and
    an entry that fails to write leaves the one before it (and no temporary file) behind.
    Raises what writing raised (OSError; TypeError for data that is not JSON)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
