"""What `moirai stage` and `moirai gateway` share: addresses, model checks, a signal-aware loop.

Addresses of the other servers come from the plan's `endpoints`, then the `MOIRAI_PEERS`
environment variable (a JSON object, as the Kubernetes operator sets it), then `--peer NAME=ADDR`
flags, later ones winning. A server runs until SIGTERM or SIGINT, then stops within a short
grace period, so `moirai serve` and Kubernetes can stop it cleanly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Protocol

from moirai.errors import MoiraiError
from moirai.stageplan import StagePlan
from moirai.weights import model_digest

log = logging.getLogger(__name__)
STOP_GRACE_S = 1.0


def peer_addresses(plan: StagePlan, flags: Sequence[str]) -> dict[str, str]:
    addresses = dict(plan.endpoints)
    env = os.environ.get("MOIRAI_PEERS")
    if env:
        try:
            parsed = json.loads(env)
        except json.JSONDecodeError as e:
            raise MoiraiError(
                f"MOIRAI_PEERS is not JSON ({e.msg}): give {{name: host:port}}"
            ) from None
        if not isinstance(parsed, dict):
            raise MoiraiError("MOIRAI_PEERS must be a JSON object {name: host:port}")
        for name, address in parsed.items():
            if not isinstance(address, str) or ":" not in address:
                raise MoiraiError(
                    f"MOIRAI_PEERS[{name!r}] is {address!r}: give a 'host:port' string"
                )
            addresses[_plan_device(plan, name, f"MOIRAI_PEERS[{name!r}]")] = address
    for flag in flags:
        name, sep, address = flag.partition("=")
        if not sep or not name or ":" not in address:
            raise MoiraiError(f"--peer {flag!r}: write NAME=HOST:PORT, e.g. cpu-1=127.0.0.1:50052")
        addresses[_plan_device(plan, name, f"--peer {flag!r}")] = address
    return addresses


def _plan_device(plan: StagePlan, name: str, where: str) -> str:
    """`name`, when the plan has such a device; an address for any other goes nowhere (a typo)."""
    names = [d.name for d in plan.devices]
    if name not in names:
        raise MoiraiError(
            f"{where}: the plan has no device {name!r}; its devices are {', '.join(names)}"
        )
    return name


def check_model_file(plan: StagePlan, path: Path) -> None:
    """Refuse a model other than the one the plan was made for (when the plan says): its file
    and external data files (`moirai.weights.model_digest`)."""
    if not plan.model_sha256:
        return
    if model_digest(path) != plan.model_sha256:
        raise MoiraiError(
            f"{path} is not the model the plan was made for (sha256 differs): plan again"
        )


class Stoppable(Protocol):
    async def stop(self, grace: float | None = None) -> None: ...


def run_until_signalled(start: Callable[[], Awaitable[Stoppable]], what: str) -> int:
    """Start a server, serve until SIGTERM/SIGINT, stop it; the exit status."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        handle = await start()
        log.info("%s serving", what)
        await stop.wait()
        log.info("%s stopping", what)
        await handle.stop(STOP_GRACE_S)

    asyncio.run(main())
    return 0
