"""Fixtures of the operator tests: an API server (kmock emulator or a real cluster), a fake kubelet, the operator."""

from __future__ import annotations

import secrets
from typing import Any, AsyncIterator

import pytest

from operator_cluster import Cluster, cluster_session, operator_running
from operator_fake_runtime import FakeRuntime
from operator_kubelet import FakeKubelet


@pytest.fixture
async def cluster(tmp_path, monkeypatch) -> AsyncIterator[Cluster]:
    # monkeypatch restores KUBECONFIG and the ONLINEMODEL_OPERATOR_* variables the harness sets.
    for var in ("KUBECONFIG", "ONLINEMODEL_OPERATOR_POLL_INTERVAL", "ONLINEMODEL_OPERATOR_RETRY_DELAY",
                "ONLINEMODEL_OPERATOR_CHECKPOINT_TIMEOUT"):
        monkeypatch.setenv(var, "")
    async with cluster_session(tmp_path, f"om-test-{secrets.token_hex(3)}") as c:
        yield c


@pytest.fixture
async def kubelet(cluster: Cluster) -> AsyncIterator[FakeKubelet]:
    if not cluster.emulated:
        pytest.skip("needs the fake kubelet (emulated API server)")
    async with FakeKubelet(cluster.api, cluster.namespace) as k:
        yield k


@pytest.fixture
async def runtime() -> AsyncIterator[FakeRuntime]:
    async with FakeRuntime() as r:
        yield r


@pytest.fixture
async def operator(cluster: Cluster) -> AsyncIterator[Any]:
    async with operator_running(cluster.namespace) as runner:
        yield runner
        if not cluster.emulated:
            # Delete the OnlineModels while the operator still runs: it removes kopf's finalizers, so the
            # test namespace can go away afterwards.
            await cluster.delete_all_onlinemodels()
