"""Scaled out, with the real operator (kopf) against kmock's emulator: one learner and followers."""

from __future__ import annotations

from typing import Any

import pytest

from onlinemodel_operator import FOLLOWER, LEARNER, ROLE_LABEL
from onlinemodel_operator.kube import ONLINEMODELS, PODS, SERVICES
from operator_cluster import Cluster, condition
from operator_fake_runtime import FakeRuntime
from operator_kubelet import FakeKubelet
from test_operator_kopf import arg, replaced_pod, spec

pytestmark = pytest.mark.e2e


def followers_reported(*lags: tuple[str, int, float], version: int = 12) -> dict[str, Any]:
    return {"role": "learner", "followers": [
        {"name": name, "weight_version": v, "lag_versions": version - v, "lag_seconds": lag,
         "last_seen": "2026-12-01T18:00:00Z"} for name, v, lag in lags]}


async def pods_named(cluster: Cluster, *names: str) -> dict[str, dict[str, Any]]:
    return {n: await cluster.wait_for(lambda n=n: cluster.get(PODS, n), lambda p: p is not None, what=f"pod {n}")
            for n in names}


async def gone(cluster: Cluster, name: str) -> None:
    await cluster.wait_for(lambda: cluster.get(PODS, name), lambda p: p is None, what=f"pod {name} gone")


async def test_three_replicas_one_learner_two_followers_services_and_status(
        cluster: Cluster, kubelet: FakeKubelet, runtime: FakeRuntime, operator: Any) -> None:
    runtime.train_status.update(weight_version=12, replication=followers_reported(
        ("r1-follower-1", 12, 0.0), ("r1-follower-2", 11, 4.5)))
    await cluster.create_onlinemodel("r1", spec(runtime.port, replicas=3))
    pods = await pods_named(cluster, "r1", "r1-follower-1", "r1-follower-2")
    learner = pods["r1"]
    assert learner["metadata"]["labels"][ROLE_LABEL] == LEARNER
    assert "--follow" not in learner["spec"]["containers"][0]["args"]
    assert arg(learner, "--checkpoint-dir")
    for index in (1, 2):
        follower = pods[f"r1-follower-{index}"]
        assert follower["metadata"]["labels"][ROLE_LABEL] == FOLLOWER
        assert arg(follower, "--follow") == f"http://r1-train.{cluster.namespace}.svc:{runtime.port}"
        assert arg(follower, "--follower-name") == f"r1-follower-{index}"
        assert "--checkpoint-dir" not in follower["spec"]["containers"][0]["args"]
    model_svc, train_svc = await cluster.get(SERVICES, "r1"), await cluster.get(SERVICES, "r1-train")
    assert model_svc["spec"]["selector"] == {"onlinemodel.dev/name": "r1"}
    assert train_svc["spec"]["selector"] == {"onlinemodel.dev/name": "r1", ROLE_LABEL: LEARNER}

    om = await cluster.wait_for(lambda: cluster.onlinemodel("r1"),
                                lambda o: o["status"]["replicas"]["ready"] == 3
                                and condition(o, "FollowersInSync")["status"] == "True", what="3 ready, in sync")
    replicas = om["status"]["replicas"]
    assert replicas["desired"] == 3 and replicas["maxLagSeconds"] == 4.5
    assert [(f["name"], f["weightVersion"], f["lagVersions"]) for f in replicas["followers"]] == [
        ("r1-follower-1", 12, 0), ("r1-follower-2", 11, 1)]
    assert condition(om, "Ready")["status"] == "True"

    # A follower beyond the bound (300 s by default) sets FollowersInSync=False.
    runtime.train_status.update(replication=followers_reported(("r1-follower-1", 12, 0.0), ("r1-follower-2", 2, 900.0)))
    om = await cluster.wait_condition("r1", "FollowersInSync", "False", "FollowerBehind")
    assert "r1-follower-2" in condition(om, "FollowersInSync")["message"]
    assert om["status"]["replicas"]["maxLagSeconds"] == 900.0


async def test_scale_down_and_up_never_touch_the_learner(cluster: Cluster, kubelet: FakeKubelet,
                                                         runtime: FakeRuntime, operator: Any) -> None:
    await cluster.create_onlinemodel("r2", spec(runtime.port, replicas=3))
    pods = await pods_named(cluster, "r2", "r2-follower-1", "r2-follower-2")
    learner_uid = pods["r2"]["metadata"]["uid"]
    await cluster.patch(ONLINEMODELS, "r2", {"spec": {"replicas": 1}})
    await gone(cluster, "r2-follower-1")
    await gone(cluster, "r2-follower-2")
    om = await cluster.wait_for(lambda: cluster.onlinemodel("r2"),
                                lambda o: "replicas" not in o["status"] and condition(o, "FollowersInSync") is None,
                                what="no replicas status")
    assert condition(om, "Ready")["status"] == "True"
    await cluster.patch(ONLINEMODELS, "r2", {"spec": {"replicas": 2}})
    await pods_named(cluster, "r2-follower-1")
    await cluster.wait_for(lambda: cluster.onlinemodel("r2"), lambda o: o["status"]["replicas"]["ready"] == 2,
                           what="2 ready")
    assert await cluster.get(PODS, "r2-follower-2") is None
    assert (await cluster.get(PODS, "r2"))["metadata"]["uid"] == learner_uid  # scaling never restarts it


async def test_learner_deleted_is_recreated_followers_kept(cluster: Cluster, kubelet: FakeKubelet,
                                                           runtime: FakeRuntime, operator: Any) -> None:
    await cluster.create_onlinemodel("r3", spec(runtime.port, replicas=3))
    pods = await pods_named(cluster, "r3", "r3-follower-1", "r3-follower-2")
    await cluster.wait_for(lambda: cluster.onlinemodel("r3"), lambda o: o["status"]["replicas"]["ready"] == 3,
                           what="3 ready")
    await cluster.delete(PODS, "r3")
    new = await replaced_pod(cluster, "r3", pods["r3"])
    assert new["metadata"]["labels"][ROLE_LABEL] == LEARNER
    for name in ("r3-follower-1", "r3-follower-2"):
        assert (await cluster.get(PODS, name))["metadata"]["uid"] == pods[name]["metadata"]["uid"]
    await cluster.wait_for(lambda: cluster.onlinemodel("r3"), lambda o: o["status"]["replicas"]["ready"] == 3,
                           what="3 ready again")
    # A lost follower comes back; the learner and the other follower stay.
    learner_uid = new["metadata"]["uid"]
    await cluster.delete(PODS, "r3-follower-2")
    await replaced_pod(cluster, "r3-follower-2", pods["r3-follower-2"])
    assert (await cluster.get(PODS, "r3"))["metadata"]["uid"] == learner_uid
    assert (await cluster.get(PODS, "r3-follower-1"))["metadata"]["uid"] == pods["r3-follower-1"]["metadata"]["uid"]
