"""The kopf handlers' own bookkeeping (the reconciling itself is tested in test_reconcile)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import SimpleNamespace

import kopf
from moirai_operator import handlers


class _Stopped:
    """Stands in for kopf's DaemonStopped flag: true once set, and `wait` returns when it is
    set or the timeout passes."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def __bool__(self) -> bool:
        return self.event.is_set()

    async def wait(self, timeout: float | None = None) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.event.wait(), timeout)


async def test_a_deleted_placed_model_s_plan_is_forgotten_when_its_daemon_stops() -> None:
    plans = {"deleted-uid": ("key", object()), "other-uid": ("key", object())}
    memo = kopf.Memo(ctx=SimpleNamespace(plans=plans), resync_seconds=3600.0)
    body = kopf.Body({"metadata": {"uid": "deleted-uid", "name": "m", "namespace": "ns"}})
    stopped = _Stopped()
    daemon = asyncio.create_task(
        handlers.resync(
            body=body,
            memo=memo,
            nodes={},
            stopped=stopped,
            logger=logging.getLogger("test"),
        )
    )
    await asyncio.sleep(0.05)
    assert "deleted-uid" in plans  # kept while the object lives
    stopped.event.set()  # kopf stops the daemon: the object was deleted
    await asyncio.wait_for(daemon, 5)
    assert list(plans) == ["other-uid"]
