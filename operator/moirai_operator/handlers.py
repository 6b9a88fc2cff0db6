"""The kopf handlers: thin adapters from kopf's callbacks to `reconcile.converge`.

Run with `kopf run -m moirai_operator.handlers` (the chart adds `--standalone`, the namespaces
and `--liveness`). What happens here and only here:

- startup: read `OperatorConfig`, load the device catalogue, create the API client, the solver
  thread pool, the planner and (when configured) the profile inbox for measured profiling, and
  keep them in kopf's memo; store kopf's own bookkeeping in `moirai.dev/` annotations (the
  CRD's status schema has no room for kopf's).
- an index of Nodes (as `NodeFacts`), so that pool discovery never lists Nodes on each pass;
- create, update (spec, labels, annotations) and resume of a PlacedModel → `converge`;
- a daemon per PlacedModel that calls `converge` every `resync_seconds`: it notices pool
  changes (through the pools fingerprint) and Deployment readiness, and forgets the object's
  last plan when it stops (the object was deleted);
- a liveness probe reporting the Node count.

A per-object lock keeps the handlers and the daemon of one PlacedModel from reconciling it at the
same time; different PlacedModels reconcile concurrently, and a long solve runs in a worker
thread, so it never blocks them. No delete handler: children are owned through ownerReferences
and the garbage collector removes them, so a PlacedModel never waits on a finalizer.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import kopf

from moirai_operator.catalogue import Catalogue
from moirai_operator.config import OperatorConfig
from moirai_operator.kube import Kube
from moirai_operator.planning import Planner
from moirai_operator.pools import NodeFacts, node_facts
from moirai_operator.profiling import JobProfiler, ProfileInbox
from moirai_operator.reconcile import Context, converge
from moirai_operator.resources import GROUP, PLURAL, VERSION, NodeBody, PlacedModelBody


class _KopfEvents:
    def __init__(self, body: kopf.Body) -> None:
        self.body = body

    def info(self, reason: str, message: str) -> None:
        kopf.info(self.body, reason=reason, message=message)

    def warning(self, reason: str, message: str) -> None:
        kopf.warn(self.body, reason=reason, message=message)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    config = OperatorConfig.from_env(os.environ)
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.posting.level = logging.INFO
    # Serve only what exists at startup (the chart installs the CRD first): kopf then needs no
    # permission to watch CRDs and Namespaces, keeping the RBAC to what the operator uses.
    settings.scanning.disabled = True
    executor = ThreadPoolExecutor(config.solver_workers, thread_name_prefix="moirai-solver")
    memo.executor = executor
    kube = Kube()
    profiler = None
    memo.inbox = None
    if config.profile_url:
        inbox = ProfileInbox()
        memo.inbox = await inbox.serve(config.profile_host, config.profile_port)
        profiler = JobProfiler(
            kube, inbox, config.profile_url, config.options, config.profile_timeout_seconds
        )
    memo.ctx = Context(
        kube=kube,
        planner=Planner(
            catalogue=Catalogue.load(config.catalogue),
            executor=executor,
            threads=config.solver_threads,
        ),
        defaults=config.defaults,
        options=config.options,
        model_cache=config.model_cache,
        profiler=profiler,
    )
    memo.resync_seconds = config.resync_seconds


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    if memo.inbox is not None:
        await memo.inbox.cleanup()
    memo.executor.shutdown(wait=False, cancel_futures=True)


@kopf.index("", "v1", "nodes")
def nodes(body: kopf.Body, **_: Any) -> NodeFacts:
    return node_facts(cast(NodeBody, body))


def _all(index: kopf.Index[Any, NodeFacts]) -> Iterable[NodeFacts]:
    return (facts for store in index.values() for facts in store)


async def _converge(body: kopf.Body, memo: kopf.Memo, index: kopf.Index[Any, NodeFacts]) -> None:
    lock: asyncio.Lock = memo.setdefault("lock", asyncio.Lock())
    async with lock:
        # Read the object afresh: kopf's copy may predate the status that the pass holding the
        # lock just wrote, and deciding from it would plan the same generation twice.
        ctx: Context = memo.ctx
        fresh = await ctx.kube.get("PlacedModel", body.meta["namespace"], body.meta["name"])
        if fresh is None:
            return
        await converge(cast(PlacedModelBody, fresh), _all(index), ctx, _KopfEvents(body))


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
async def reconcile(
    body: kopf.Body, memo: kopf.Memo, nodes: kopf.Index[Any, NodeFacts], **_: Any
) -> None:
    await _converge(body, memo, nodes)


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=5.0)
async def resync(
    body: kopf.Body,
    memo: kopf.Memo,
    nodes: kopf.Index[Any, NodeFacts],
    stopped: kopf.DaemonStopped,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    try:
        while not stopped:
            await stopped.wait(memo.resync_seconds)
            if stopped:
                break
            try:
                await _converge(body, memo, nodes)
            except Exception:  # a failed pass must not end the daemon: log it, try next period
                logger.exception("resync failed; retrying in %.0fs", memo.resync_seconds)
    finally:
        # The daemon stops when its PlacedModel is deleted (or the operator stops): its last
        # plan is no longer needed, and kept it would grow the operator by one plan per object.
        ctx: Context = memo.ctx
        ctx.plans.pop(body.meta.uid, None)


@kopf.on.probe(id="nodes")
def node_count(nodes: kopf.Index[Any, NodeFacts], **_: Any) -> int:
    return sum(1 for _ in _all(nodes))
