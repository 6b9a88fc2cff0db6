"""The profile inbox and the upload command, on loopback; merging profiles per device."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest
from moirai_operator.children import BuildOptions, Owner
from moirai_operator.pools import match_pool, node_facts
from moirai_operator.profiling import JobProfiler, ProfileInbox, merge
from moirai_operator.spec import Defaults, PoolSpec, parse_spec
from moirai_operator.status import ProfilingError
from moirai_operator.upload import main as upload_main
from operator_bodies import make_node, make_spec

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


class JobsKube:
    """Keeps the Jobs applied (and their Secrets' names); lists and prunes Jobs."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict] = {}

    async def apply(self, manifest: dict) -> dict:
        stored = {**manifest, "metadata": {**manifest["metadata"], "uid": "uid"}}
        if manifest["kind"] == "Job":
            self.jobs[manifest["metadata"]["name"]] = stored
        return stored

    async def list(self, kind: str, namespace: str, labels) -> list[dict]:
        return list(self.jobs.values()) if kind == "Job" else []

    async def prune(self, namespace, labels, keep, kinds) -> list[str]:
        gone = list(self.jobs)
        self.jobs.clear()
        return gone


@pytest.mark.parametrize("fate", ["failed", "deleted"])
async def test_a_job_that_will_never_report_ends_the_wait_at_once(fate: str) -> None:
    """Not after the whole time limit (15 minutes by default), as when only reports were
    awaited: a Job that failed, or was deleted with its PlacedModel, never reports."""
    kube = JobsKube()
    profiler = JobProfiler(kube, ProfileInbox(), "http://op:8081", BuildOptions(), 600, 0.02)  # type: ignore[arg-type]
    spec = parse_spec(make_spec(pools=[{"name": "p", "kind": "cpu"}]), Defaults())
    pools = [match_pool(spec.pools[0], [node_facts(make_node("a", "p", cpu="8"))])]
    task = asyncio.create_task(profiler.profile(Owner("m", "ml", "uid-1"), spec, pools))
    while not kube.jobs:
        await asyncio.sleep(0.01)
    (name,) = kube.jobs
    if fate == "failed":
        kube.jobs[name]["status"] = {
            "conditions": [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "BackoffLimitExceeded",
                    "message": "Job has reached the specified backoff limit",
                }
            ]
        }
        expected = (
            f"profiling Job {name} failed (BackoffLimitExceeded: Job has reached the specified "
            f"backoff limit): see `kubectl logs job/{name} --all-containers` in namespace ml"
        )
    else:
        del kube.jobs[name]
        expected = f"profiling Job {name} was deleted before it reported"
    with pytest.raises(ProfilingError) as error:
        await asyncio.wait_for(task, 5)
    assert str(error.value) == expected
    assert not profiler.inbox.waiting and not kube.jobs
