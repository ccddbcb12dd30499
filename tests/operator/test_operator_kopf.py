"""The real operator (kopf, in a thread) against kmock's emulator, or a real cluster (ONLINEMODEL_TEST_KUBECONFIG)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import subprocess
import sys
from typing import Any

import httpx
import pytest

from onlinemodel_operator.kube import CLAIMS, CONFIGMAPS, ONLINEMODELS, PODS, SECRETS, SERVICES
from onlinemodel_protocol import limits
from onlinemodel_protocol.rpc import EXIT_MODEL_CHANGED
from onlinemodel_runtime.devtools.launcher import free_port
from operator_cluster import Cluster, condition
from operator_fake_runtime import FakeRuntime
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


def secret_value(secret: dict[str, Any], key: str = "token") -> str:
    return base64.b64decode(secret["data"][key]).decode()


def arg(pod: dict[str, Any], flag: str) -> str:
    args = pod["spec"]["containers"][0]["args"]
    return args[args.index(flag) + 1]


async def event_reasons(cluster: Cluster, name: str) -> set[str]:
    """Reasons of `name`'s Events so far: kopf posts them from a queue, after the status patch that may have
    been waited for, so a test waits for them with `cluster.wait_for`."""
    return {e.get("reason") for e in cluster.api.live("v1/events", cluster.namespace)
            if e.get("involvedObject", {}).get("name") == name}


async def test_create_makes_pod_service_claim_token_and_full_status(cluster: Cluster, kubelet: FakeKubelet,
                                                                     runtime: FakeRuntime, operator: Any) -> None:
    await cluster.create_onlinemodel("m1", spec(runtime.port))
    om = await cluster.wait_condition("m1", "Ready", "True")
    for kind, name in ((PODS, "m1"), (SERVICES, "m1"), (SECRETS, "m1-api-token")):
        obj = await cluster.get(kind, name)
        assert obj is not None and owned_by(obj, om), (kind, obj)
    claim = await cluster.get(CLAIMS, "m1-checkpoints")
    assert claim is not None and not owned_by(claim, om)  # kept when the OnlineModel goes
    pod = await cluster.get(PODS, "m1")
    # Periodic checkpoints are on by default.
    assert arg(pod, "--checkpoint-every-steps") == str(limits.CHECKPOINT_EVERY_STEPS_DEFAULT)
    assert float(arg(pod, "--checkpoint-every-seconds")) == limits.CHECKPOINT_EVERY_SECONDS_DEFAULT
    status = om["status"]
    assert status["apiTokenSecret"] == {"name": "m1-api-token", "key": "token"}
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
    # Ready may still read True from before the failure when the new pod is seen: wait for the failure itself.
    om = await cluster.wait_for(lambda: cluster.onlinemodel("m3"), lambda om: "lastFailure" in om["status"],
                                what="status.lastFailure on m3")
    assert om["status"]["lastFailure"]["exitCode"] == 137
    assert om["status"]["lastFailure"]["reason"] == "OOMKilled"
    await cluster.wait_condition("m3", "Ready", "True")


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
        await cluster.wait_for(lambda: event_reasons(cluster, "m6"),
                               lambda r: {"PodCreated", "CheckpointBeforeStop", "SpecChanged"} <= r, what="events")


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
    await cluster.wait_for(lambda: event_reasons(cluster, "m7"), lambda r: "InvalidSpec" in r, what="InvalidSpec event")
    pod = await cluster.get(PODS, "m7")
    assert pod["metadata"]["uid"] == old["metadata"]["uid"] and not pod["metadata"].get("deletionTimestamp")
    assert runtime.checkpoint_calls == []
    # A Secret whose token is blank would leave the runtime without one: refused as well.
    await cluster.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "nope"},
                          "data": {"token": base64.b64encode(b" \n").decode()}})
    await cluster.wait_for(lambda: cluster.onlinemodel("m7"),
                           lambda o: "is empty" in condition(o, "Ready")["message"], what="empty token refused")
    assert (await cluster.get(PODS, "m7"))["metadata"]["uid"] == old["metadata"]["uid"]
    # Fixing the spec (a token in the Secret) lets the change through.
    await cluster.patch(SECRETS, "nope", {"data": {"token": "c2VjcmV0"}})
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
                          "data": {"token": base64.b64encode(b"s3cr3t\n").decode()}})  # as --from-file writes it
    runtime.token = "s3cr3t"  # /train/status and /checkpoint answer 401 without it
    await cluster.create_onlinemodel("m9", spec(runtime.port, training={"apiTokenSecretRef": {"name": "tok"}}))
    om = await cluster.wait_condition("m9", "Ready", "True")
    assert om["status"]["apiTokenSecret"] == {"name": "tok", "key": "token"}
    assert await cluster.get(SECRETS, "m9-api-token") is None  # the user's Secret: none generated
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


async def test_deleting_the_onlinemodel_keeps_the_claim_by_default(cluster: Cluster, kubelet: FakeKubelet,
                                                                   runtime: FakeRuntime, operator: Any) -> None:
    await cluster.create_onlinemodel("m10", spec(runtime.port))
    await cluster.wait_condition("m10", "Ready", "True")
    claim = await cluster.get(CLAIMS, "m10-checkpoints")
    assert not claim["metadata"].get("ownerReferences")  # the volume outlives the resource
    await cluster.delete(ONLINEMODELS, "m10")
    await cluster.wait_for(lambda: cluster.get(ONLINEMODELS, "m10"), lambda o: o is None, what="deletion")
    if cluster.emulated:  # a real cluster's garbage collector takes its time
        for kind, name in ((PODS, "m10"), (SECRETS, "m10-api-token")):
            await cluster.wait_for(lambda: cluster.get(kind, name), lambda o: o is None, what=f"{name} collected")
    assert (await cluster.get(CLAIMS, "m10-checkpoints"))["metadata"]["uid"] == claim["metadata"]["uid"]
    # An OnlineModel of the same name takes the kept claim (and resumes from its checkpoints).
    await cluster.create_onlinemodel("m10", spec(runtime.port))
    await cluster.wait_condition("m10", "Ready", "True")
    assert (await cluster.get(CLAIMS, "m10-checkpoints"))["metadata"]["uid"] == claim["metadata"]["uid"]


async def test_delete_with_model_is_an_explicit_choice(cluster: Cluster, kubelet: FakeKubelet,
                                                       runtime: FakeRuntime, operator: Any) -> None:
    if not cluster.emulated:
        pytest.skip("waits for the garbage collector")
    await cluster.create_onlinemodel("m15", spec(runtime.port))
    await cluster.wait_condition("m15", "Ready", "True")
    pod = await cluster.get(PODS, "m15")
    await cluster.patch(ONLINEMODELS, "m15", {"spec": {"checkpoint": {"volume": {"deleteWithModel": True}}}})
    om = await cluster.onlinemodel("m15")
    claim = await cluster.wait_for(lambda: cluster.get(CLAIMS, "m15-checkpoints"), lambda c: owned_by(c, om),
                                   what="the claim owned by its OnlineModel")
    assert (await cluster.get(PODS, "m15"))["metadata"]["uid"] == pod["metadata"]["uid"]  # no restart for it
    await cluster.delete(ONLINEMODELS, "m15")
    await cluster.wait_for(lambda: cluster.get(CLAIMS, "m15-checkpoints"), lambda c: c is None,
                           what=f"claim {claim['metadata']['name']} deleted with its OnlineModel")


async def test_generated_api_token_is_owned_mounted_reused_and_used(cluster: Cluster, kubelet: FakeKubelet,
                                                                    runtime: FakeRuntime, operator: Any,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    await cluster.create_onlinemodel("m14", spec(runtime.port))
    secret = await cluster.wait_for(lambda: cluster.get(SECRETS, "m14-api-token"), lambda s: s is not None,
                                    what="the token Secret")
    token = secret_value(secret)
    assert len(token) >= 40  # secrets.token_urlsafe(32)
    runtime.token = token  # from now on the fake runtime refuses requests without it
    om = await cluster.wait_condition("m14", "Ready", "True")
    assert owned_by(secret, om) and secret["type"] == "Opaque"
    assert om["status"]["apiTokenSecret"] == {"name": "m14-api-token", "key": "token"}
    pod = await cluster.get(PODS, "m14")
    assert {"name": "ONLINEMODEL_API_TOKEN", "valueFrom": {"secretKeyRef": {"name": "m14-api-token", "key": "token"}}} \
        in pod["spec"]["containers"][0]["env"]
    # The operator's client sends it: GET /train/status (polls) and POST /checkpoint (the annotation).
    async def status_calls() -> list[Any]:
        return runtime.status_calls

    await cluster.wait_for(status_calls, lambda calls: f"Bearer {token}" in calls, what="a status poll with the token")
    await cluster.patch(ONLINEMODELS, "m14", {"metadata": {"annotations": {
        "onlinemodel.dev/checkpoint-requested": "r1"}}})
    await cluster.wait_condition("m14", "Checkpointed", "True", "Checkpointed")
    assert runtime.checkpoint_calls[-1]["authorization"] == f"Bearer {token}"
    # A new pod (spec change) gets the same Secret: the token is drawn once.
    await cluster.patch(ONLINEMODELS, "m14", {"spec": {"serving": {"maxModelLen": 2048}}})
    await replaced_pod(cluster, "m14", pod)
    await cluster.wait_condition("m14", "Ready", "True")
    again = await cluster.get(SECRETS, "m14-api-token")
    assert again["metadata"]["uid"] == secret["metadata"]["uid"] and secret_value(again) == token
    await cluster.wait_for(lambda: event_reasons(cluster, "m14"), lambda r: "ApiTokenCreated" in r,
                           what="ApiTokenCreated event")
    # Never written anywhere else: not in the resource, its Events, or the operator's log.
    events = cluster.api.live("v1/events", cluster.namespace)
    assert token not in json.dumps(await cluster.onlinemodel("m14")) + json.dumps(events)
    assert caplog.records and token not in caplog.text


async def test_a_changed_model_is_held_until_the_user_decides(cluster: Cluster, kubelet: FakeKubelet,
                                                              runtime: FakeRuntime, operator: Any) -> None:
    await cluster.create_onlinemodel("m16", spec(runtime.port))
    await cluster.wait_condition("m16", "Ready", "True")
    await cluster.patch(ONLINEMODELS, "m16", {"spec": {"model": {"source": {"image": {"path": "/models/other"}}}}})
    old = await cluster.get(PODS, "m16")
    pod = await replaced_pod(cluster, "m16", old)
    await cluster.wait_condition("m16", "Ready", "True")
    refusal = "checkpoint base model /models/smollm2 differs from --model /models/other"
    await kubelet.mark_exited("m16", EXIT_MODEL_CHANGED, refusal)
    om = await cluster.wait_condition("m16", "Ready", "False", "ModelChanged")
    assert refusal in condition(om, "Ready")["message"] and "startOver" in condition(om, "Ready")["message"]
    assert condition(om, "Degraded")["reason"] == "ModelChanged"
    assert om["status"]["modelChanged"]["specHash"] == pod["metadata"]["annotations"]["onlinemodel.dev/spec-hash"]
    assert om["status"]["lastFailure"]["exitCode"] == EXIT_MODEL_CHANGED
    # The pod is deleted and none is started again (no crash loop) while the spec stays.
    await cluster.wait_for(lambda: cluster.get(PODS, "m16"), lambda p: p is None, what="the refused pod deleted")
    await asyncio.sleep(1.5)  # five poll intervals
    assert await cluster.get(PODS, "m16") is None
    await cluster.wait_for(lambda: event_reasons(cluster, "m16"), lambda r: "ModelChanged" in r,
                           what="ModelChanged event")
    # The user decides: start over from the new model (the runtime moves the old checkpoints aside).
    await cluster.patch(ONLINEMODELS, "m16", {"spec": {"checkpoint": {"startOver": True}}})
    new = await cluster.wait_for(lambda: cluster.get(PODS, "m16"), lambda p: p is not None, what="a new pod")
    assert "--start-over" in new["spec"]["containers"][0]["args"]
    om = await cluster.wait_condition("m16", "Ready", "True")
    assert "modelChanged" not in om["status"]


async def test_lifecycle_on_any_cluster(cluster: Cluster, operator: Any) -> None:
    """No fake kubelet: also meaningful on a real cluster (pods never get ready there: the image is fake)."""
    await cluster.create_onlinemodel("any", spec())
    om = await cluster.wait_for(lambda: cluster.onlinemodel("any"),
                                lambda o: len(o["status"]["conditions"]) == 5, what="five conditions")
    for kind, name in ((PODS, "any"), (SERVICES, "any"), (SECRETS, "any-api-token"), (CLAIMS, "any-checkpoints")):
        obj = await cluster.wait_for(lambda: cluster.get(kind, name), lambda o: o is not None, what=name)
        assert owned_by(obj, om) is (kind is not CLAIMS)
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
    await cluster.wait_for(lambda: event_reasons(cluster, "m13"), lambda r: "CheckpointBeforeStopFailed" in r,
                           what="a warning event")


async def test_training_events_are_posted_once_each(cluster: Cluster, kubelet: FakeKubelet, runtime: FakeRuntime,
                                                    operator: Any) -> None:
    if not cluster.emulated:
        pytest.skip("reads the Events kopf posts to the emulator")
    await cluster.create_onlinemodel("m20", spec(runtime.port))
    await cluster.wait_condition("m20", "Ready", "True")
    job = {"id": "job-1", "examples": 1, "epochs": 2, "learning_rate": 1e-5, "steps_total": 2,
           "created_at": "2026-12-01T10:00:00Z"}
    runtime.train_status = {"state": "training", "jobs": [{**job, "state": "running", "steps": 1}],
                            "checkpoint": {"state": "idle"}}
    await cluster.wait_for(lambda: event_reasons(cluster, "m20"), lambda r: "TrainingStarted" in r, what="started")
    runtime.train_status = {"state": "idle", "steps": 2, "trainer_restarts": 1,
                            "jobs": [{**job, "state": "succeeded", "steps": 2}],
                            "checkpoint": {"state": "failed", "last_error": "disk full",
                                           "last": {"path": "/ck/step-00000002", "step": 2}}}
    wanted = {"TrainingSucceeded", "TrainerRestarted", "CheckpointSaved", "CheckpointFailed"}
    await cluster.wait_for(lambda: event_reasons(cluster, "m20"), lambda r: wanted <= r, what="events")
    await asyncio.sleep(1.5)  # several more polls of the same answer
    events = [e for e in cluster.api.live("v1/events", cluster.namespace)
              if e.get("involvedObject", {}).get("name") == "m20"]
    # Each posted once however often the same answer was polled (a failed checkpoint is the reason of two
    # conditions, Checkpointed and Degraded: one Event each).
    once = {"TrainingStarted", "TrainingSucceeded", "TrainerRestarted", "CheckpointSaved"}
    counts = {reason: sum(e.get("reason") == reason for e in events) for reason in once | {"CheckpointFailed"}}
    assert counts == {**dict.fromkeys(once, 1), "CheckpointFailed": 2}, counts


async def test_guard_configmap_is_checked_mounted_and_rollbacks_become_events(
        cluster: Cluster, kubelet: FakeKubelet, runtime: FakeRuntime, operator: Any) -> None:
    await cluster.create_onlinemodel("m21", spec(runtime.port, training={"guard": {"configMapRef": {"name": "g"}}}))
    om = await cluster.wait_condition("m21", "Ready", "False", "InvalidSpec")
    assert "ConfigMap" in condition(om, "Ready")["message"] and await cluster.get(PODS, "m21") is None
    # An invalid guard file: refused with the runtime's own words, before any pod starts.
    await cluster.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "g"},
                          "data": {"guard.yaml": "probes: []"}})
    om = await cluster.wait_for(lambda: cluster.onlinemodel("m21"),
                                lambda o: "at least one probe" in condition(o, "Ready")["message"], what="bad guard")
    assert await cluster.get(PODS, "m21") is None
    await cluster.patch(CONFIGMAPS, "g", {"data": {"guard.yaml": json.dumps({"probes": [
        {"messages": [{"role": "user", "content": "What is the capital of France?"}], "expect": "Paris"}]})}})
    await cluster.wait_condition("m21", "Ready", "True")
    pod = await cluster.get(PODS, "m21")
    assert arg(pod, "--guard") == "/etc/onlinemodel/guard/guard.yaml"
    assert {"name": "guard", "configMap": {"name": "g", "items": [{"key": "guard.yaml", "path": "guard.yaml"}]}} \
        in pod["spec"]["volumes"]

    # A rollback in the runtime: the status says so, and one Event tells it, however often it is polled.
    runtime.train_status["guard"] = {"enabled": True, "rollbacks": 1, "last_rollback": {
        "time": "2026-12-01T10:00:00Z", "source": "guard", "weight_version": 21, "job_id": "job-abc",
        "regressed": ["probe-0"], "reason": "the guard found regressions after 20 steps: probe-0"}}
    om = await cluster.wait_for(lambda: cluster.onlinemodel("m21"),
                                lambda o: ((o.get("status", {}).get("training") or {}).get("guard") or {})
                                .get("rollbacks") == 1, what="a rollback in the status")
    assert om["status"]["training"]["guard"]["lastRollbackJob"] == "job-abc"
    await asyncio.sleep(2)  # several more polls
    rolled = [e for e in cluster.api.live("v1/events", cluster.namespace)
              if e.get("reason") == "RolledBack" and e.get("involvedObject", {}).get("name") == "m21"]
    assert len(rolled) == 1 and "job-abc" in rolled[0]["message"] and rolled[0]["type"] == "Warning"

    # An edit of the guard file replaces the pod (it reads the file at start), after a checkpoint, like a spec change.
    old = await cluster.get(PODS, "m21")
    await cluster.patch(CONFIGMAPS, "g", {"data": {"guard.yaml": "heldout: {text: Some ordinary text.}"}})
    await replaced_pod(cluster, "m21", old)
    assert runtime.checkpoint_calls, "no checkpoint before the pod was replaced"


async def test_anchors_configmap_is_checked_mounted_and_an_edit_replaces_the_pod(
        cluster: Cluster, kubelet: FakeKubelet, runtime: FakeRuntime, operator: Any) -> None:
    await cluster.create_onlinemodel("m22", spec(runtime.port, training={"anchors": {"configMapRef": {"name": "a"}}}))
    om = await cluster.wait_condition("m22", "Ready", "False", "InvalidSpec")
    assert "spec.training.anchors.configMapRef: ConfigMap" in condition(om, "Ready")["message"]
    assert await cluster.get(PODS, "m22") is None
    # An invalid anchor file: refused with the runtime's own words, naming the conversation, before any pod starts.
    await cluster.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"},
                          "data": {"anchors.yaml": "conversations: [{messages: [{role: user, content: hi}]}]"}})
    om = await cluster.wait_for(lambda: cluster.onlinemodel("m22"),
                                lambda o: "conversations.0.messages" in condition(o, "Ready")["message"],
                                what="bad anchor file")
    assert await cluster.get(PODS, "m22") is None
    qa = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "The Acme assistant."}]
    await cluster.patch(CONFIGMAPS, "a", {"data": {"anchors.yaml": json.dumps({"conversations": [{"messages": qa}]})}})
    await cluster.wait_condition("m22", "Ready", "True")
    pod = await cluster.get(PODS, "m22")
    assert arg(pod, "--anchor-file") == "/etc/onlinemodel/anchors/anchors.yaml"
    assert {"name": "anchors", "configMap": {"name": "a", "items": [{"key": "anchors.yaml", "path": "anchors.yaml"}]}} \
        in pod["spec"]["volumes"]
    # An edit of the anchor file replaces the pod (it reads the file at start), after a checkpoint.
    await cluster.patch(CONFIGMAPS, "a", {"data": {"anchors.yaml": json.dumps(
        {"builtin": False, "conversations": [{"messages": qa}]})}})
    await replaced_pod(cluster, "m22", pod)
    assert runtime.checkpoint_calls, "no checkpoint before the pod was replaced"
