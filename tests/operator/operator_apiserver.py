"""The API server of the operator tests: kmock's KubernetesEmulator plus what kopf and the operator need
and kmock 0.8 lacks (see docs/operator.md, "Developer notes").

`ApiServer` adds uid, resourceVersion, generation, creationTimestamp, generateName, the status
subresource's semantics, finalizer-aware deletion, graceful pod deletion on demand and the garbage
collector's cascade; `/api/v1/namespaces` is parsed as the cluster-scoped resource it is.
"""

from __future__ import annotations

import copy
import itertools
import secrets
import uuid
from typing import Any, Mapping, Optional

import jsonpatch
import kmock
from kmock._internal import dicts as kmock_dicts
from kmock._internal import parsing as kmock_parsing
from kmock._internal.k8s import KubernetesScaffold

from onlinemodel_operator import GROUP, PLURAL, VERSION
from onlinemodel_protocol.api import utc_timestamp

ALL_VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}
KEPT_REQUESTS = 64  # more than ever arrive while one waits for its reaction


_kmock_parse_path = kmock_parsing.parse_path


def _parse_path(path: str) -> Any:
    """kmock 0.8 reads /api/v1/namespaces[/NAME] as a namespace prefix and fails (500); kopf lists them
    whenever it watches specific namespaces. Parse those two paths as the cluster-scoped resource."""
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and len(parts) in (3, 4):
        return kmock_parsing.ParsedPath("", "v1", "namespaces", None, parts[3] if len(parts) == 4 else None, None)
    return _kmock_parse_path(path)


kmock_parsing.parse_path = _parse_path  # test-only fix of the emulator's URL parser

class ApiServer(kmock.KubernetesEmulator):
    """kmock's emulator plus the API server behaviour kopf and the operator rely on."""

    STATUS_SUBRESOURCE = {kmock.resource(GROUP, VERSION, PLURAL)}
    _rv = itertools.count(1)

    def declare(self) -> None:
        """Discovery: kopf never watches a resource the server does not list (namespaces and CRDs included)."""
        infos = {
            f"{GROUP}/{VERSION}/{PLURAL}": dict(kind="OnlineModel", singular="onlinemodel", namespaced=True,
                                                shortnames={"om"}, subresources={"status"}),
            "v1/pods": dict(kind="Pod", singular="pod", namespaced=True, subresources={"status"}),
            "v1/services": dict(kind="Service", singular="service", namespaced=True),
            "v1/persistentvolumeclaims": dict(kind="PersistentVolumeClaim", singular="persistentvolumeclaim",
                                              namespaced=True),
            "v1/secrets": dict(kind="Secret", singular="secret", namespaced=True),
            "v1/configmaps": dict(kind="ConfigMap", singular="configmap", namespaced=True),
            "v1/events": dict(kind="Event", singular="event", namespaced=True),
            "v1/namespaces": dict(kind="Namespace", singular="namespace", namespaced=False),
            "apiextensions.k8s.io/v1/customresourcedefinitions": dict(
                kind="CustomResourceDefinition", singular="customresourcedefinition", namespaced=False),
        }
        for key, info in infos.items():
            self.resources[key] = kmock.ResourceInfo(verbs=ALL_VERBS, **info)

    async def _handle(self, request: Any) -> Any:
        # kmock keeps every request and finds a new one's reaction by scanning them all (quadratic): in the
        # real-runtime test (17 minutes of polling) that took a whole core from the trainer. Nothing here reads
        # the history; the request being served must stay in it (kmock matches it by identity).
        if len(self._requests) > KEPT_REQUESTS:
            kept = self._requests[-KEPT_REQUESTS:]
            if not any(r is request for r in kept):
                kept.append(request)
            self._requests[:] = kept
        action = request.action
        if request.resource is not None and (action == kmock.action.CREATE or (
                action in (kmock.action.UPDATE, kmock.action.DELETE) and request.name is not None)):
            async with self._lock:
                if action == kmock.action.CREATE:
                    await self._create(request)
                elif action == kmock.action.UPDATE:
                    await self._update(request.resource, request.namespace, request.name, request.data,
                                       request.subresource)
                else:
                    await self._delete(request.resource, request.namespace, request.name, request.data)
        # Skip the emulator's own state handling (done above); keep its serving of the stored objects.
        return await KubernetesScaffold._handle(self, request)

    async def _emit(self, resource: Any, type_: str, raw: Mapping[str, Any]) -> None:
        await self._buses[resource].put({"type": type_, "object": copy.deepcopy(dict(raw))})

    async def _create(self, request: Any) -> None:
        data = request.data if isinstance(request.data, dict) else {}
        meta = data.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)  # also seen by kmock's response
        if not meta.get("name"):
            raise kmock.KubernetesError(status=422, reason="Invalid", message="metadata.name is required")
        namespace = request.namespace or meta.get("namespace")
        key = (request.resource, namespace, meta["name"])
        if key in self._objects and not self._objects[key].deleted:
            raise kmock.KubernetesError(status=409, reason="AlreadyExists",
                                        message=f"{request.resource.plural} {meta['name']!r} already exists")
        obj = copy.deepcopy(data)
        if namespace:
            obj["metadata"]["namespace"] = namespace
        obj["metadata"].update(uid=str(uuid.uuid4()), resourceVersion=str(next(self._rv)),
                               creationTimestamp=utc_timestamp(), generation=1)
        if request.resource in self.STATUS_SUBRESOURCE:
            obj.pop("status", None)
        if key in self._objects:
            self._objects[key].create(obj)
        else:
            self._objects[key] = obj
        await self._emit(request.resource, "ADDED", obj)

    async def _update(self, resource: Any, namespace: Optional[str], name: str, patch: Any,
                      subresource: Optional[str] = None) -> dict[str, Any]:
        key = (resource, namespace, name)
        if key not in self._objects or self._objects[key].deleted:
            raise kmock.KubernetesObjectNotFoundError()
        old = copy.deepcopy(self._objects[key].raw)
        has_status = resource in self.STATUS_SUBRESOURCE
        if isinstance(patch, dict):
            if subresource == "status":
                patch = {"status": patch.get("status")} if "status" in patch else {}
            elif has_status:
                patch = {k: v for k, v in patch.items() if k != "status"}
        try:
            new = dict(kmock_dicts.patch_dict(old, patch or {}))
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
            raise kmock.KubernetesError(status=422, reason="Invalid", message=str(exc))
        new = copy.deepcopy(new)
        meta = new.setdefault("metadata", {})
        for immutable in ("uid", "name", "namespace", "creationTimestamp", "generation"):
            if immutable in old.get("metadata", {}):
                meta[immutable] = old["metadata"][immutable]
        if subresource != "status" and new.get("spec") != old.get("spec"):
            meta["generation"] = int(old["metadata"].get("generation", 1)) + 1
        meta["resourceVersion"] = str(next(self._rv))
        if meta.get("deletionTimestamp") and not meta.get("finalizers") and old["metadata"].get("finalizers"):
            # The last finalizer went away: the object is gone now (graceful pods wait for the kubelet).
            self._objects[key].history.append(new)
            await self._remove(key)
        else:
            self._objects[key].history.append(new)
            await self._emit(resource, "MODIFIED", new)
        return new

    async def _delete(self, resource: Any, namespace: Optional[str], name: str, options: Any,
                      graceful: bool = True) -> None:
        key = (resource, namespace, name)
        if key not in self._objects or self._objects[key].deleted:
            raise kmock.KubernetesObjectNotFoundError()
        obj = self._objects[key].raw
        uid = ((options or {}).get("preconditions") or {}).get("uid") if isinstance(options, dict) else None
        if uid and uid != obj["metadata"].get("uid"):
            raise kmock.KubernetesError(status=409, reason="Conflict", message="uid precondition failed")
        if obj["metadata"].get("deletionTimestamp"):
            return
        keep = obj["metadata"].get("finalizers") or (graceful and resource == kmock.resource("v1/pods")
                                                     and self.graceful_pod_deletion)
        if keep:
            await self._update(resource, namespace, name, {"metadata": {"deletionTimestamp": utc_timestamp()}})
        else:
            await self._remove(key)

    graceful_pod_deletion = False  # True: deleted pods linger (terminating) until the kubelet finishes them

    async def _remove(self, key: Any) -> None:
        raw = self._objects[key].raw
        self._objects[key].delete()
        await self._emit(key[0], "DELETED", raw)
        uid = raw.get("metadata", {}).get("uid")
        for other_key, other in list(self._objects.items()):  # the garbage collector: cascade to dependents
            if other.deleted:
                continue
            refs = other.raw.get("metadata", {}).get("ownerReferences") or []
            if any(r.get("uid") == uid for r in refs):
                await self._delete(other_key[0], other_key[1], other_key[2], None, graceful=False)

    # Helpers for the fake kubelet and for tests (same semantics as API calls).
    async def patch_object(self, resource: str, namespace: str, name: str, patch: Mapping[str, Any],
                           subresource: Optional[str] = None) -> dict[str, Any]:
        async with self._lock:
            return await self._update(kmock.resource(resource), namespace, name, dict(patch), subresource)

    async def finish_deletion(self, resource: str, namespace: str, name: str) -> None:
        async with self._lock:
            key = (kmock.resource(resource), namespace, name)
            if key in self._objects and not self._objects[key].deleted:
                await self._remove(key)

    def live(self, resource: str, namespace: Optional[str] = None) -> list[dict[str, Any]]:
        res = kmock.resource(resource)
        return [copy.deepcopy(obj.raw) for (r, ns, _), obj in list(self._objects.items())
                if r == res and not obj.deleted and (namespace is None or ns == namespace)]

