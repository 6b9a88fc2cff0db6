"""Send a profiling Job's result to the operator: `python -m moirai_operator.upload FILE`.

The last container of every profiling Job (after `moirai profile` wrote FILE) POSTs it to the
operator's profile inbox at `$MOIRAI_PROFILE_URL`, a URL that carries the one-time token the
operator made for that Job. Pushing to the operator keeps the Job free of API credentials and the
operator free of permissions to read pod logs. A refused or unreachable inbox is retried for a
while (the operator may be restarting); the exit status is 2 with a one-line reason on failure.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from moirai.errors import MoiraiError


class UploadError(MoiraiError):
    """The profile could not be delivered to the operator."""


def upload(path: Path, url: str, attempts: int = 5, backoff_s: float = 2.0) -> None:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UploadError(f"{path}: cannot read the profile ({e.strerror})") from None
    request = urllib.request.Request(
        url, data=data, method="POST", headers={"Content-Type": "application/json"}
    )
    for attempt in range(1, attempts + 1):
        try:
            with urllib.request.urlopen(request, timeout=30):
                return
        except urllib.error.HTTPError as e:
            if e.code < 500:  # refused for good: a wrong or used token, a malformed profile
                raise UploadError(
                    f"the operator refused the profile: HTTP {e.code} {e.reason}"
                ) from None
            reason = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            reason = str(getattr(e, "reason", e))
        if attempt == attempts:
            raise UploadError(f"cannot reach the operator at {url} ({reason})")
        time.sleep(backoff_s * attempt)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moirai_operator.upload", description="POST a profile to the operator."
    )
    parser.add_argument("file", type=Path)
    parser.add_argument("--url", default=os.environ.get("MOIRAI_PROFILE_URL"))
    args = parser.parse_args(argv)
    try:
        if not args.url:
            raise UploadError("no inbox: set MOIRAI_PROFILE_URL or --url")
        upload(args.file, args.url)
    except MoiraiError as e:
        print(f"moirai: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
