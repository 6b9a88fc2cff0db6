"""PlacedModel status: phases, conditions, and the one place where errors become conditions.

Status is what a person reads with `kubectl get pm` and `kubectl describe pm`, so every failure
ends as a condition whose reason names the problem (`NoMatchingPool`, `InsufficientMemory`,
`ModelUnreachable`, ...) and whose message says what to change. `failure` below is the only
mapping from exceptions to reasons; the reconciler catches once and calls it.

Two conditions, as in most operators that deploy workloads:

    Planned   the placement for the current generation is solved (False: why not)
    Ready     every stage server and the gateway are available (False: what is missing)

and a phase that summarises them for the printer column: Pending → Profiling → Solving →
Deploying → Ready, or Failed. `lastTransitionTime` only moves when a condition's status flips.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from moirai.errors import (
    CostGraphError,
    InfeasibleError,
    ModelError,
    MoiraiError,
    SolverError,
    one_line,
)
from moirai_operator.catalogue import CatalogueError
from moirai_operator.children import PlanTooLargeError
from moirai_operator.fetch import ModelDigestError, ModelUnreachableError
from moirai_operator.plan import Plan
from moirai_operator.pools import PoolError
from moirai_operator.resources import Condition
from moirai_operator.spec import SpecError

PENDING, PROFILING, SOLVING, DEPLOYING, READY, FAILED = (
    "Pending",
    "Profiling",
    "Solving",
    "Deploying",
    "Ready",
    "Failed",
)
PLANNED = "Planned"
READY_CONDITION = "Ready"


class InsufficientMemoryError(MoiraiError):
    """The matched pools together (or their largest device) cannot hold the model."""


class ProfilingError(MoiraiError):
    """Profiling the pools failed or is not available in the requested mode."""


class AuthTokenSecretError(MoiraiError):
    """`spec.serving.authTokenSecret` names a Secret that is missing or has no `token` key."""


class TLSSecretError(MoiraiError):
    """`spec.serving.tlsSecret` names a Secret that is missing or lacks `tls.crt` / `tls.key`."""


class ChildRejectedError(MoiraiError):
    """The API server (or an admission policy) refused a child the plan needs; the message is
    its own, one line. `applied`: the children (`Kind/name`) that were applied before the
    refusal and could not be put back (see `reconcile.apply_children`); none as a rule."""

    def __init__(self, message: str, applied: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.applied = tuple(applied)


@dataclass(frozen=True)
class Failure:
    reason: str
    message: str
    retry: bool
    """Whether retrying without a spec or pool change may succeed (e.g. a network error)."""
    partial: bool = False
    """Whether some children of the failed spec were applied and left so (the message names
    them): then the previous plan, if any, does not serve untouched."""


# Most specific first: the first matching class wins.
_REASONS: tuple[tuple[type[BaseException], str, bool], ...] = (
    (SpecError, "InvalidSpec", False),
    (PoolError, "NoMatchingPool", False),
    (InsufficientMemoryError, "InsufficientMemory", False),
    (ModelUnreachableError, "ModelUnreachable", True),
    (ModelDigestError, "ModelDigestMismatch", False),
    (ModelError, "InvalidModel", False),
    (CostGraphError, "InvalidModel", False),
    (InfeasibleError, "Infeasible", False),
    (SolverError, "SolverFailed", False),
    (PlanTooLargeError, "PlanTooLarge", False),
    (CatalogueError, "InvalidDeviceCatalogue", False),
    (ProfilingError, "ProfilingFailed", False),
    (AuthTokenSecretError, "AuthTokenSecretMissing", True),
    (TLSSecretError, "TLSSecretMissing", True),
    # Retried: a policy, a quota or the operator's permissions may change without the spec.
    (ChildRejectedError, "ChildRejected", True),
    (MoiraiError, "PlanningFailed", False),
)


RETRY_REASONS = frozenset(reason for _, reason, retry in _REASONS if retry)
"""Reasons of failures that may pass without a change to the spec or the pools."""


def failure(exc: BaseException) -> Failure | None:
    """The condition reason for an error a person can act on; None for bugs and API errors."""
    for cls, reason, retry in _REASONS:
        if isinstance(exc, cls):
            partial = isinstance(exc, ChildRejectedError) and bool(exc.applied)
            return Failure(reason, str(exc), retry, partial)
    return None


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: Sequence[Condition],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    generation: int,
) -> list[Condition]:
    """`conditions` with `type_` set; its transition time kept unless its status flips."""
    value = "True" if status else "False"
    out: list[Condition] = []
    previous = None
    for c in conditions:
        if c.get("type") == type_:
            previous = c
        else:
            out.append(c)
    since = previous["lastTransitionTime"] if previous and previous["status"] == value else now()
    out.append(
        {
            "type": type_,
            "status": value,
            "reason": reason,
            "message": message,
            "lastTransitionTime": since,
            "observedGeneration": generation,
        }
    )
    return sorted(out, key=lambda c: c["type"])


def format_latency(ms: float) -> str:
    if ms >= 1000:
        return f"{ms / 1000:.2f}s"
    return f"{ms:.3g}ms" if ms < 10 else f"{ms:.1f}ms"


def placement_summary(plan: Plan, deployments: dict[str, str]) -> dict[str, Any]:
    """`status.placement`: what the plan decided, for people and the printer columns."""
    return {
        "devices": len(plan.devices),
        "stages": plan.stages,
        "latency": format_latency(plan.latency_ms),
        "latencyMs": round(plan.latency_ms, 6),
        "lowerBoundMs": round(plan.lower_bound_ms, 6),
        "gap": round(plan.gap, 6),
        # auto's: which bound binds, and why the solve ended (whether more time could pay)
        **{
            camel: str(plan.placement[key])
            for key, camel in (("bound_from", "boundFrom"), ("stopped_by", "stoppedBy"))
            if plan.placement.get(key)
        },
        "solver": plan.solver,
        "solverStatus": plan.solver_status,
        "objective": plan.objective,
        "profiling": plan.profiling,
        "assignment": [
            {
                "device": d.entry.name,
                "pool": d.entry.pool,
                "kind": d.entry.kind,
                "tasks": d.tasks,
                "deployment": deployments[d.entry.name],
            }
            for d in plan.devices
        ],
    }


_STUCK = frozenset({("ReplicaFailure", "True"), ("Progressing", "False")})


def condition_line(condition: Mapping[str, Any], limit: int | None = None) -> str:
    """A Kubernetes condition's reason and message, on one line (cut to `limit` characters)."""
    return one_line(f"{condition.get('reason', '')}: {condition.get('message', '')}", limit)


def _stuck(status: dict[str, Any]) -> list[str]:
    """Why a Deployment makes no progress, as its controller says: pods it may not create
    (`ReplicaFailure`: a quota, an admission policy) or a rollout past its deadline
    (`Progressing` False: pods that never schedule or start). One line each."""
    return [
        condition_line(c, 300)
        for c in status.get("conditions") or []
        if (c.get("type"), c.get("status")) in _STUCK
    ]


def readiness(deployments: Sequence[dict[str, Any]]) -> tuple[bool, str]:
    """Whether every Deployment has all its replicas available, and a message saying which not."""
    waiting = []
    for d in deployments:
        want = int((d.get("spec") or {}).get("replicas", 1))
        status = d.get("status") or {}
        have = int(status.get("availableReplicas") or 0)
        current = status.get("observedGeneration", 0) >= d["metadata"].get("generation", 0)
        updated = int(status.get("updatedReplicas") or 0) >= want
        if have < want or not current or not updated:
            why = "".join(f"; {w}" for w in _stuck(status))
            waiting.append(f"{d['metadata']['name']} ({have}/{want} available{why})")
    if not deployments:
        return False, "no Deployments yet"
    if waiting:
        return False, "waiting for " + ", ".join(sorted(waiting))
    return True, f"all {len(deployments)} Deployments available"
