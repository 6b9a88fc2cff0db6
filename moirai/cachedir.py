"""Where Moirai caches what it can compute again: `$MOIRAI_CACHE`, else
`$XDG_CACHE_HOME/moirai`, else `~/.cache/moirai`; each kind of entry in a folder of its own
(`zoo`, `profiles`, `digests`)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(kind: str) -> Path:
    if "MOIRAI_CACHE" in os.environ:
        return Path(os.environ["MOIRAI_CACHE"]) / kind
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moirai" / kind
