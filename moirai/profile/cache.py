"""Measured profiles cached on disk, keyed by what they depend on.

A device entry (`DeviceProfile`) depends on the model — the digest of its file and the input
shapes it was loaded with — and on the device's signature (`moirai.profile.targets.signature`:
ONNX Runtime version, provider, CPU model and threads, GPU name, measuring method). The key is the
SHA-256 of those, written canonically, so any change in them is a miss and an identical setting
is a hit, whoever measured it. Repeats and warm-up are not part of the key: a cached entry says
how many it used. A measured link depends only on the machine (`link_key`).

Layout: `<dir>/<first 16 hex digits of the model digest>/<key>.json` for device entries (so a
model's entries can be removed together) and `<dir>/links/<key>.json` for links; each file
repeats its key's ingredients, for a person looking into the cache. The directory is
`--cache-dir`, else `$MOIRAI_CACHE/profiles`, else `$XDG_CACHE_HOME/moirai/profiles`, else
`~/.cache/moirai/profiles`. Writes go to a temporary file renamed into place, so concurrent
profilers never read half an entry; an unreadable entry counts as a miss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moirai.cachedir import cache_dir, write_entry
from moirai.profile.document import DeviceProfile, ProfileError
from moirai.profile.links import LinkFit

log = logging.getLogger(__name__)

FORMAT = "moirai.profile-cache/v1"


_ELSEWHERE = (
    "set MOIRAI_CACHE to a folder you can write (moirai profile also takes --cache-dir, or "
    "--no-cache)"
)
"""What to do about a cache folder that cannot be used: --cache-dir and --no-cache are flags of
`moirai profile` alone, so `place`, `serve` and `demo` named flags they do not have."""


def default_dir() -> Path:
    return cache_dir("profiles")


def _digest(ingredients: Mapping[str, Any]) -> str:
    text = json.dumps(ingredients, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class ProfileCache:
    directory: Path

    @classmethod
    def at(cls, directory: str | Path | None = None) -> ProfileCache:
        """The cache in `directory`, created now: a folder that cannot be made fails here, before
        minutes of measuring, not when the first result is written."""
        path = Path(directory) if directory is not None else default_dir()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ProfileError(
                f"{path}: cannot create the profile cache folder ({e.strerror}); {_ELSEWHERE}"
            ) from None
        if not os.access(path, os.W_OK | os.X_OK):
            raise ProfileError(f"{path}: the profile cache folder is not writable; {_ELSEWHERE}")
        return cls(path)

    # ------------------------------------------------------------- devices
    def device_path(
        self,
        model_sha256: str,
        input_shapes: Mapping[str, Sequence[int]],
        signature: Mapping[str, Any],
    ) -> tuple[Path, dict[str, Any]]:
        ingredients = {
            "model_sha256": model_sha256,
            "input_shapes": {k: list(v) for k, v in input_shapes.items()},
            "signature": dict(signature),
        }
        return self.directory / model_sha256[:16] / f"{_digest(ingredients)}.json", ingredients

    def get(
        self,
        model_sha256: str,
        input_shapes: Mapping[str, Sequence[int]],
        signature: Mapping[str, Any],
    ) -> DeviceProfile | None:
        path, _ = self.device_path(model_sha256, input_shapes, signature)
        data = self._read(path)
        if data is None:
            return None
        try:
            return DeviceProfile.from_dict(data["device"], str(path))
        except (ProfileError, KeyError, TypeError) as e:
            log.warning("ignoring unreadable cache entry %s: %s", path, e)
            return None

    def put(
        self,
        model_sha256: str,
        input_shapes: Mapping[str, Sequence[int]],
        signature: Mapping[str, Any],
        profile: DeviceProfile,
    ) -> Path:
        path, ingredients = self.device_path(model_sha256, input_shapes, signature)
        write_entry(path, {"format": FORMAT, "key": ingredients, "device": profile.to_dict()})
        return path

    # --------------------------------------------------------------- links
    def link_path(self, signature: Mapping[str, Any]) -> Path:
        return self.directory / "links" / f"{_digest(dict(signature))}.json"

    def get_link(self, signature: Mapping[str, Any]) -> LinkFit | None:
        path = self.link_path(signature)
        data = self._read(path)
        if data is None:
            return None
        try:
            return LinkFit.from_dict(data["link"])
        except (KeyError, TypeError, ValueError) as e:
            log.warning("ignoring unreadable cache entry %s: %s", path, e)
            return None

    def put_link(self, signature: Mapping[str, Any], link: LinkFit) -> Path:
        path = self.link_path(signature)
        write_entry(path, {"format": FORMAT, "key": dict(signature), "link": link.to_dict()})
        return path

    # ----------------------------------------------------------------- io
    @staticmethod
    def _read(path: Path) -> Any:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:  # ValueError: not JSON, or not even UTF-8
            log.warning("ignoring unreadable cache entry %s: %s", path, e)
            return None
        return data if isinstance(data, dict) and data.get("format") == FORMAT else None
