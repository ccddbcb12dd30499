"""The real operator (kopf, in a thread) against kmock's emulator, or a real cluster (ONLINEMODEL_TEST_KUBECONFIG)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any

import httpx
import pytest

from onlinemodel_operator.kube import CLAIMS, ONLINEMODELS, PODS, SERVICES
from operator_cluster import Cluster, condition
from operator_fake_runtime import FakeRuntime, free_port
from operator_kubelet import FakeKubelet

pytestmark = pytest.mark.e2e


def spec(port: int = 8000, **extra: Any) -> dict[str, Any]:
    return {"model": {"source": {"image": {"path": "/models/smollm2"}}}, "image": "onlinemodel/runtime:test",
            "resources": {"gpus": 0}, "serving": {"port": port}, **extra}


async def replaced_pod(cluster: Cluster, name: str, old: dict[str, Any]) -> dict[str, Any]:
    """The pod that replaced `old` (same name, another uid), once there is one."""
    return await cluster.wait_for(lambda: cluster.get(PODS, name),
                                  lambda p: p is not None and p["metadata"]["uid"] != old["metadata"]["uid"],
                                  what=f"a new pod {name}")


def owned_by(obj: dict[str, Any], om: dict[str, Any]) -> bool:
    return any(ref.get("uid") == om["metadata"]["uid"] and ref.get("controller")
               for ref in obj["metadata"].get("ownerReferences") or [])


async def test_create_makes_pod_service_claim_and_full_status(cluster: Cluster, kubelet: FakeKubelet,
                                                               runtime: FakeRuntime, operator: Any) -> None:
    await cluster.create_onlinemodel("m1", spec(runtime.port))
    om = await cluster.wait_condition("m1", "Ready", "True")
    for kind, name in ((PODS, "m1"), (SERVICES, "m1"), (CLAIMS, "m1-checkpoints")):
        obj = await cluster.get(kind, name)
        assert obj is not None and owned_by(obj, om), (kind, obj)
    status = om["status"]
    assert [c["type"] for c in status["conditions"]] == ["Ready", "Serving", "Training", "Checkpointed", "Degraded"]
    assert all(c["observedGeneration"] == om["metadata"]["generation"] for c in status["conditions"])
    assert status["observedGeneration"] == om["metadata"]["generation"]
    assert status["podName"] == "m1"
    assert status["endpoint"] == f"http://m1.{cluster.namespace}.svc:{runtime.port}"
    assert condition(om, "Checkpointed")["reason"] == "NoCheckpoint"


async def test_deleted_pod_is_recreated(cluster: Cluster, kubelet: FakeKubelet, runtime: FakeRuntime,
                                        operator: Any) -> None:
    await cluster.create_onlinemodel("m2", spec(runtime.port))
    await cluster.wait_condition("m2", "Ready", "True")
    old = await cluster.get(PODS, "m2")
    await cluster.delete(PODS, "m2")
    new = await replaced_pod(cluster, "m2", old)
    assert new["metadata"]["annotations"] == old["metadata"]["annotations"]
    await cluster.wait_condition("m2", "Ready", "True")


async def test_failed_pod_is_recreated_and_failure_reported(cluster: Cluster, kubelet: FakeKubelet,
                                                            runtime: FakeRuntime, operator: Any) -> None:
    await cluster.create_onlinemodel("m3", spec(runtime.port))
    await cluster.wait_condition("m3", "Ready", "True")
    old = await cluster.get(PODS, "m3")
    await kubelet.mark_failed("m3", exit_code=137, reason="OOMKilled")
    await replaced_pod(cluster, "m3", old)
    om = await cluster.wait_condition("m3", "Ready", "True")
    assert om["status"]["lastFailure"]["exitCode"] == 137
    assert om["status"]["lastFailure"]["reason"] == "OOMKilled"


async def test_image_pull_backoff_is_reported(cluster: Cluster, kubelet: FakeKubelet, runtime: FakeRuntime,
                                              operator: Any) -> None:
    kubelet.auto_start = False
    await cluster.create_onlinemodel("m4", spec(runtime.port))
    await cluster.wait_for(lambda: cluster.get(PODS, "m4"), lambda p: p is not None, what="the pod")
    await kubelet.mark_waiting("m4", "ImagePullBackOff", "Back-off pulling image")
    om = await cluster.wait_condition("m4", "Ready", "False", "ImagePullBackOff")
    assert condition(om, "Degraded")["status"] == "True"
    assert om["status"]["phase"] == "Failed"


async def test_suspend_deletes_pod_keeps_claim_and_resume_restarts(cluster: Cluster, kubelet: FakeKubelet,
                                                                   runtime: FakeRuntime, operator: Any) -> None:
    await cluster.create_onlinemodel("m5", spec(runtime.port))
    await cluster.wait_condition("m5", "Ready", "True")
    await cluster.patch(ONLINEMODELS, "m5", {"spec": {"suspend": True}})
    om = await cluster.wait_condition("m5", "Ready", "False", "Suspended")
    await cluster.wait_for(lambda: cluster.get(PODS, "m5"), lambda p: p is None, what="no pod")
    assert await cluster.get(CLAIMS, "m5-checkpoints") is not None
    assert len(runtime.checkpoint_calls) == 1  # checkpoint before the pod went away
    assert condition(om, "Degraded")["reason"] == "Suspended"
    await cluster.patch(ONLINEMODELS, "m5", {"spec": {"suspend": False}})
    await cluster.wait_condition("m5", "Ready", "True")


async def test_spec_change_checkpoints_then_recreates_pod(cluster: Cluster, kubelet: FakeKubelet,
                                                          runtime: FakeRuntime, operator: Any) -> None:
    await cluster.create_onlinemodel("m6", spec(runtime.port))
    await cluster.wait_condition("m6", "Ready", "True")
    old = await cluster.get(PODS, "m6")
    await cluster.patch(ONLINEMODELS, "m6", {"spec": {"training": {"learningRate": 0.0001}}})
    new = await replaced_pod(cluster, "m6", old)
    assert "--learning-rate" in new["spec"]["containers"][0]["args"]
    assert len(runtime.checkpoint_calls) == 1
    om = await cluster.wait_condition("m6", "Ready", "True")
    assert om["metadata"]["generation"] == 2 and om["status"]["observedGeneration"] == 2
    if cluster.emulated:  # Events for the transitions, posted by kopf
        async def reasons() -> set[str]:
            return {e.get("reason") for e in cluster.api.live("v1/events", cluster.namespace)
                    if e.get("involvedObject", {}).get("name") == "m6"}
        await cluster.wait_for(reasons, lambda r: {"PodCreated", "CheckpointBeforeStop", "SpecChanged"} <= r,
                               what="events")


async def test_bad_spec_is_refused_and_running_pod_untouched(cluster: Cluster, kubelet: FakeKubelet,
                                                             runtime: FakeRuntime, operator: Any) -> None:
    await cluster.create_onlinemodel("m7", spec(runtime.port))
    await cluster.wait_condition("m7", "Ready", "True")
    old = await cluster.get(PODS, "m7")
    # A Secret that does not exist: no schema or CEL rule can know; the operator refuses it.
    await cluster.patch(ONLINEMODELS, "m7", {"spec": {"training": {"apiTokenSecretRef": {"name": "nope"}}}})
    om = await cluster.wait_condition("m7", "Ready", "False", "InvalidSpec")
    assert "Secret" in condition(om, "Ready")["message"] and "nope" in condition(om, "Ready")["message"]
    assert condition(om, "Degraded")["reason"] == "InvalidSpec"
    assert condition(om, "Serving")["status"] == "True"  # the old pod still serves
    pod = await cluster.get(PODS, "m7")
    assert pod["metadata"]["uid"] == old["metadata"]["uid"] and not pod["metadata"].get("deletionTimestamp")
    assert runtime.checkpoint_calls == []
    # Fixing the spec (creating the Secret) lets the change through.
    await cluster.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "nope"},
                          "data": {"token": "c2VjcmV0"}})
    await replaced_pod(cluster, "m7", old)
    await cluster.wait_condition("m7", "Ready", "True")


async def test_schema_invalid_spec_is_invalid_spec_when_no_cel(cluster: Cluster, kubelet: FakeKubelet,
                                                               runtime: FakeRuntime, operator: Any) -> None:
    if not cluster.emulated:
        pytest.skip("a real API server refuses this spec itself (CEL)")
    bad = spec(runtime.port)
    bad["model"]["source"]["huggingFace"] = {"id": "Qwen/Qwen3-0.6B"}  # two sources
    await cluster.create_onlinemodel("m8", bad)
    om = await cluster.wait_condition("m8", "Ready", "False", "InvalidSpec")
    assert "exactly one of huggingFace, volume or image" in condition(om, "Ready")["message"]
    assert await cluster.get(PODS, "m8") is None


async def test_checkpoint_annotation_calls_runtime_and_reports(cluster: Cluster, kubelet: FakeKubelet,
                                                               runtime: FakeRuntime, operator: Any) -> None:
    await cluster.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "tok"},
                          "data": {"token": "czNjcjN0"}})  # "s3cr3t"
    await cluster.create_onlinemodel("m9", spec(runtime.port, training={"apiTokenSecretRef": {"name": "tok"}}))
    await cluster.wait_condition("m9", "Ready", "True")
    runtime.train_status.update(steps=7, state="training", last_loss=0.25)
    await cluster.patch(ONLINEMODELS, "m9", {"metadata": {"annotations": {
        "onlinemodel.dev/checkpoint-requested": "now-1"}}})
    om = await cluster.wait_for(lambda: cluster.onlinemodel("m9"),
                                lambda o: o["status"]["checkpoint"]["requested"] == "now-1", what="checkpoint")
    assert runtime.checkpoint_calls[0]["authorization"] == "Bearer s3cr3t"
    om = await cluster.wait_condition("m9", "Checkpointed", "True", "Checkpointed")
    assert om["status"]["checkpoint"]["step"] == 7
    assert om["status"]["checkpoint"]["requestResult"] == "Succeeded"
    assert om["status"]["training"]["steps"] == 7 and om["status"]["training"]["lastLoss"] == 0.25
    # A failing request is reported, and the previous checkpoint stays.
    runtime.checkpoint_error = (500, "disk full")
    await cluster.patch(ONLINEMODELS, "m9", {"metadata": {"annotations": {
        "onlinemodel.dev/checkpoint-requested": "now-2"}}})
    om = await cluster.wait_condition("m9", "Checkpointed", "False", "CheckpointFailed")
    assert "disk full" in condition(om, "Checkpointed")["message"]
    assert om["status"]["checkpoint"]["step"] == 7
    assert condition(om, "Degraded")["reason"] == "CheckpointFailed"


async def test_deleting_the_onlinemodel_collects_children(cluster: Cluster, kubelet: FakeKubelet,
                                                          runtime: FakeRuntime, operator: Any) -> None:
    await cluster.create_onlinemodel("m10", spec(runtime.port, checkpoint={"volume": {"retain": True}}))
    await cluster.wait_condition("m10", "Ready", "True")
    claim = await cluster.get(CLAIMS, "m10-checkpoints")
    assert not claim["metadata"].get("ownerReferences")  # retain: the volume outlives the resource
    await cluster.delete(ONLINEMODELS, "m10")
    await cluster.wait_for(lambda: cluster.get(ONLINEMODELS, "m10"), lambda o: o is None, what="deletion")
    if cluster.emulated:  # a real cluster's garbage collector takes its time
        await cluster.wait_for(lambda: cluster.get(PODS, "m10"), lambda p: p is None, what="pod collected")
    assert await cluster.get(CLAIMS, "m10-checkpoints") is not None


async def test_lifecycle_on_any_cluster(cluster: Cluster, operator: Any) -> None:
    """No fake kubelet: also meaningful on a real cluster (pods never get ready there: the image is fake)."""
    await cluster.create_onlinemodel("any", spec())
    om = await cluster.wait_for(lambda: cluster.onlinemodel("any"),
                                lambda o: len(o["status"]["conditions"]) == 5, what="five conditions")
    for kind, name in ((PODS, "any"), (SERVICES, "any"), (CLAIMS, "any-checkpoints")):
        obj = await cluster.wait_for(lambda: cluster.get(kind, name), lambda o: o is not None, what=name)
        assert owned_by(obj, om)
    assert condition(om, "Ready")["status"] == "False"
    old = await cluster.get(PODS, "any")
    # A bad update leaves the pod alone.
    await cluster.patch(ONLINEMODELS, "any", {"spec": {"training": {"apiTokenSecretRef": {"name": "missing"}}}})
    await cluster.wait_condition("any", "Degraded", "True", "InvalidSpec")
    assert (await cluster.get(PODS, "any"))["metadata"]["uid"] == old["metadata"]["uid"]
    # Suspend: the pod goes, the volume stays.
    await cluster.patch(ONLINEMODELS, "any", {"spec": {"suspend": True, "training": {"apiTokenSecretRef": None}}})
    await cluster.wait_condition("any", "Ready", "False", "Suspended", timeout=60)
    await cluster.wait_for(lambda: cluster.get(PODS, "any"), lambda p: p is None, timeout=60, what="no pod")
    assert await cluster.get(CLAIMS, "any-checkpoints") is not None


async def test_new_pod_waits_for_the_old_one_to_terminate(cluster: Cluster, kubelet: FakeKubelet,
                                                          runtime: FakeRuntime, operator: Any) -> None:
    cluster.api.graceful_pod_deletion = True
    kubelet.termination_delay = 1.0
    await cluster.create_onlinemodel("m11", spec(runtime.port))
    await cluster.wait_condition("m11", "Ready", "True")
    old = await cluster.get(PODS, "m11")
    await cluster.patch(ONLINEMODELS, "m11", {"spec": {"serving": {"maxModelLen": 512}}})
    terminating = await cluster.wait_for(lambda: cluster.get(PODS, "m11"),
                                         lambda p: p["metadata"].get("deletionTimestamp"), what="terminating pod")
    assert terminating["metadata"]["uid"] == old["metadata"]["uid"]
    await cluster.wait_condition("m11", "Ready", "False", "PodTerminating")
    new = await replaced_pod(cluster, "m11", old)
    assert "--max-model-len" in new["spec"]["containers"][0]["args"]
    await cluster.wait_condition("m11", "Ready", "True")


async def test_foreign_pod_with_the_same_name_is_left_alone(cluster: Cluster, kubelet: FakeKubelet,
                                                            operator: Any) -> None:
    foreign = await cluster.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "m12"},
                                    "spec": {"containers": [{"name": "app", "image": "busybox"}]}})
    await cluster.create_onlinemodel("m12", spec())
    om = await cluster.wait_condition("m12", "Ready", "False", "InvalidSpec")
    assert "was not created for this OnlineModel" in condition(om, "Ready")["message"]
    pod = await cluster.get(PODS, "m12")
    assert pod["metadata"]["uid"] == foreign["metadata"]["uid"] and not pod["metadata"].get("deletionTimestamp")


async def test_cli_entry_point_runs_the_operator_with_liveness(cluster: Cluster, kubelet: FakeKubelet,
                                                               runtime: FakeRuntime) -> None:
    """`onlinemodel-operator` as a process (what the chart's Deployment runs), liveness endpoint included."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "onlinemodel_operator.main", "-n", cluster.namespace,
                             "--liveness", f"http://127.0.0.1:{port}/healthz", "--poll-interval", "0.3"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async def live() -> int:
            try:
                async with httpx.AsyncClient(trust_env=False) as client:
                    return (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code
            except httpx.HTTPError:
                return 0
        await cluster.wait_for(live, lambda code: code == 200, timeout=30, what="liveness endpoint")
        await cluster.create_onlinemodel("cli", spec(runtime.port))
        await cluster.wait_condition("cli", "Ready", "True", timeout=30)
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 30)


async def test_status_says_updating_during_a_slow_checkpoint_and_a_failed_one_does_not_block(
        cluster: Cluster, kubelet: FakeKubelet, runtime: FakeRuntime, operator: Any) -> None:
    await cluster.create_onlinemodel("m13", spec(runtime.port))
    await cluster.wait_condition("m13", "Ready", "True")
    old = await cluster.get(PODS, "m13")
    runtime.checkpoint_delay = 1.5
    runtime.checkpoint_error = (500, "disk full")
    await cluster.patch(ONLINEMODELS, "m13", {"spec": {"serving": {"maxModelLen": 1024}}})
    await cluster.wait_condition("m13", "Ready", "False", "Updating")  # while the checkpoint runs
    assert (await cluster.get(PODS, "m13"))["metadata"]["uid"] == old["metadata"]["uid"]
    await replaced_pod(cluster, "m13", old)
    await cluster.wait_condition("m13", "Ready", "True")

    async def reasons() -> set[str]:
        return {e.get("reason") for e in cluster.api.live("v1/events", cluster.namespace)
                if e.get("involvedObject", {}).get("name") == "m13"}
    await cluster.wait_for(reasons, lambda r: "CheckpointBeforeStopFailed" in r, what="a warning event")
