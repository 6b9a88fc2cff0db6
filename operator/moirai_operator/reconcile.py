"""Reconciliation: bring one PlacedModel's children and status in line with its spec and pools.

There is one entry point, `converge`, called alike by the kopf handlers for create, update and
resume and by a periodic timer. It decides what is stale by comparing the object with what its
status says was last done:

    generation != status.observedGeneration      the spec changed         → plan and apply
    pools fingerprint != status.poolsFingerprint  nodes came, went, were
                                                  cordoned or changed     → plan and apply
    Planned=False for a reason that may pass      (the model URI was down)→ plan and apply
    a Secret the pods read != status.secrets      made again or changed   → apply (rolls them)
    otherwise                                                             → refresh readiness
                                                  (Failed while an earlier plan serves: a
                                                  Secret its pods read that changed rolls them)

so an operator restart at any point converges: whatever was not recorded in status is simply
done again, and every write is an idempotent server-side apply of objects with derived names.

Planning (`plan_and_apply`) checks that the endpoint's token Secret exists when the spec names
one, fetches and verifies the model, asks the planner for a `Plan` (cost graph, solve, stage plan —
run off the event loop), makes the chain Secret if there is none yet (its token is made here, once,
and never replaced while the Secret exists), applies the children built by `children.py` and
prunes what the new plan no longer needs. Every pass of a deployed PlacedModel also makes the
chain Secret again if it was deleted, and compares a digest of each Secret its pods read with
the one its children were applied with (`status.secrets`): a Secret made again or changed (a new
chain token, a rotated endpoint token or certificate) applies the children again with the new
digest in their pod templates, which rolls the pods that read it, without solving again. While a
new spec fails and an earlier plan serves, the spec cannot build that plan's children again (it
built other ones, or does not parse): the Secrets its Deployments read are told from their pod
templates, and a changed one rolls them by a patch of their Secrets digest alone
(`_serving_secrets`), so a token rotated during a bad edit still reaches the serving pods.
With `spec.serving.tlsSecret`, the gateway's trust root (the Secret's `ca.crt`, else its
`tls.crt`: public certificates, never the key) is published in `status.gatewayCA` for the shared
endpoint, which verifies the gateway with it and may not read Secrets; a new one is written at
the next pass (a new `ca.crt` alone rolls no pod).

Errors a person can act on become a Failed phase and a `Planned=False` condition here, through
`status.failure`, and nowhere else; anything else (API errors, bugs) propagates so kopf logs it
and retries. A child that the API server refuses as written (invalid, or denied by RBAC, a quota
or an admission policy: `apply_child`) is such an error too, `ChildRejected`, not a traceback
retried forever. A failed re-plan leaves the previous children in place: a model that was
serving keeps serving while the new spec is fixed, its message says that the new spec is not
applied, and its `Ready` condition goes on following the children that serve. That holds for a
refused child too, since a plan's children are applied all or nothing as far as the API server
allows (`apply_children`: every child dry-run first, then the new ones made with no pods, and
removed again if one is refused); the one case it cannot undo, a refusal that the dry run did not
foresee after shared children were updated, is named in the message, which then does not say
that the previous plan serves untouched.

A solve may run for minutes, and the PlacedModel may be edited or deleted meanwhile; its result
(a plan or a failure) is then for a spec that no longer exists and is dropped (`superseded`):
nothing of it is applied and no status is written, and the pass for the new generation (kopf's
update handler, queued behind this one) plans again. While the solve runs, a watcher
(`_stop_when_superseded`) reads the PlacedModel back every `Context.supersede_check_s`: once it
was deleted (or made again), or edited in a field the plan depends on (`_plan_key`), it sets
the solve's stop (`SolveOptions.stop`), which ends the solve within about a second, and its
result is dropped as above. An edit of fields the plan does not depend on (replicas, ports, the
image...) lets the solve finish: its plan is cached (`Context.plans`) though dropped, and the
next generation's pass applies it without solving again. The watcher only reads and sets an
Event; everything else stays in this pass.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import secrets
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kubernetes.client.exceptions import ApiException

from moirai.errors import MoiraiError, one_line
from moirai_operator import status as st
from moirai_operator.children import (
    TLS_CA_KEY,
    TLS_CERT_KEY,
    TLS_KEY_KEY,
    TOKEN_KEY,
    BuildOptions,
    Owner,
    build_children,
    chain_secret,
    chain_secret_name,
    endpoint,
    gateway_secrets,
    pod_secrets,
    scale_selector,
    secrets_digest,
    secrets_patch,
    selector,
    stage_name,
)
from moirai_operator.fetch import fetch
from moirai_operator.kube import PRUNED_KINDS, Kube
from moirai_operator.plan import Plan
from moirai_operator.pools import NodeFacts, PoolMatch, fingerprint, match_pools
from moirai_operator.resources import Condition, Manifest, PlacedModelBody
from moirai_operator.spec import Defaults, PlacedModelSpec, check_name, parse_spec

log = logging.getLogger(__name__)


class Planner(Protocol):
    """(spec, matched pools, local model path, measured profile or None) → Plan; `stop`, once
    set, ends the solve early (its best plan, or a `StoppedError`)."""

    async def __call__(
        self,
        spec: PlacedModelSpec,
        pools: Sequence[PoolMatch],
        model_path: Path,
        profile: Mapping[str, Any] | None = None,
        stop: threading.Event | None = None,
    ) -> Plan: ...


class Profiler(Protocol):
    """Measures the pools (`spec.profiling.mode: measured`): a `moirai.profile/v1` document."""

    async def profile(
        self, owner: Owner, spec: PlacedModelSpec, pools: Sequence[PoolMatch]
    ) -> dict[str, Any]: ...


class Events(Protocol):
    """Kubernetes Events on the PlacedModel (kopf posts them in production)."""

    def info(self, reason: str, message: str) -> None: ...

    def warning(self, reason: str, message: str) -> None: ...


@dataclass(frozen=True)
class Context:
    """What the reconciler needs from the operator: one per process."""

    kube: Kube
    planner: Planner
    defaults: Defaults
    options: BuildOptions
    model_cache: Path
    profiler: Profiler | None = None
    """None: measured profiling is not available (a PlacedModel asking for it fails)."""
    plans: dict[str, tuple[str, Plan]] = field(default_factory=dict)
    """The last plan of each PlacedModel (by uid) with its `_plan_key`: a change of the spec
    that the plan does not depend on (lanes above all, which an autoscaler changes) is applied
    without solving again. Lost on restart, when planning again is the safe way."""
    supersede_check_s: float = 5.0
    """How often a running solve reads its PlacedModel back to stop it when superseded."""


class _Status:
    """The status as this reconcile pass last wrote it; each `write` is one merge patch."""

    def __init__(self, kube: Kube, body: PlacedModelBody) -> None:
        self.kube = kube
        self.name = body["metadata"]["name"]
        self.namespace = body["metadata"]["namespace"]
        self.generation = int(body["metadata"].get("generation", 1))
        current = body.get("status") or {}
        self.conditions: list[Condition] = list(current.get("conditions") or [])

    def condition(self, type_: str, ok: bool, reason: str, message: str) -> None:
        self.conditions = st.set_condition(
            self.conditions, type_, ok, reason, message, self.generation
        )

    async def write(self, **fields: Any) -> None:
        await self.kube.patch_status(
            self.namespace, self.name, {**fields, "conditions": self.conditions}
        )


def owner_of(body: PlacedModelBody) -> Owner:
    meta = body["metadata"]
    return Owner(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])


def _planned_condition(body: PlacedModelBody) -> Condition | None:
    for c in (body.get("status") or {}).get("conditions") or []:
        if c.get("type") == st.PLANNED:
            return c
    return None


def stale_reason(body: PlacedModelBody, pools_fingerprint: str) -> str | None:
    """Why the PlacedModel must be planned again, or None when its plan is current."""
    status = body.get("status") or {}
    if status.get("observedGeneration") != body["metadata"].get("generation", 1):
        return "the spec changed"
    if status.get("poolsFingerprint") != pools_fingerprint:
        return "the node pools changed"
    planned = _planned_condition(body)
    if planned is None:
        return "it was never planned"
    if planned["status"] != "True" and planned.get("reason") in st.RETRY_REASONS:
        return f"retrying after {planned['reason']}"
    return None


def _spec_fingerprint(body: PlacedModelBody, ctx: Context, nodes: list[NodeFacts]) -> str:
    try:
        spec = parse_spec(body["spec"], ctx.defaults)
    except MoiraiError as e:
        return "invalid:" + hashlib.sha256(str(e).encode()).hexdigest()[:16]
    return fingerprint(spec.pools, nodes)


async def converge(
    body: PlacedModelBody, nodes: Iterable[NodeFacts], ctx: Context, events: Events
) -> None:
    """The one reconcile entry point (see the module docstring)."""
    nodes = list(nodes)
    fp = _spec_fingerprint(body, ctx, nodes)
    why = stale_reason(body, fp) or await secrets_changed(body, ctx)
    if why is not None:
        await plan_and_apply(body, nodes, fp, why, ctx, events)
    else:
        await refresh_readiness(body, ctx, events)


def _supersession(fresh: PlacedModelBody | None, owner: Owner, generation: int) -> str | None:
    """Why the PlacedModel as it is now (`fresh`, None: gone) supersedes the one a pass for
    `generation` began with, or None when it does not."""
    if fresh is None or fresh["metadata"].get("uid") != owner.uid:
        return "it was deleted"
    if (current := int(fresh["metadata"].get("generation", 1))) != generation:
        return f"its spec changed (generation {current})"
    return None


async def superseded(kube: Kube, owner: Owner, generation: int) -> bool:
    """Whether the PlacedModel was deleted (or deleted and made again: another uid) or its
    spec changed (another generation) since a pass began for `generation`: then what that pass
    found is for a spec that is gone, and is dropped (logged here)."""
    fresh = await kube.get("PlacedModel", owner.namespace, owner.name)
    why = _supersession(fresh, owner, generation)
    if why is not None:
        _log_dropped(owner, generation, why)
    return why is not None


def _log_dropped(owner: Owner, generation: int, why: str) -> None:
    log.info(
        "PlacedModel %s/%s: dropping what planning generation %d found: %s meanwhile",
        owner.namespace,
        owner.name,
        generation,
        why,
    )


def _plans_alike(
    fresh: PlacedModelBody | None, owner: Owner, key: str, nodes: list[NodeFacts], ctx: Context
) -> bool:
    """Whether the PlacedModel as it is now (`fresh`) is the same object and plans as `key`:
    an edit of fields the plan does not depend on, whose next pass may reuse the plan."""
    if fresh is None or fresh["metadata"].get("uid") != owner.uid:
        return False
    try:
        spec = parse_spec(fresh["spec"], ctx.defaults)
    except MoiraiError:
        return False
    return _plan_key(spec, fingerprint(spec.pools, nodes)) == key


async def _stop_when_superseded(
    owner: Owner,
    generation: int,
    key: str,
    nodes: list[NodeFacts],
    stop: threading.Event,
    ctx: Context,
) -> None:
    """Set `stop` once the PlacedModel, read back every `ctx.supersede_check_s`, was deleted,
    made again, or edited where the plan looks (`_plans_alike`); runs until cancelled."""
    while True:
        await asyncio.sleep(ctx.supersede_check_s)
        try:
            fresh = await ctx.kube.get("PlacedModel", owner.namespace, owner.name)
        except ApiException as e:  # the pass reads it again when the solve ends
            log.debug("reading PlacedModel %s/%s back failed: %s", owner.namespace, owner.name, e)
            continue
        why = _supersession(fresh, owner, generation)
        if why is not None and not _plans_alike(fresh, owner, key, nodes, ctx):
            log.info(
                "PlacedModel %s/%s: stopping the solve for generation %d: %s",
                owner.namespace,
                owner.name,
                generation,
                why,
            )
            stop.set()
            return


async def _plan(
    owner: Owner,
    spec: PlacedModelSpec,
    matches: Sequence[PoolMatch],
    why: str,
    status: _Status,
    ctx: Context,
    events: Events,
    stop: threading.Event,
) -> Plan:
    """Fetch the model, profile (when measured) and solve (until `stop` is set)."""
    events.info("Profiling", f"planning because {why}")
    status.condition(st.PLANNED, False, "Planning", f"planning because {why}")
    await status.write(phase=st.PROFILING, message=f"fetching the model ({why})")
    cache = ctx.model_cache / (hashlib.sha256(spec.model.uri.encode()).hexdigest()[:16])
    model_path = await asyncio.to_thread(
        fetch, spec.model.uri, cache / "model.onnx", spec.model.sha256
    )
    pools_text = ", ".join(f"{m.spec.name}: {m.devices} device(s)" for m in matches)
    profile = None
    if spec.profiling == "measured":
        if ctx.profiler is None:
            raise st.ProfilingError(
                "measured profiling is not available in this operator (no profile inbox "
                "configured): use spec.profiling.mode: analytic"
            )
        events.info("Profiling", f"profiling Jobs on {pools_text}")
        await status.write(phase=st.PROFILING, message=f"profiling Jobs on {pools_text}")
        profile = await ctx.profiler.profile(owner, spec, matches)
    events.info("Solving", f"{spec.placement.solver} solver on {pools_text}")
    await status.write(phase=st.SOLVING, message=f"solving on {pools_text}")
    return await ctx.planner(spec, matches, model_path, profile, stop=stop)


REFUSED = frozenset({400, 403, 422})
"""API statuses that refuse an object as written (invalid, or denied by RBAC, a quota or an
admission policy): a condition saying so, not an exception that kopf retries in a loop."""

_FIXES = {
    403: "lift the quota, admission policy or RBAC rule that forbids it, or change the spec",
}
_FIX = "change the spec, or the admission policy that refuses it"
_APPLIED_NAMED = 8
"""At most this many children are named in a message (then how many more)."""


def _api_message(error: ApiException) -> str:
    body = error.body.decode(errors="replace") if isinstance(error.body, bytes) else error.body
    try:
        message = json.loads(body or "{}").get("message")
    except (ValueError, AttributeError):
        message = None
    return one_line(message or error.reason or f"HTTP {error.status}", None)


async def apply_child(kube: Kube, manifest: Manifest, dry_run: bool = False) -> dict[str, Any]:
    """`kube.apply`, with a refusal (`REFUSED`) raised as `ChildRejectedError` in the API
    server's own words, and what to do about it."""
    try:
        return await kube.apply(manifest, dry_run=dry_run)
    except ApiException as e:
        if e.status not in REFUSED:
            raise
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        fix = _FIXES.get(e.status, _FIX)
        raise st.ChildRejectedError(
            f"the API server refused {kind} {name}: {_api_message(e)}; {fix} (retried at every "
            "resync)"
        ) from None


def _key(manifest: Manifest) -> tuple[str, str]:
    return manifest["kind"], manifest["metadata"]["name"]


def _not_live(manifest: Manifest) -> Manifest:
    """`manifest` as made ahead of its plan (`apply_children`): a Deployment with no pods."""
    if manifest["kind"] != "Deployment":
        return manifest
    return {**manifest, "spec": {**manifest["spec"], "replicas": 0}}


def _named(keys: Sequence[tuple[str, str]]) -> str:
    names = [f"{kind} {name}" for kind, name in keys]
    more = len(names) - _APPLIED_NAMED
    return ", ".join(names[:_APPLIED_NAMED]) + (f" and {more} more" if more > 0 else "")


async def apply_children(kube: Kube, owner: Owner, children: Sequence[Manifest]) -> None:
    """Apply a plan's children all or nothing, as far as the API server lets an operator:

    1. every child is applied as a dry run: one the API server refuses as written (invalid,
       denied by RBAC or an admission policy, over a quota on its own) is refused before
       anything is written, and whatever serves is untouched;
    2. the children that do not exist yet and that the operator may delete (`PRUNED_KINDS`: a
       new device's or lane's Service and Deployment, the autoscaler) are made, Deployments
       with no replicas, so none is live: a refusal that only their sum meets (a quota on the
       number of Services, which each dry run passed alone) deletes those made, and nothing
       else was touched;
    3. every child is applied as built, in order (the ones of step 2 get their replicas).

    A refusal in step 1 or 2 raises `ChildRejectedError` with nothing of the new plan left.
    Not sound in one case: a refusal in step 3, which the dry run admitted (a quota or policy
    changed in between, a webhook that answers otherwise), comes after the children before it
    were updated. The children made in step 2 are deleted, but a child both plans share (the
    plan ConfigMap, the NetworkPolicies, the gateway, a device's Service and Deployment) stays
    updated: the previous plan's manifests cannot be built again (its spec is gone) and the
    operator may not read ConfigMaps to keep a copy. The error names those children
    (`ChildRejectedError.applied`), and the status does not claim the previous plan serves
    untouched. A first plan's ConfigMap and NetworkPolicies, made in step 3, stay too (the
    operator may not delete them; nothing serves yet, and the next try applies them again)."""
    existing: set[tuple[str, str]] = set()
    for kind in {m["kind"] for m in children} & set(PRUNED_KINDS):
        listed = await kube.list(kind, owner.namespace, selector(owner))
        existing |= {(kind, o["metadata"]["name"]) for o in listed}
    for manifest in children:
        await apply_child(kube, manifest, dry_run=True)
    made: list[tuple[str, str]] = []
    applied: list[tuple[str, str]] = []
    try:
        for manifest in children:
            if manifest["kind"] in PRUNED_KINDS and _key(manifest) not in existing:
                await apply_child(kube, _not_live(manifest))
                made.append(_key(manifest))
        for manifest in children:
            await apply_child(kube, manifest)
            applied.append(_key(manifest))
    except st.ChildRejectedError as e:
        for kind, name in reversed(made):
            await kube.delete(kind, owner.namespace, name)
        left = [key for key in applied if key not in made]
        if not left:
            raise
        raise st.ChildRejectedError(
            f"{e}; applied before the refusal and not undone: {_named(left)}",
            [f"{kind}/{name}" for kind, name in left],
        ) from None


async def ensure_chain_secret(kube: Kube, owner: Owner) -> str:
    """The PlacedModel's chain token: its chain Secret's, or a new random one in a new Secret
    when there is none (or it holds none). A token is never replaced while its Secret exists,
    since running pods keep the one they started with; a Secret deleted is made again, and
    the new token's digest rolls every pod (`secret_state`)."""
    current = await kube.get("Secret", owner.namespace, chain_secret_name(owner))
    held = ((current or {}).get("data") or {}).get(TOKEN_KEY)
    if held:
        return base64.b64decode(held).decode()
    token = secrets.token_urlsafe(32)
    await apply_child(kube, chain_secret(owner, token))
    return token


def _named_by(spec: PlacedModelSpec, key: str) -> tuple[str, str]:
    """Who named the Secret of `spec.serving.<key>`, and how else to do without it: the
    PlacedModel, or the operator's default (the chart value `serving.<key>`)."""
    field = f"spec.serving.{key}"
    if key in spec.serving.defaulted:
        return (
            f"the operator's default {field} (chart value serving.{key})",
            f"name another in {field}",
        )
    return field, "leave the field out"


async def _named_secret(
    kube: Kube,
    owner: Owner,
    spec: PlacedModelSpec,
    key: str,
    name: str,
    create: str,
    error: type[MoiraiError],
) -> Mapping[str, str]:
    """The data of the Secret that `spec.serving.<key>` names; `error` when it is missing,
    saying the `create` command that makes it."""
    secret = await kube.get("Secret", owner.namespace, name)
    if secret is None:
        field, otherwise = _named_by(spec, key)
        raise error(
            f"{field}: Secret {name!r} not found in namespace {owner.namespace}: create it "
            f"(`{create}`) or {otherwise}"
        )
    return secret.get("data") or {}


async def check_auth_secret(kube: Kube, owner: Owner, spec: PlacedModelSpec) -> Mapping[str, str]:
    """`spec.serving.authTokenSecret`, when given, must exist and hold a `token`: else the
    gateway could not start (its pods would wait on the Secret, not say why). Its data (none
    when the spec names no Secret)."""
    name = spec.serving.auth_token_secret
    if name is None:
        return {}
    create = (
        f"kubectl create secret generic {name} -n {owner.namespace} "
        f"--from-literal={TOKEN_KEY}=<token>"
    )
    key, error = "authTokenSecret", st.AuthTokenSecretError
    data = await _named_secret(kube, owner, spec, key, name, create, error)
    if not data.get(TOKEN_KEY):
        raise error(
            f"{_named_by(spec, key)[0]}: Secret {name!r} has no (or an empty) key "
            f"{TOKEN_KEY!r}: put the token under that key (`{create}`)"
        )
    return data


async def check_tls_secret(kube: Kube, owner: Owner, spec: PlacedModelSpec) -> Mapping[str, str]:
    """`spec.serving.tlsSecret`, when given, must exist and hold `tls.crt` and `tls.key`: else
    the gateway could not start. Its data (none when the spec names no Secret)."""
    name = spec.serving.tls_secret
    if name is None:
        return {}
    create = f"kubectl create secret tls {name} -n {owner.namespace} --cert=CERT --key=KEY"
    key = "tlsSecret"
    data = await _named_secret(kube, owner, spec, key, name, create, st.TLSSecretError)
    missing = [key for key in (TLS_CERT_KEY, TLS_KEY_KEY) if not data.get(key)]
    if missing:
        raise st.TLSSecretError(
            f"{_named_by(spec, key)[0]}: Secret {name!r} has no (or an empty) "
            f"{' and '.join(map(repr, missing))}: make it a TLS Secret (`{create}`)"
        )
    return data


def _digest(key: str, data: Mapping[str, str], keys: Sequence[str]) -> str:
    text = json.dumps([data.get(k, "") for k in keys])
    return hmac.new(key.encode(), text.encode(), hashlib.sha256).hexdigest()[:16]


def gateway_trust_root(tls: Mapping[str, str]) -> str | None:
    """What verifies the gateway's certificate, from its TLS Secret's data (base64, as the API
    gives it): the issuer's `ca.crt` when the Secret has one (cert-manager writes it), else the
    certificate `tls.crt` itself (a self-signed one). Certificates only, never the key: the
    operator publishes it in `status.gatewayCA` for the shared endpoint, which may not read
    Secrets. None: no TLS Secret."""
    pem = tls.get(TLS_CA_KEY) or tls.get(TLS_CERT_KEY)
    return base64.b64decode(pem).decode(errors="replace") if pem else None


@dataclass(frozen=True)
class SecretState:
    """What the reconciler learns from the Secrets a PlacedModel's pods read."""

    digests: dict[str, str]
    """A digest of each Secret, by name."""
    gateway_ca: str | None
    """The gateway's trust root (`gateway_trust_root`); None without TLS."""


async def secret_state(kube: Kube, owner: Owner, spec: PlacedModelSpec) -> SecretState:
    """A digest of each Secret the pods of `owner` read (`gateway_secrets`), by name, from the
    keys they read only, and the gateway's trust root. Keyed with the chain token, a random
    secret: the digests are written in pod templates and the status, and a weak endpoint token
    must not be guessable from them. Makes the chain Secret when there is none
    (`ensure_chain_secret`); raises the condition's error when a Secret the spec names is
    missing or incomplete."""
    auth = await check_auth_secret(kube, owner, spec)
    tls = await check_tls_secret(kube, owner, spec)
    token = await ensure_chain_secret(kube, owner)
    names = gateway_secrets(owner, spec)
    out = {names[0]: _chain_digest(token)}
    if spec.serving.auth_token_secret:
        out[spec.serving.auth_token_secret] = _digest(token, auth, [TOKEN_KEY])
    if spec.serving.tls_secret:
        out[spec.serving.tls_secret] = _digest(token, tls, [TLS_CERT_KEY, TLS_KEY_KEY])
    return SecretState(out, gateway_trust_root(tls))


def _secrets_status(digests: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"name": name, "digest": digest} for name, digest in digests.items()]


async def secrets_changed(body: PlacedModelBody, ctx: Context) -> str | None:
    """Why a PlacedModel whose plan is current must be applied again: a Secret its pods read
    was deleted (the chain Secret is made again here), made again or changed since its children
    were applied (`status.secrets`), or is missing now. None when nothing is deployed, and
    while a new spec fails (Failed): `_serving_secrets` follows the Secrets of what serves."""
    current = body.get("status") or {}
    if current.get("phase") not in (st.DEPLOYING, st.READY):
        return None
    try:
        spec = parse_spec(body["spec"], ctx.defaults)
        state = await secret_state(ctx.kube, owner_of(body), spec)
    except MoiraiError:  # planning says which and how, in the Planned condition
        return "a Secret it reads is missing or incomplete"
    applied = {s.get("name"): s.get("digest") for s in current.get("secrets") or []}
    for name, digest in state.digests.items():
        if applied.get(name) != digest:
            return f"Secret {name!r} was made again or changed"
    if current.get("gatewayCA") != state.gateway_ca:  # a new ca.crt alone rolls no pod
        return f"the trust root in Secret {spec.serving.tls_secret!r} changed"
    return None


def _plan_key(spec: PlacedModelSpec, pools_fingerprint: str) -> str:
    """What the plan depends on: the model, pools, placement and profiling (not the serving
    fields, the image or the lanes), and the pools as they are."""
    text = repr((spec.model, spec.pools, spec.placement, spec.profiling, pools_fingerprint))
    return hashlib.sha256(text.encode()).hexdigest()


async def _watched_plan(
    owner: Owner,
    spec: PlacedModelSpec,
    matches: Sequence[PoolMatch],
    why: str,
    key: str,
    nodes: list[NodeFacts],
    status: _Status,
    ctx: Context,
    events: Events,
) -> Plan | None:
    """`_plan`, stopped when the PlacedModel is superseded meanwhile (`_stop_when_superseded`);
    None when it was (the plan is dropped). A plan the stop did not cut short is cached for
    `key`, also when an edit of fields the plan does not depend on superseded it: the next
    generation's pass then applies it without solving again."""
    stop = threading.Event()
    watcher = asyncio.create_task(
        _stop_when_superseded(owner, status.generation, key, nodes, stop, ctx)
    )
    try:
        plan = await _plan(owner, spec, matches, why, status, ctx, events, stop)
    finally:
        watcher.cancel()
    fresh = await ctx.kube.get("PlacedModel", owner.namespace, owner.name)
    gone = _supersession(fresh, owner, status.generation)
    if not stop.is_set() and (gone is None or _plans_alike(fresh, owner, key, nodes, ctx)):
        ctx.plans[owner.uid] = (key, plan)
    if gone is not None:
        _log_dropped(owner, status.generation, gone)
        return None
    return plan


async def plan_and_apply(
    body: PlacedModelBody,
    nodes: list[NodeFacts],
    fp: str,
    why: str,
    ctx: Context,
    events: Events,
) -> None:
    owner = owner_of(body)
    status = _Status(ctx.kube, body)
    try:
        check_name(owner.name)
        spec = parse_spec(body["spec"], ctx.defaults)
        await check_auth_secret(ctx.kube, owner, spec)
        await check_tls_secret(ctx.kube, owner, spec)
        matches = match_pools(spec.pools, nodes)
        key = _plan_key(spec, fp)
        cached = ctx.plans.get(owner.uid)
        if cached is not None and cached[0] == key:
            plan = cached[1]  # only how it is served changed (lanes, ports, image...)
        else:
            plan = await _watched_plan(owner, spec, matches, why, key, nodes, status, ctx, events)
            if plan is None:
                return
        secret = await secret_state(ctx.kube, owner, spec)
        children = build_children(owner, spec, plan, ctx.options, secret.digests)
        summary = (
            f"{st.format_latency(plan.latency_ms)} predicted on {len(plan.devices)} device(s), "
            f"{plan.stages} stage(s) ({plan.solver}: {plan.solver_status}, gap {plan.gap:.1%})"
        )
        events.info("Solved", summary)
        for note in plan.notes:
            events.warning("DeviceCatalogue", note)
        await apply_children(ctx.kube, owner, children)
    except MoiraiError as e:
        if await superseded(ctx.kube, owner, status.generation):
            return
        failure = st.failure(e)
        assert failure is not None  # every MoiraiError maps to a reason
        await _report_failure(body, owner, failure, fp, status, ctx, events)
        return
    pruned = await ctx.kube.prune(owner.namespace, selector(owner), children)
    events.info(
        "Deployed",
        f"applied {len(children)} object(s)" + (f", deleted {', '.join(pruned)}" if pruned else ""),
    )
    status.condition(st.PLANNED, True, "Solved", summary + "".join(f"; {n}" for n in plan.notes))
    deployments = {d.entry.name: stage_name(owner, d.entry.name) for d in plan.devices}
    ready, message = await _readiness(ctx, owner)
    status.condition(st.READY_CONDITION, ready, "Available" if ready else "Deploying", message)
    await status.write(
        phase=st.READY if ready else st.DEPLOYING,
        message=message,
        endpoint=endpoint(owner, spec),
        placement=st.placement_summary(plan, deployments),
        replicas=spec.serving.replicas,
        selector=scale_selector(owner),
        secrets=_secrets_status(secret.digests),
        gatewayCA=secret.gateway_ca,
        observedGeneration=status.generation,
        poolsFingerprint=fp,
    )


def _serves_an_earlier_plan(body: PlacedModelBody) -> bool:
    """Whether children of an earlier plan were applied (and are kept while this one fails)."""
    return bool((body.get("status") or {}).get("placement"))


async def _report_failure(
    body: PlacedModelBody,
    owner: Owner,
    failure: st.Failure,
    fp: str,
    status: _Status,
    ctx: Context,
    events: Events,
) -> None:
    """Failed, with the reason in `Planned`. A PlacedModel that served an earlier plan keeps its
    children: its message says that this spec (or these pools) is not applied, `Ready` goes on
    saying whether those children serve, not that the new plan failed, and a Secret they read
    that changed still rolls them (`_serving_secrets`)."""
    message = failure.message
    events.warning(failure.reason, message)
    fields: dict[str, Any] = {}
    if _serves_an_earlier_plan(body):
        if failure.partial:
            message += "; the rest is not applied: the previous plan's other children keep serving"
        else:
            message += "; not applied: the previous plan keeps serving"
        fields = await _serving_secrets(body, ctx, events)
        ready, readiness = await _readiness(ctx, owner)
        status.condition(
            st.READY_CONDITION, ready, "Available" if ready else "Deploying", readiness
        )
    else:
        status.condition(st.READY_CONDITION, False, "PlanFailed", message)
    status.condition(st.PLANNED, False, failure.reason, message)
    await status.write(
        phase=st.FAILED,
        message=message,
        observedGeneration=status.generation,
        poolsFingerprint=fp,
        **fields,
    )


def _chain_digest(token: str) -> str:
    return _digest(token, {TOKEN_KEY: token}, [TOKEN_KEY])


async def _serving_secrets(body: PlacedModelBody, ctx: Context, events: Events) -> dict[str, Any]:
    """What `secrets_changed` does for a current plan, for the children an earlier plan left
    serving while a new spec fails: a Secret their pods read that was made again or changed
    since they were applied (`status.secrets`) rolls the Deployments whose pods read it, and a
    deleted chain Secret is made again. The Secrets each Deployment reads are told from its
    pod template (`pod_secrets`), not from the spec, which built other children or does not
    parse; only the template's Secrets digest changes (a merge patch), nothing else of the
    previous plan. A Secret that is missing rolls nothing (pods that start wait for it). The
    status fields to write with it: `secrets` (the digests the pods now run with) and
    `gatewayCA`, when they changed."""
    owner = owner_of(body)
    current = body.get("status") or {}
    applied = {s.get("name"): s.get("digest") for s in current.get("secrets") or []}
    if not applied:  # applied before digests were recorded: nothing to compare with
        return {}
    try:
        token = await ensure_chain_secret(ctx.kube, owner)
    except st.ChildRejectedError as e:
        events.warning("ChildRejected", str(e))
        return {}
    deployments = await ctx.kube.list("Deployment", owner.namespace, selector(owner))
    reads = {d["metadata"]["name"]: pod_secrets(d["spec"]["template"]["spec"]) for d in deployments}
    digests: dict[str, str] = {}
    gateway_ca = current.get("gatewayCA")
    for name, keys in {n: k for read in reads.values() for n, k in read.items()}.items():
        if name == chain_secret_name(owner):
            digests[name] = _chain_digest(token)
            continue
        secret = await ctx.kube.get("Secret", owner.namespace, name)
        if secret is None:
            continue
        data = secret.get("data") or {}
        digests[name] = _digest(token, data, keys)
        if TLS_CERT_KEY in keys:
            gateway_ca = gateway_trust_root(data)
    fields: dict[str, Any] = {}
    if gateway_ca != current.get("gatewayCA"):
        fields["gatewayCA"] = gateway_ca
    changed = sorted(name for name, digest in digests.items() if applied.get(name) != digest)
    if not changed:
        return fields
    now = {**applied, **digests}
    rolled = []
    for deployment, names in reads.items():
        if set(changed) & set(names):
            rolls = secrets_patch(secrets_digest(now, list(names)))
            await ctx.kube.patch("Deployment", owner.namespace, deployment, rolls)
            rolled.append(deployment)
    events.info(
        "SecretsChanged",
        f"Secret(s) {', '.join(changed)} made again or changed: rolled {', '.join(rolled)} "
        "of the previous plan, which keeps serving",
    )
    return {**fields, "secrets": _secrets_status(now)}


async def _readiness(ctx: Context, owner: Owner) -> tuple[bool, str]:
    deployments = await ctx.kube.list("Deployment", owner.namespace, selector(owner))
    return st.readiness(deployments)


async def refresh_readiness(body: PlacedModelBody, ctx: Context, events: Events) -> None:
    """Move between Deploying and Ready as the Deployments become (un)available; while a new
    spec fails (Failed) and an earlier plan serves, keep its `Ready` condition true to them and
    roll them when a Secret they read changes (`_serving_secrets`)."""
    current = body.get("status") or {}
    if current.get("phase") == st.FAILED and _serves_an_earlier_plan(body):
        await _refresh_ready_condition(body, ctx, await _serving_secrets(body, ctx, events))
        return
    if current.get("phase") not in (st.DEPLOYING, st.READY):
        return
    ready, message = await _readiness(ctx, owner_of(body))
    phase = st.READY if ready else st.DEPLOYING
    if phase == current.get("phase") and message == current.get("message"):
        return
    if phase != current.get("phase"):
        events.info(phase, message)
    status = _Status(ctx.kube, body)
    status.condition(st.READY_CONDITION, ready, "Available" if ready else "Deploying", message)
    await status.write(phase=phase, message=message)


async def _refresh_ready_condition(
    body: PlacedModelBody, ctx: Context, fields: Mapping[str, Any]
) -> None:
    """`Ready` of the children an earlier plan left serving, with `fields` (what
    `_serving_secrets` changed); the phase and message (the failure of the current spec)
    stay."""
    ready, message = await _readiness(ctx, owner_of(body))
    value = "True" if ready else "False"
    if not fields and any(
        c.get("type") == st.READY_CONDITION
        and c.get("status") == value
        and c.get("message") == message
        for c in (body.get("status") or {}).get("conditions") or []
    ):
        return
    status = _Status(ctx.kube, body)
    status.condition(st.READY_CONDITION, ready, "Available" if ready else "Deploying", message)
    await status.write(**fields)
