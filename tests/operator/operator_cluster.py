"""The cluster as the operator tests see it: an emulated API server (or the real cluster named by
ONLINEMODEL_TEST_KUBECONFIG, in a fresh namespace) and the real operator (kopf's KopfRunner, a thread).

In the real-cluster mode the tests that need the fake kubelet skip (see conftest.py's `kubelet`).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import traceback
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, Optional

import kmock
from kopf.testing import KopfRunner
from kubernetes.client import Configuration
from kubernetes.config import load_kube_config

from onlinemodel_operator import GROUP, VERSION
from onlinemodel_operator.crd import build_crd
from onlinemodel_operator.kube import ONLINEMODELS, Conflict, KubeApi, Kind
from operator_apiserver import ApiServer

REAL_KUBECONFIG_ENV = "ONLINEMODEL_TEST_KUBECONFIG"


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
            raise AssertionError("the operator failed:\n" + "".join(traceback.format_exception(*result.exc_info)))

