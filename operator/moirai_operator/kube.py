"""A thin asynchronous Kubernetes client: server-side apply, list, delete, patch, status patch.

kopf watches and calls the handlers; everything the operator itself writes goes through here.
Writes are server-side apply with one field manager and `force`, so applying the same manifest
twice, or after an operator restart mid-reconcile, converges on one object with no read-modify-
write race; what the operator stops wanting is deleted by label (`prune`). An apply may be a dry
run (the API server validates and admits it as it would, and stores nothing). A merge patch
(`patch`) sets one field of a child whose manifest cannot be built again: the annotation that
rolls the pods of a plan still serving while a new spec fails. The official client
does the authentication (kubeconfig or in-cluster service account, as kopf does) and the
transport; its calls are blocking, so each runs in a worker thread and never stalls the event
loop that serves the other PlacedModels.

Every (resource, verb) the operator uses is recorded in `used`: the chart's RBAC must grant
exactly these plus what kopf itself needs, and a test compares them.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from moirai_operator.resources import FIELD_MANAGER, GROUP, PLURAL, VERSION, Manifest

# kind -> (API prefix, group for RBAC, resource plural)
KINDS: dict[str, tuple[str, str, str]] = {
    "ConfigMap": ("/api/v1", "", "configmaps"),
    "Service": ("/api/v1", "", "services"),
    "Deployment": ("/apis/apps/v1", "apps", "deployments"),
    "NetworkPolicy": ("/apis/networking.k8s.io/v1", "networking.k8s.io", "networkpolicies"),
    "PlacedModel": (f"/apis/{GROUP}/{VERSION}", GROUP, PLURAL),
    "Job": ("/apis/batch/v1", "batch", "jobs"),
    "Secret": ("/api/v1", "", "secrets"),
    "HorizontalPodAutoscaler": (
        "/apis/autoscaling/v2",
        "autoscaling",
        "horizontalpodautoscalers",
    ),
}
PRUNED_KINDS = ("Service", "Deployment", "HorizontalPodAutoscaler")
"""The children that a new plan or spec may no longer need: those named after a device (of a
lane), and the autoscaler; the plan ConfigMap, the gateway and the NetworkPolicies have fixed
names and live as long as the PlacedModel."""


def _selector(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def new_api_client() -> client.ApiClient:
    """A client of the cluster: $KUBECONFIG (read now, not when the kubernetes package was
    imported) or the default kubeconfig, else the pod's service account."""
    kubeconfig = os.environ.get("KUBECONFIG") or None
    try:
        return config.new_client_from_config(config_file=kubeconfig)
    except config.ConfigException:
        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)
        return client.ApiClient(configuration)


class Kube:
    def __init__(self, api_client: client.ApiClient | None = None) -> None:
        self._api = api_client or new_api_client()
        self.used: set[tuple[str, str, str]] = set()

    def _path(self, kind: str, namespace: str, name: str | None = None, sub: str = "") -> str:
        prefix, _, plural = KINDS[kind]
        path = f"{prefix}/namespaces/{namespace}/{plural}"
        if name:
            path += f"/{name}"
        if sub:
            path += f"/{sub}"
        return path

    def _call(
        self,
        verb: str,
        method: str,
        kind: str,
        path: str,
        query: list[tuple[str, str]] | None = None,
        body: Any = None,
        content_type: str | None = None,
        sub: str = "",
    ) -> dict[str, Any]:
        _, group, plural = KINDS[kind]
        self.used.add((group, f"{plural}/{sub}" if sub else plural, verb))
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        args = self._api.param_serialize(
            method=method,
            resource_path=path,
            query_params=query or [],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self._api.call_api(*args)
        data = response.read()
        if response.status >= 400:
            raise ApiException(http_resp=response)
        return json.loads(data) if data else {}

    def _apply(self, manifest: Manifest, dry_run: bool) -> dict[str, Any]:
        meta = manifest["metadata"]
        kind = manifest["kind"]
        _, group, plural = KINDS[kind]
        self.used.add((group, plural, "create"))  # applying a new object creates it
        query = [("fieldManager", FIELD_MANAGER), ("force", "true")]
        if dry_run:
            query.append(("dryRun", "All"))
        return self._call(
            "patch",
            "PATCH",
            kind,
            self._path(kind, meta["namespace"], meta["name"]),
            query=query,
            body=manifest,
            content_type="application/apply-patch+yaml",
        )

    async def apply(self, manifest: Manifest, dry_run: bool = False) -> dict[str, Any]:
        """Create or update `manifest` by server-side apply; returns the object as stored.
        `dry_run`: validated and admitted as it would be, with the same refusals; not stored."""
        return await asyncio.to_thread(self._apply, manifest, dry_run)

    def _patch(self, kind: str, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        self._call(
            "patch",
            "PATCH",
            kind,
            self._path(kind, namespace, name),
            query=[("fieldManager", FIELD_MANAGER)],
            body=dict(patch),
            content_type="application/merge-patch+json",
        )

    async def patch(self, kind: str, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        """Merge `patch` into an object (the next apply of its manifest takes the fields back)."""
        await asyncio.to_thread(self._patch, kind, namespace, name, patch)

    def _list(self, kind: str, namespace: str, labels: Mapping[str, str]) -> list[dict[str, Any]]:
        out = self._call(
            "list",
            "GET",
            kind,
            self._path(kind, namespace),
            query=[("labelSelector", _selector(labels))],
        )
        return list(out.get("items") or [])

    async def list(
        self, kind: str, namespace: str, labels: Mapping[str, str]
    ) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self._list, kind, namespace, labels)

    def _delete(self, kind: str, namespace: str, name: str) -> None:
        try:
            self._call(
                "delete",
                "DELETE",
                kind,
                self._path(kind, namespace, name),
                body={"propagationPolicy": "Background"},
                content_type="application/json",
            )
        except ApiException as e:
            if e.status != 404:
                raise

    async def delete(self, kind: str, namespace: str, name: str) -> None:
        """Delete an object (its dependents in the background); one already gone is no error."""
        await asyncio.to_thread(self._delete, kind, namespace, name)

    async def prune(
        self,
        namespace: str,
        labels: Mapping[str, str],
        keep: Iterable[Manifest],
        kinds: Sequence[str] = PRUNED_KINDS,
    ) -> list[str]:
        """Delete the objects of `kinds` matching `labels` that are not in `keep`; returns their
        `Kind/name`s."""
        wanted = {(m["kind"], m["metadata"]["name"]) for m in keep}
        deleted = []
        for kind in kinds:
            for obj in await self.list(kind, namespace, labels):
                name = obj["metadata"]["name"]
                if (kind, name) not in wanted:
                    await asyncio.to_thread(self._delete, kind, namespace, name)
                    deleted.append(f"{kind}/{name}")
        return deleted

    def _get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._call("get", "GET", kind, self._path(kind, namespace, name))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object as stored now, or None when it is gone."""
        return await asyncio.to_thread(self._get, kind, namespace, name)

    def _patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        try:
            self._call(
                "patch",
                "PATCH",
                "PlacedModel",
                self._path("PlacedModel", namespace, name, "status"),
                body={"status": dict(status)},
                content_type="application/merge-patch+json",
                sub="status",
            )
        except ApiException as e:
            if e.status != 404:  # deleted meanwhile: nothing left to report on
                raise

    async def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        """Merge `status` into the PlacedModel's status subresource (None values remove keys)."""
        await asyncio.to_thread(self._patch_status, namespace, name, status)
