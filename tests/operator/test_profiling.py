"""The profile inbox and the upload command, on loopback; merging profiles per device."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest
from moirai_operator.pools import match_pool, node_facts
from moirai_operator.profiling import ProfileInbox, merge
from moirai_operator.spec import PoolSpec
from moirai_operator.status import ProfilingError
from moirai_operator.upload import main as upload_main
from operator_bodies import make_node

PROFILE = {"format": "moirai.profile/v1", "model": {"name": "m"}, "devices": {"p": {"x": 1}}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_inbox_takes_one_profile_per_token(tmp_path: Path) -> None:
    inbox, port = ProfileInbox(), free_port()
    runner = await inbox.serve("127.0.0.1", port)
    try:
        token, future = inbox.expect()
        good, bad = tmp_path / "good.json", tmp_path / "bad.json"
        good.write_text(json.dumps(PROFILE))
        bad.write_text(json.dumps({"format": "other"}))
        url = f"http://127.0.0.1:{port}/profiles/{token}"

        def run(path: Path, to: str) -> int:
            return upload_main([str(path), "--url", to])

        assert await asyncio.to_thread(run, bad, url) == 2  # refused: not a profile
        assert not future.done()
        assert await asyncio.to_thread(run, good, f"http://127.0.0.1:{port}/profiles/nope") == 2
        assert await asyncio.to_thread(run, good, url) == 0
        assert await asyncio.wait_for(future, 5) == PROFILE
        assert await asyncio.to_thread(run, good, url) == 2  # a token is used once
        inbox.forget(token)
        assert token not in inbox.waiting
    finally:
        await runner.cleanup()


def test_merge_repeats_each_pools_entry_for_its_devices() -> None:
    nodes = [node_facts(make_node("a", "p", cpu="8")), node_facts(make_node("b", "q", cpu="8"))]
    p = match_pool(PoolSpec("p", "cpu", max_devices=3, threads_per_device=2), nodes)
    q = match_pool(PoolSpec("q", "cpu", max_devices=1), nodes)
    other = {**PROFILE, "devices": {"q": {"y": 2}}}
    merged = merge({"p": PROFILE, "q": other}, [p, q])
    assert merged["devices"] == {"p-0": {"x": 1}, "p-1": {"x": 1}, "p-2": {"x": 1}, "q-0": {"y": 2}}
    assert merged["model"] == {"name": "m"}
    with pytest.raises(ProfilingError, match="has no device 'q'"):
        merge({"p": PROFILE, "q": PROFILE}, [p, q])
