"""Fetch a model by URI, with its external data, and verify its digest: used by the operator and
by stage pods.

The operator needs the model to plan; every stage server and the gateway need it to cut their
sub-models. Both get it through this one module so that the rules are the same everywhere: an
http(s) URL is downloaded (streamed to a temporary file, renamed into place when complete, so a
crash never leaves a half-written file that looks whole), a path (or file:// URL) is read where a
volume mounts it, and when a SHA-256 is given, nothing is used before it matches.

**External data.** A model whose weights are in external data files names them by `location`,
relative to the model (`moirai.weights`): each is fetched from the same place, its URL resolved
against the model's (`https://host/models/m.onnx` and `m.onnx.data` give
`https://host/models/m.onnx.data`), and stored next to the model under the same relative name. A
location that is absolute or leaves the model's folder (`..`) is refused before anything is
fetched. `spec.model.sha256` is `moirai.weights.model_digest`: the SHA-256 of the model file
followed by its data files in the order of their names (`cat m.onnx m.onnx.data | sha256sum`;
for a model without external data, the file's own digest, as before).

**Limits.** A fetch has a total deadline (`total_timeout`, over every file, besides the timeout
of each read) and a size cap (`max_bytes`, over every file; a larger `Content-Length` is refused
before reading, and the count is kept while reading). It follows redirects, but not to a
loopback, link-local, unspecified or cloud metadata address (the operator's pod could otherwise
be steered to its node's or its cloud's internals) unless `allow_internal` says so, or the
redirect stays on the host the URI names. Addresses are those the redirect's host resolves to
when it is checked.

As a command (`python -m moirai_operator.fetch URI DEST [--sha256 HEX]`) it is the init
container of every pod the operator creates; its exit status is 2 with a one-line reason on
failure, like the `moirai` CLI.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import os
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urljoin, urlparse

from moirai.errors import MoiraiError
from moirai.weights import ExternalDataError, model_digest, model_files

CHUNK = 1 << 20
MAX_BYTES = 256 * 2**30
"""Default size cap of one fetch (the model and its data files)."""
TOTAL_TIMEOUT_S = 3600.0
# Cloud metadata services that are not link-local (Alibaba; Azure's wire server) and the ones
# that are, for the record (AWS, GCP, Azure IMDS; AWS's IPv6 one).
_METADATA = frozenset(
    ipaddress.ip_address(a)
    for a in ("100.100.100.200", "168.63.129.16", "169.254.169.254", "fd00:ec2::254")
)


class ModelUnreachableError(MoiraiError):
    """The model URI cannot be read (network, HTTP status, missing file, a limit)."""


class ModelDigestError(MoiraiError):
    """The model's files do not have the SHA-256 the spec names."""


@dataclass
class _Budget:
    """What is left of one fetch: time (a monotonic deadline) and bytes."""

    deadline: float
    bytes_left: int
    uri: str

    def seconds(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise ModelUnreachableError(
                f"model URI {self.uri} took longer than the total timeout: raise it "
                "(--total-timeout) or use a closer copy of the model"
            )
        return left

    def take(self, count: int, limit: int) -> None:
        """Count `count` bytes more; raise when that goes over the cap."""
        self.check(count, limit)
        self.bytes_left -= count

    def check(self, count: int, limit: int) -> None:
        if count > self.bytes_left:
            raise ModelUnreachableError(
                f"model URI {self.uri} is larger than the size cap of {limit} bytes "
                "(--max-bytes): raise it if the model really is that large"
            )


@dataclass
class _Sockets:
    """The sockets of the connections a download opens, so that each read gets the time left."""

    open: list[socket.socket] = field(default_factory=list)


def _connection_class(base: type[http.client.HTTPConnection], sockets: _Sockets) -> type:
    class Connection(base):  # type: ignore[valid-type, misc]
        def connect(self) -> None:
            super().connect()
            sockets.open.append(self.sock)

    return Connection


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects, except to internal addresses (module docstring)."""

    def __init__(self, origin: str, allow_internal: bool) -> None:
        self.origin = origin
        self.allow_internal = allow_internal

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        target = urlparse(urljoin(req.full_url, newurl))
        if target.scheme not in ("http", "https"):
            raise ModelUnreachableError(
                f"model URI {self.origin} redirects to {target.scheme or 'a'}:// URL; only "
                "http(s) is followed"
            )
        same_host = target.netloc == urlparse(self.origin).netloc
        if not (self.allow_internal or same_host):
            internal = _internal_address(target.hostname or "")
            if internal:
                raise ModelUnreachableError(
                    f"model URI {self.origin} redirects to {target.hostname} ({internal}): "
                    "redirects to loopback, link-local or metadata addresses are refused "
                    "(--allow-internal-redirects to allow them)"
                )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _internal_address(host: str) -> str | None:
    """Why `host` is internal (its first such address), or None."""
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return None  # unresolvable: the request itself will fail and say so
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if address in _METADATA:
            return f"{address}, a cloud metadata address"
        if address.is_loopback or address.is_link_local or address.is_unspecified:
            return f"{address}, a loopback or link-local address"
    return None


def _download(
    url: str, dest: Path, budget: _Budget, timeout: float, limit: int, allow_internal: bool
) -> None:
    sockets = _Sockets()
    opener = urllib.request.build_opener(
        _Redirects(url, allow_internal),
        _Handler(_connection_class(http.client.HTTPConnection, sockets)),
        _SecureHandler(_connection_class(http.client.HTTPSConnection, sockets)),
    )
    request = urllib.request.Request(url, headers={"User-Agent": "moirai-operator"})
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".fetch-")
    try:
        with (
            os.fdopen(fd, "wb") as out,
            opener.open(request, timeout=min(timeout, budget.seconds())) as response,
        ):
            length = response.headers.get("Content-Length", "")
            if length.isdigit():
                budget.check(int(length), limit)
            while True:
                # The last connection is the one answering (earlier ones were redirects).
                sockets.open[-1].settimeout(min(timeout, budget.seconds()))
                chunk = response.read1(CHUNK)
                if not chunk:
                    break
                budget.take(len(chunk), limit)
                out.write(chunk)
        budget.seconds()
        os.replace(tmp, dest)
    except urllib.error.HTTPError as e:
        raise ModelUnreachableError(f"model URI {url} answered HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise ModelUnreachableError(f"model URI {url} cannot be read: {e.reason}") from None
    except (OSError, TimeoutError, http.client.HTTPException) as e:
        budget.seconds()  # a read cut short by the deadline says so
        reason = e or type(e).__name__
        raise ModelUnreachableError(f"model URI {url} cannot be read: {reason}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class _Handler(urllib.request.HTTPHandler):
    def __init__(self, connection: type) -> None:
        super().__init__()
        self.connection = connection

    def http_open(self, req):  # type: ignore[no-untyped-def]
        return self.do_open(self.connection, req)


class _SecureHandler(urllib.request.HTTPSHandler):
    def __init__(self, connection: type) -> None:
        super().__init__()
        self.connection = connection

    def https_open(self, req):  # type: ignore[no-untyped-def]
        return self.do_open(self.connection, req, context=self._context)


def fetch(
    uri: str,
    dest: Path,
    sha256: str | None = None,
    timeout: float = 60.0,
    *,
    total_timeout: float = TOTAL_TIMEOUT_S,
    max_bytes: int = MAX_BYTES,
    allow_internal: bool = False,
) -> Path:
    """Make the model at `uri` and its external data available at `dest` (verified) and return
    the model's path. `timeout` bounds each read, `total_timeout` the whole fetch.

    A path URI is used in place (returned as is) rather than copied; `dest` is then untouched.
    """
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        if not (sha256 and _verified(dest, sha256)):
            budget = _Budget(time.monotonic() + total_timeout, max_bytes, uri)
            _download(uri, dest, budget, timeout, max_bytes, allow_internal)
            for location in _data_files(dest, uri):
                url = urljoin(uri, quote(location))
                _download(url, dest.parent / location, budget, timeout, max_bytes, allow_internal)
        path = dest
    else:
        path = Path(parsed.path if parsed.scheme == "file" else uri)
        if not path.is_file():
            raise ModelUnreachableError(
                f"model path {path} does not exist here: check spec.model.uri and that its "
                "volume is mounted"
            )
        for location in _data_files(path, uri):
            if not (path.parent / location).is_file():
                raise ModelUnreachableError(
                    f"model {uri} keeps weights in {location}, which is not next to it: "
                    "put the external data files beside the model"
                )
    if sha256:
        actual = model_digest(path)
        if actual != sha256.lower():
            raise ModelDigestError(
                f"model {uri} has SHA-256 {actual}, but spec.model.sha256 is {sha256}: "
                "fix the digest or the files (the digest covers the model file followed by its "
                "external data files: cat model.onnx model.onnx.data | sha256sum)"
            )
    return path


def _data_files(model: Path, uri: str) -> list[str]:
    """The external data files the model names, refused (one line) if any leaves its folder."""
    try:
        return [str(f.relative_to(model.parent)) for f in model_files(model)[1:]]
    except ExternalDataError as e:
        raise ModelUnreachableError(f"model {uri}: {e}") from None


def _verified(dest: Path, sha256: str) -> bool:
    """Whether `dest` and its data files are already there with this digest."""
    try:
        return dest.exists() and model_digest(dest) == sha256.lower()
    except MoiraiError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moirai_operator.fetch",
        description="Fetch a model and its external data by URI into DEST's folder (or check "
        "them in place) and verify them.",
    )
    parser.add_argument("uri")
    parser.add_argument("dest", type=Path)
    parser.add_argument("--sha256")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per read")
    parser.add_argument(
        "--total-timeout", type=float, default=TOTAL_TIMEOUT_S, help="seconds for every file"
    )
    parser.add_argument(
        "--max-bytes", type=int, default=MAX_BYTES, help="size cap of every file together"
    )
    parser.add_argument(
        "--allow-internal-redirects",
        action="store_true",
        help="follow redirects to loopback, link-local and metadata addresses",
    )
    args = parser.parse_args(argv)
    try:
        path = fetch(
            args.uri,
            args.dest,
            args.sha256,
            args.timeout,
            total_timeout=args.total_timeout,
            max_bytes=args.max_bytes,
            allow_internal=args.allow_internal_redirects,
        )
    except MoiraiError as e:
        print(f"moirai: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
