"""Test harness: the real operator (kopf) against kmock's KubernetesEmulator, or against a real cluster.

Emulator mode (default): `ApiServer` fills what kmock lacks (uid, resourceVersion, generation,
creationTimestamp, generateName, status subresource semantics, finalizer-aware and cascading deletion),
and `FakeKubelet` plays the pods' lifecycle. Real mode: set ONLINEMODEL_TEST_KUBECONFIG to a kubeconfig;
the same tests then run against that cluster in a fresh namespace (tests needing the fake kubelet skip).

For a test that runs the pod for real (the lead's end-to-end test): `FakeKubelet(auto_start=False)`,
then `local_command(pod, host, port, checkpoint_dir)` gives the pod's command to run as a local process, and
`kubelet.mark_running(name, ready=True)` publishes the pod as Running at 127.0.0.1 (see `play_kubelet`).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime as dt
import itertools
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, Optional

import httpx
import jsonpatch
import kmock
from aiohttp import web
from kmock._internal import dicts as kmock_dicts
from kmock._internal import parsing as kmock_parsing
from kmock._internal.k8s import KubernetesScaffold

from onlinemodel_operator import GROUP, PLURAL, VERSION
from onlinemodel_operator.kube import CLAIMS, ONLINEMODELS, PODS, SERVICES, KubeApi, Kind
from onlinemodel_operator.render import CONTAINER_NAME, container_command, with_overrides

REAL_KUBECONFIG_ENV = "ONLINEMODEL_TEST_KUBECONFIG"
ALL_VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}
NAMESPACES = Kind("/api/v1", "namespaces")


def utcnow_text() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the API server ---------------------------------------------------------------------------------------

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
            "v1/events": dict(kind="Event", singular="event", namespaced=True),
            "v1/namespaces": dict(kind="Namespace", singular="namespace", namespaced=False),
            "apiextensions.k8s.io/v1/customresourcedefinitions": dict(
                kind="CustomResourceDefinition", singular="customresourcedefinition", namespaced=False),
        }
        for key, info in infos.items():
            self.resources[key] = kmock.ResourceInfo(verbs=ALL_VERBS, **info)

    async def _handle(self, request: Any) -> Any:
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
                               creationTimestamp=utcnow_text(), generation=1)
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
            await self._update(resource, namespace, name, {"metadata": {"deletionTimestamp": utcnow_text()}})
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


# --- the kubelet ------------------------------------------------------------------------------------------

def running_status(ip: str = "127.0.0.1", ready: bool = True, restarts: int = 0) -> dict[str, Any]:
    now = utcnow_text()
    return {
        "phase": "Running", "podIP": ip, "startTime": now,
        "conditions": [{"type": "PodScheduled", "status": "True"},
                       {"type": "Ready", "status": "True" if ready else "False"}],
        "containerStatuses": [{"name": CONTAINER_NAME, "ready": ready, "restartCount": restarts,
                               "started": True, "state": {"running": {"startedAt": now}}}],
    }


class FakeKubelet:
    """Plays the kubelet for pods in the emulator: starts them (Running at 127.0.0.1) and finishes deletions."""

    def __init__(self, api: ApiServer, namespace: str, *, auto_start: bool = True, ready: bool = True,
                 termination_delay: float = 0.3) -> None:
        self.api = api
        self.namespace = namespace
        self.auto_start = auto_start
        self.ready = ready
        self.termination_delay = termination_delay
        self._seen: set[str] = set()
        self._terminating: set[str] = set()
        self._task: Optional[asyncio.Task[None]] = None

    async def __aenter__(self) -> "FakeKubelet":
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _loop(self) -> None:
        while True:
            for pod in self.api.live("v1/pods", self.namespace):
                uid = pod["metadata"]["uid"]
                name = pod["metadata"]["name"]
                if pod["metadata"].get("deletionTimestamp"):
                    if uid in self._terminating:
                        continue
                    self._terminating.add(uid)
                    asyncio.get_running_loop().call_later(
                        self.termination_delay,
                        lambda n=name: asyncio.ensure_future(self.api.finish_deletion("v1/pods", self.namespace, n)))
                    continue
                if uid not in self._seen:
                    self._seen.add(uid)
                    if self.auto_start:
                        await self.mark_running(name, ready=self.ready)
            await asyncio.sleep(0.05)

    async def set_status(self, name: str, status: Mapping[str, Any]) -> dict[str, Any]:
        return await self.api.patch_object("v1/pods", self.namespace, name, {"status": dict(status)}, "status")

    async def mark_running(self, name: str, *, ready: bool = True, ip: str = "127.0.0.1") -> dict[str, Any]:
        return await self.set_status(name, running_status(ip, ready))

    async def mark_waiting(self, name: str, reason: str, message: str = "") -> dict[str, Any]:
        return await self.set_status(name, {
            "phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}],
            "containerStatuses": [{"name": CONTAINER_NAME, "ready": False, "restartCount": 0,
                                   "state": {"waiting": {"reason": reason, "message": message}}}]})

    async def mark_failed(self, name: str, exit_code: int = 1, reason: str = "Error") -> dict[str, Any]:
        now = utcnow_text()
        return await self.set_status(name, {
            "phase": "Failed", "containerStatuses": [{
                "name": CONTAINER_NAME, "ready": False, "restartCount": 0,
                "state": {"terminated": {"exitCode": exit_code, "reason": reason, "finishedAt": now}}}]})


def local_command(pod: Mapping[str, Any], *, host: str = "127.0.0.1", port: int, checkpoint_dir: str) -> list[str]:
    """The pod's `onlinemodel serve ...` command, re-pointed at a local address and checkpoint directory."""
    return with_overrides(container_command(pod), host=host, port=str(port), checkpoint_dir=checkpoint_dir)


def runnable(argv: list[str]) -> list[str]:
    """`onlinemodel ...` as a local command: the console script when on PATH, else this Python."""
    if argv and argv[0] == "onlinemodel" and shutil.which("onlinemodel") is None:
        return [sys.executable, "-c", "import sys; from onlinemodel_runtime.cli import main; sys.exit(main())",
                *argv[1:]]
    return argv


async def _health_ok(port: int) -> bool:
    try:
        async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
            return (await client.get(f"http://127.0.0.1:{port}/health")).status_code == 200
    except httpx.HTTPError:
        return False


async def play_kubelet(kubelet: FakeKubelet, pod: Mapping[str, Any], *, checkpoint_dir: str,
                       env: Optional[Mapping[str, str]] = None,
                       ready: Optional[Callable[[], Awaitable[bool]]] = None,
                       timeout: float = 600.0) -> subprocess.Popen[bytes]:
    """Run the pod's container command as a local process and publish the pod as the kubelet would.

    The process listens on the pod's containerPort (a test sets spec.serving.port to `free_port()`) at
    127.0.0.1 and checkpoints to `checkpoint_dir`. The pod is marked Running (not ready) at once, and ready
    when `ready()` (default: GET /health answers 200) says so. The caller terminates the process."""
    port = next(p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", []))
    argv = runnable(local_command(pod, port=port, checkpoint_dir=checkpoint_dir))
    process = subprocess.Popen(argv, env={**os.environ, **(env or {})})
    await kubelet.mark_running(pod["metadata"]["name"], ready=False)
    deadline = asyncio.get_running_loop().time() + timeout
    while not await (ready() if ready is not None else _health_ok(port)):
        if process.poll() is not None:
            raise RuntimeError(f"{argv[:3]} exited with {process.returncode}")
        if asyncio.get_running_loop().time() > deadline:
            process.terminate()
            raise TimeoutError(f"the runtime did not get ready in {timeout} s")
        await asyncio.sleep(1.0)
    await kubelet.mark_running(pod["metadata"]["name"], ready=True)
    return process


# --- a fake runtime (operator tests only) -----------------------------------------------------------------

class FakeRuntime:
    """GET /health, GET /train/status, POST /checkpoint of the runtime contract, with recorded calls."""

    def __init__(self) -> None:
        self.port = free_port()
        self.train_status: dict[str, Any] = {
            "state": "idle", "steps": 0, "tokens_trained": 0, "last_loss": None, "weight_version": 0,
            "last_step_time": None, "jobs": [], "last_error": None,
            "checkpoint": {"state": "idle", "last": None, "last_error": None}}
        self.checkpoint_calls: list[dict[str, Any]] = []
        self.checkpoint_error: Optional[tuple[int, str]] = None
        self.checkpoint_delay = 0.0  # seconds POST /checkpoint takes
        self._runner: Optional[web.AppRunner] = None

    async def __aenter__(self) -> "FakeRuntime":
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/train/status", self._status)
        app.router.add_post("/checkpoint", self._checkpoint)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self.train_status)

    async def _checkpoint(self, request: web.Request) -> web.Response:
        self.checkpoint_calls.append({"authorization": request.headers.get("Authorization"), "time": utcnow_text()})
        await asyncio.sleep(self.checkpoint_delay)
        if self.checkpoint_error is not None:
            code, message = self.checkpoint_error
            return web.json_response({"error": {"message": message, "type": "server_error"}}, status=code)
        step = self.train_status.get("steps", 0)
        last = {"step": step, "weight_version": step, "time": utcnow_text(),
                "path": f"/var/lib/onlinemodel/checkpoints/step-{step:06d}", "size_bytes": 1, "seconds": 0.01}
        self.train_status["checkpoint"] = {"state": "idle", "last": last, "last_error": None}
        return web.json_response(last)


# --- the cluster as the tests see it ----------------------------------------------------------------------

class Cluster:
    """Async access to the API server (emulated or real), scoped to one namespace."""

    def __init__(self, kube: KubeApi, namespace: str, api: Optional[ApiServer]) -> None:
        self.kube = kube
        self.namespace = namespace
        self.api = api  # None on a real cluster

    @property
    def emulated(self) -> bool:
        return self.api is not None

    async def create_onlinemodel(self, name: str, spec: Mapping[str, Any],
                                 annotations: Optional[Mapping[str, str]] = None) -> dict[str, Any]:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "OnlineModel",
                "metadata": {"name": name, "namespace": self.namespace, "annotations": dict(annotations or {})},
                "spec": dict(spec)}
        return await self.kube._request("POST", ONLINEMODELS.path(self.namespace), body=body,
                                        content_type="application/json") or {}

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(dict(obj))
        obj.setdefault("metadata", {})["namespace"] = self.namespace
        return await self.kube.create(obj)

    async def get(self, kind: Kind, name: str) -> Optional[dict[str, Any]]:
        return await self.kube.get(kind, self.namespace, name)

    async def patch(self, kind: Kind, name: str, patch: Mapping[str, Any]) -> Optional[dict[str, Any]]:
        return await self.kube.patch(kind, self.namespace, name, patch)

    async def delete(self, kind: Kind, name: str) -> bool:
        return await self.kube.delete(kind, self.namespace, name)

    async def delete_all_onlinemodels(self, timeout: float = 60.0) -> None:
        listing = await self.kube._request("GET", ONLINEMODELS.path(self.namespace)) or {}
        names = [item["metadata"]["name"] for item in listing.get("items", [])]
        for name in names:
            await self.delete(ONLINEMODELS, name)
        for name in names:
            await self.wait_for(lambda n=name: self.get(ONLINEMODELS, n), lambda o: o is None, timeout, f"{name} gone")

    async def onlinemodel(self, name: str) -> dict[str, Any]:
        return await self.get(ONLINEMODELS, name) or {}

    async def wait_for(self, probe: Callable[[], Awaitable[Any]], check: Callable[[Any], bool],
                       timeout: float = 15.0, what: str = "condition") -> Any:
        """Poll `probe()` until `check(value)`; fail with the last value seen."""
        deadline = asyncio.get_running_loop().time() + timeout
        value = None
        while True:
            value = await probe()
            try:
                if check(value):
                    return value
            except (KeyError, TypeError, IndexError, StopIteration):
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out waiting for {what}; last value:\n{json.dumps(value, indent=1)[:4000]}")
            await asyncio.sleep(0.05)

    async def wait_condition(self, name: str, type_: str, status: str, reason: Optional[str] = None,
                             timeout: float = 15.0) -> dict[str, Any]:
        def check(om: Mapping[str, Any]) -> bool:
            cond = condition(om, type_)
            return (cond is not None and cond["status"] == status and (reason is None or cond["reason"] == reason)
                    and cond.get("observedGeneration") == om["metadata"].get("generation"))
        return await self.wait_for(lambda: self.onlinemodel(name), check, timeout,
                                   f"{type_}={status} ({reason}) on {name}")


def condition(om: Mapping[str, Any], type_: str) -> Optional[dict[str, Any]]:
    for cond in (om.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return cond
    return None


def kubeconfig_for(url: str, path: Path) -> Path:
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": url}}],
        "users": [{"name": "kmock", "user": {"token": "kmock-token"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": "default"}}],
    }))
    return path


async def install_crd(kube: KubeApi, timeout: float = 30.0) -> None:
    """Create the OnlineModel CRD on a real cluster unless it is there, and wait until it is served."""
    from onlinemodel_operator.crd import build_crd
    from onlinemodel_operator.kube import Conflict

    path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    try:
        await kube._request("POST", path, body=build_crd(), content_type="application/json")
    except Conflict:
        pass
    deadline = asyncio.get_running_loop().time() + timeout
    while await kube._request("GET", f"/apis/{GROUP}/{VERSION}") is None:
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("the OnlineModel CRD is not served")
        await asyncio.sleep(0.5)


@contextlib.asynccontextmanager
async def cluster_session(tmp_path: Path, namespace: str) -> AsyncIterator[Cluster]:
    """An emulated API server (or the real cluster of $ONLINEMODEL_TEST_KUBECONFIG) with `namespace` in it.

    Sets KUBECONFIG for the operator; the caller restores the environment (monkeypatch)."""
    from kubernetes.client import Configuration
    from kubernetes.config import load_kube_config

    real = os.environ.get(REAL_KUBECONFIG_ENV)
    if real:
        os.environ["KUBECONFIG"] = real
        cfg = Configuration()
        load_kube_config(config_file=real, client_configuration=cfg)
        kube = KubeApi(cfg)
        try:
            await install_crd(kube)
            await kube._request("POST", "/api/v1/namespaces", body={
                "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
                content_type="application/json")
            yield Cluster(kube, namespace, None)
        finally:
            await kube._request("DELETE", f"/api/v1/namespaces/{namespace}")
            await kube.aclose()
        return
    async with ApiServer() as api, kmock.Server(api) as server:
        api.declare()
        url = str(server.url).rstrip("/")
        os.environ["KUBECONFIG"] = str(kubeconfig_for(url, tmp_path / "kubeconfig.json"))
        for ns in ("default", namespace):
            api.objects[kmock.resource("v1/namespaces"), None, ns] = {
                "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "uid": str(uuid.uuid4())}}
        cfg = Configuration()
        cfg.host = url
        kube = KubeApi(cfg)
        try:
            yield Cluster(kube, namespace, api)
        finally:
            await kube.aclose()


@contextlib.asynccontextmanager
async def operator_running(namespace: str, *, poll_interval: float = 0.3) -> AsyncIterator[Any]:
    """The real operator (kopf CLI in a thread via KopfRunner) watching `namespace`."""
    from kopf.testing import KopfRunner

    os.environ["ONLINEMODEL_OPERATOR_POLL_INTERVAL"] = str(poll_interval)
    os.environ["ONLINEMODEL_OPERATOR_RETRY_DELAY"] = "0.2"
    os.environ["ONLINEMODEL_OPERATOR_CHECKPOINT_TIMEOUT"] = "10"
    runner = KopfRunner(["run", "--standalone", "--verbose", "-n", namespace, "-m", "onlinemodel_operator.handlers"],
                        timeout=30, reraise=False)
    runner.__enter__()
    try:
        yield runner
    finally:
        # Join in a thread: the emulator shares this event loop and must keep serving while kopf stops.
        await asyncio.to_thread(runner.__exit__, None, None, None)
        result = runner.future.result()
        # kopf 1.45 may raise TimeoutError from its root tasks when a daemon is spawned by an event that
        # arrives while it stops (seen when a test ends right after a pod was recreated); not our failure.
        if result.exception is not None and not isinstance(result.exception, (SystemExit, TimeoutError)):
            import traceback
            raise AssertionError("the operator failed:\n" + "".join(traceback.format_exception(*result.exc_info)))


__all__ = ["ApiServer", "Cluster", "FakeKubelet", "FakeRuntime", "cluster_session", "condition", "free_port",
           "local_command", "operator_running", "play_kubelet", "running_status", "CLAIMS", "ONLINEMODELS", "PODS",
           "SERVICES"]
