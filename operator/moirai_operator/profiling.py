"""Measured profiling: one Job per node pool runs `moirai profile`, the operator collects.

    operator ──creates──► Job <pm>-profile-<pool>-<attempt>   (on a node of the pool)
                            init: fetch + verify the model
                            init: moirai profile MODEL --device <pool>=<target> -o profile.json
                            main: python -m moirai_operator.upload profile.json
             ──creates──► Secret of the same name, owned by the Job: the inbox URL + token
    operator ◄──POST /profiles/<token>── (the pod)

Results travel to the operator rather than being read from pod logs or written to the API, so
profiling Jobs hold no credentials and the operator needs no permission on pods or their logs.
`ProfileInbox` is the operator's small HTTP endpoint for that: each Job gets a one-time random
token in its URL, which only its Secret holds (not its name, not its spec: who may read Jobs
need not read Secrets), and `JobProfiler.profile` waits (without blocking the event loop, within
a time limit, and no longer once a Job has failed or is gone) until every pool's token has been
delivered, deletes the Jobs (their Secrets go
with them), and merges the documents.
Each pool's profile names one device after the pool; the merged document repeats that entry for
every device of the pool (`<pool>-0`, `<pool>-1`, ...), which is what `DocumentProfile` matches
cost-graph devices by.

Jobs of an earlier attempt (an operator restart, a re-plan) are deleted before new ones start:
their tokens died with the earlier inbox.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from moirai_operator.catalogue import device_name
from moirai_operator.children import BuildOptions, Owner, labels, profile_job, profile_secret
from moirai_operator.kube import Kube
from moirai_operator.pools import PoolMatch
from moirai_operator.resources import COMPONENT_PROFILER
from moirai_operator.spec import PlacedModelSpec
from moirai_operator.status import ProfilingError, condition_line


@dataclass
class ProfileInbox:
    """Profiles POSTed by profiling Jobs, by one-time token."""

    waiting: dict[str, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)

    def expect(self) -> tuple[str, asyncio.Future[dict[str, Any]]]:
        token = secrets.token_urlsafe(24)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiting[token] = future
        return token, future

    def forget(self, token: str) -> None:
        future = self.waiting.pop(token, None)
        if future is not None and not future.done():
            future.cancel()

    async def _post(self, request: web.Request) -> web.Response:
        future = self.waiting.get(request.match_info["token"])
        if future is None or future.done():
            return web.Response(status=404, text="unknown or used token\n")
        try:
            document = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError):
            return web.Response(status=400, text="not JSON\n")
        if not isinstance(document, dict) or document.get("format") != "moirai.profile/v1":
            return web.Response(status=400, text="not a moirai.profile/v1 document\n")
        future.set_result(document)
        return web.Response(status=204)

    async def serve(self, host: str, port: int) -> web.AppRunner:
        app = web.Application(client_max_size=256 << 20)
        app.add_routes([web.post("/profiles/{token}", self._post)])
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        return runner


def merge(documents: Mapping[str, dict[str, Any]], pools: Sequence[PoolMatch]) -> dict[str, Any]:
    """One profile for all pools: each pool's entry repeated for each of its devices."""
    merged: dict[str, Any] = {}
    devices: dict[str, Any] = {}
    for match in pools:
        document = documents[match.spec.name]
        entries = document.get("devices") or {}
        entry = entries.get(match.spec.name)
        if entry is None:
            raise ProfilingError(
                f"the profile of pool {match.spec.name} has no device {match.spec.name!r} "
                f"(it has {', '.join(entries) or 'none'})"
            )
        for i in range(match.devices):
            devices[device_name(match.spec.name, i)] = entry
        merged = merged or {k: v for k, v in document.items() if k not in ("devices", "link")}
    return {**merged, "devices": devices}


@dataclass(frozen=True)
class JobProfiler:
    kube: Kube
    inbox: ProfileInbox
    inbox_url: str
    """Base URL at which pods reach the inbox, e.g. http://moirai.moirai-system.svc:8081."""
    options: BuildOptions
    timeout_s: float
    poll_s: float = 5.0
    """How often the Jobs are looked at while their reports are awaited."""

    async def _wait(
        self,
        owner: Owner,
        waits: Mapping[str, asyncio.Future[dict[str, Any]]],
        jobs: Mapping[str, str],
    ) -> set[asyncio.Future[dict[str, Any]]]:
        """Wait for every report, within the time limit; the futures still pending after it.
        A Job that failed (its pods crashed, its deadline passed) or is gone (its PlacedModel
        was deleted) will never report: that ends the wait at once, saying which."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        pending = set(waits.values())
        while pending and (left := deadline - loop.time()) > 0:
            _, pending = await asyncio.wait(pending, timeout=min(left, self.poll_s))
            if pending:
                waiting = {jobs[pool] for pool, f in waits.items() if f in pending}
                await self._check_jobs(owner, waiting)
        return pending

    async def _check_jobs(self, owner: Owner, names: set[str]) -> None:
        found = {
            job["metadata"]["name"]: job
            for job in await self.kube.list(
                "Job", owner.namespace, labels(owner, COMPONENT_PROFILER)
            )
        }
        for name in sorted(names):
            job = found.get(name)
            if job is None:
                raise ProfilingError(f"profiling Job {name} was deleted before it reported")
            for c in (job.get("status") or {}).get("conditions") or []:
                if c.get("type") == "Failed" and c.get("status") == "True":
                    raise ProfilingError(
                        f"profiling Job {name} failed ({condition_line(c)}): see `kubectl logs "
                        f"job/{name} --all-containers` in namespace {owner.namespace}"
                    )

    async def _clean(self, owner: Owner) -> None:
        await self.kube.prune(owner.namespace, labels(owner, COMPONENT_PROFILER), (), ("Job",))

    async def profile(
        self, owner: Owner, spec: PlacedModelSpec, pools: Sequence[PoolMatch]
    ) -> dict[str, Any]:
        await self._clean(owner)
        tokens: dict[str, str] = {}
        waits: dict[str, asyncio.Future[dict[str, Any]]] = {}
        jobs: dict[str, str] = {}
        try:
            for match in pools:
                token, future = self.inbox.expect()
                tokens[match.spec.name], waits[match.spec.name] = token, future
                url = f"{self.inbox_url.rstrip('/')}/profiles/{token}"
                attempt = secrets.token_hex(3)
                job = await self.kube.apply(profile_job(owner, spec, match, attempt, self.options))
                jobs[match.spec.name] = job["metadata"]["name"]
                secret = profile_secret(owner, match, attempt, url, job["metadata"]["uid"])
                await self.kube.apply(secret)
            pending = await self._wait(owner, waits, jobs)
            if pending:
                late = [pool for pool, f in waits.items() if f in pending]
                raise ProfilingError(
                    f"profiling Job(s) {', '.join(jobs[p] for p in late)} did not report within "
                    f"{self.timeout_s:.0f}s: see `kubectl logs job/NAME --all-containers`"
                )
            return merge({pool: f.result() for pool, f in waits.items()}, pools)
        finally:
            for token in tokens.values():
                self.inbox.forget(token)
            await self._clean(owner)
