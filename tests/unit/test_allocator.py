"""The server processes' malloc tuning, in fresh interpreters (it is process-wide)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = "from stage_server.allocator import keep_freed_memory; print(keep_freed_memory())"


def _probe(env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_servers_keep_freed_memory_unless_the_environment_says_otherwise() -> None:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    assert _probe(env) == "True"
    assert _probe({**env, "GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}) == "False"
