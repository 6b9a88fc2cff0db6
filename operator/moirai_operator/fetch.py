"""Fetch a model file by URI and verify its digest: used by the operator and by stage pods.

The operator needs the model to plan; every stage server and the gateway need it to cut their
sub-models. Both get it through this one module so that the rules are the same everywhere: an
http(s) URL is downloaded (streamed to a temporary file, renamed into place when complete, so a
crash never leaves a half-written model that looks whole), a path (or file:// URL) is read where a
volume mounts it, and when a SHA-256 is given, nothing is used before it matches.

As a command (`python -m moirai_operator.fetch URI DEST [--sha256 HEX]`) it is the init
container of every pod the operator creates; its exit status is 2 with a one-line reason on
failure, like the `moirai` CLI.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

from moirai.errors import MoiraiError

CHUNK = 1 << 20


class ModelUnreachableError(MoiraiError):
    """The model URI cannot be read (network, HTTP status, missing file)."""


class ModelDigestError(MoiraiError):
    """The model file does not have the SHA-256 the spec names."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _download(url: str, dest: Path, timeout: float) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "moirai-operator"})
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".fetch-")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as r:
            shutil.copyfileobj(r, out, CHUNK)
        os.replace(tmp, dest)
    except urllib.error.HTTPError as e:
        raise ModelUnreachableError(f"model URI {url} answered HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", None) or e
        raise ModelUnreachableError(f"model URI {url} cannot be read: {reason}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fetch(uri: str, dest: Path, sha256: str | None = None, timeout: float = 60.0) -> Path:
    """Make the model at `uri` available at `dest` (verified) and return the path to use.

    A path URI is used in place (returned as is) rather than copied; `dest` is then untouched.
    """
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not (sha256 and dest.exists() and sha256_of(dest) == sha256):
            _download(uri, dest, timeout)
        path = dest
    else:
        path = Path(parsed.path if parsed.scheme == "file" else uri)
        if not path.is_file():
            raise ModelUnreachableError(
                f"model path {path} does not exist here: check spec.model.uri and that its "
                "volume is mounted"
            )
    if sha256:
        actual = sha256_of(path)
        if actual != sha256.lower():
            raise ModelDigestError(
                f"model {uri} has SHA-256 {actual}, but spec.model.sha256 is {sha256}: "
                "fix the digest or the file"
            )
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moirai_operator.fetch",
        description="Fetch a model by URI into DEST (or check it in place) and verify it.",
    )
    parser.add_argument("uri")
    parser.add_argument("dest", type=Path)
    parser.add_argument("--sha256")
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    try:
        path = fetch(args.uri, args.dest, args.sha256, args.timeout)
    except MoiraiError as e:
        print(f"moirai: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
