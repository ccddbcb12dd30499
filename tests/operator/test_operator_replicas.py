"""Unit tests of replicas.py: follower pods rendered, `decide_followers` as a table, status.replicas and
FollowersInSync."""

from __future__ import annotations

import datetime as dt
from typing import Any, Optional

import pytest

from onlinemodel_operator import FOLLOWER, LEARNER, NAME_LABEL, ROLE_LABEL, SPEC_HASH_ANNOTATION
from onlinemodel_operator.models_spec import parse_spec
from onlinemodel_operator.render import CHECKPOINT_DIR, Owner, render_all, render_pod, spec_hash
from onlinemodel_operator.replicas import (
    CreateFollower,
    DeleteFollower,
    decide_followers,
    follower_index,
    render_follower,
    replicas_status,
)
from onlinemodel_operator.status import compute_status
from onlinemodel_protocol import limits
from onlinemodel_protocol.api import TrainStatus
from onlinemodel_protocol.replication import READY_PATH
from onlinemodel_protocol.replication import FollowerState, ReplicationStatus

OWNER = Owner(name="chat", namespace="ml", uid="uid-1")
HASH = "h-current"
NOW = dt.datetime(2026, 12, 1, 18, 0, 0, tzinfo=dt.timezone.utc)


def base(**extra: Any) -> dict[str, Any]:
    return {"model": {"source": {"huggingFace": {"id": "Qwen/Qwen3-0.6B"}}}, "image": "ghcr.io/x/runtime:1",
            "serving": {"maxModelLen": 4096, "extraArgs": ["--enforce-eager"]}, **extra}


def args(pod: dict[str, Any]) -> list[str]:
    return pod["spec"]["containers"][0]["args"]


# --- render -----------------------------------------------------------------------------------------------

def test_follower_pod_follows_the_train_service_and_has_no_checkpoint_volume() -> None:
    spec = parse_spec(base(replicas=3))
    learner, follower = render_pod(OWNER, spec), render_follower(OWNER, spec, 2)
    assert follower["metadata"]["name"] == "chat-follower-2"
    assert follower["metadata"]["labels"][ROLE_LABEL] == FOLLOWER and learner["metadata"]["labels"][ROLE_LABEL] == LEARNER
    assert follower["metadata"]["labels"][NAME_LABEL] == "chat"  # the model's Service selects it too
    assert follower["metadata"]["annotations"][SPEC_HASH_ANNOTATION] == spec_hash(spec)
    assert args(follower) == ["--model", "Qwen/Qwen3-0.6B", "--served-model-name", "chat", "--host", "0.0.0.0",
                              "--port", "8000", "--max-model-len", "4096",
                              "--follow", "http://chat-train.ml.svc:8000", "--follower-name", "chat-follower-2",
                              "--", "--enforce-eager"]
    container = follower["spec"]["containers"][0]
    assert all(m["mountPath"] != CHECKPOINT_DIR for m in container["volumeMounts"])
    assert all(v["name"] != "checkpoints" for v in follower["spec"]["volumes"])
    assert "lifecycle" not in container and "lifecycle" in learner["spec"]["containers"][0]
    # Everything else is the learner's: image, env (the same token), probes, security, placement.
    for key in ("image", "env", "resources", "startupProbe", "livenessProbe", "securityContext", "ports"):
        assert container[key] == learner["spec"]["containers"][0][key], key
    # Ready once it serves the learner's weights, not the base model's.
    assert container["readinessProbe"]["httpGet"]["path"] == READY_PATH
    assert learner["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/health"
    assert follower["spec"]["securityContext"] == learner["spec"]["securityContext"]


def test_followers_read_no_config_file_they_do_not_train() -> None:
    spec = parse_spec(base(replicas=2, training={"guard": {"configMapRef": {"name": "g"}},
                                                 "anchors": {"configMapRef": {"name": "a"}}}))
    learner, follower = render_pod(OWNER, spec, {"guard": "x", "anchors": "y"}), render_follower(OWNER, spec, 1)
    assert {"--guard", "--anchor-file"} <= set(args(learner))
    assert not {"--guard", "--anchor-file"} & set(args(follower))
    assert {v["name"] for v in learner["spec"]["volumes"]} - {v["name"] for v in follower["spec"]["volumes"]} == {
        "checkpoints", "guard", "anchors"}
    assert all(not m["mountPath"].startswith("/etc/onlinemodel/")
               for m in follower["spec"]["containers"][0]["volumeMounts"])
    assert follower["metadata"]["annotations"][SPEC_HASH_ANNOTATION] == spec_hash(spec)  # the files' texts left out


def test_followers_of_a_model_that_does_not_train_are_plain_replicas() -> None:
    follower = render_follower(OWNER, parse_spec(base(replicas=2, training={"enabled": False})), 1)
    assert "--no-training" in args(follower) and "--follow" not in args(follower)
    assert follower["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/health"


def test_services_all_replicas_and_learner_only() -> None:
    desired = render_all(OWNER, parse_spec(base(replicas=3)))
    assert desired.service["metadata"]["name"] == "chat"
    assert desired.service["spec"]["selector"] == {NAME_LABEL: "chat"}
    assert desired.train_service["metadata"]["name"] == "chat-train"
    assert desired.train_service["spec"]["selector"] == {NAME_LABEL: "chat", ROLE_LABEL: LEARNER}
    assert desired.train_service["spec"]["ports"] == desired.service["spec"]["ports"]


def test_scaling_and_the_lag_bound_do_not_change_the_spec_hash() -> None:
    one = spec_hash(parse_spec(base()))
    assert spec_hash(parse_spec(base(replicas=5, replication={"maxLagSeconds": 10}))) == one
    assert spec_hash(parse_spec(base(replication={"syncIntervalSeconds": 5}))) != one  # the learner's argument


@pytest.mark.parametrize("bad", [{"replicas": 0}, {"replicas": limits.REPLICAS_MAX + 1},
                                 {"replication": {"syncIntervalSeconds": 0}}, {"replication": {"maxLagSeconds": 0}}])
def test_out_of_range_replication_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        parse_spec(base(**bad))


def test_follower_index_only_of_our_followers() -> None:
    spec = parse_spec(base(replicas=3))
    assert follower_index(OWNER, render_follower(OWNER, spec, 7)) == 7
    assert follower_index(OWNER, render_pod(OWNER, spec)) is None
    other = render_follower(Owner(name="chat-x", namespace="ml", uid="u"), spec, 1)
    assert follower_index(OWNER, other) is None


# --- decide_followers -------------------------------------------------------------------------------------

def pod(*, spec_hash: str = HASH, ready: bool = True, phase: str = "Running", terminating: bool = False) -> dict:
    meta: dict[str, Any] = {"name": "f", "labels": {NAME_LABEL: "chat"}, "annotations": {SPEC_HASH_ANNOTATION: spec_hash}}
    if terminating:
        meta["deletionTimestamp"] = "2026-12-01T18:00:00Z"
    return {"metadata": meta, "status": {"phase": phase, "podIP": "10.0.0.9", "containerStatuses": [
        {"name": "runtime", "ready": ready, "state": {"running": {"startedAt": "2026-12-01T17:00:00Z"}}}]}}


UP, LOADING, OLD = pod(), pod(ready=False), pod(spec_hash="h-old")


@pytest.mark.parametrize("followers,replicas,suspend,expected", [
    ({}, 1, False, []),  # one replica: the learner alone
    ({}, 3, False, [CreateFollower(1), CreateFollower(2)]),  # scaled out from nothing
    ({1: UP, 2: UP}, 3, False, []),  # steady
    ({1: UP, 2: UP}, 4, False, [CreateFollower(3)]),  # scale up
    ({1: UP, 2: UP, 3: UP}, 2, False, [DeleteFollower(2, "ScaledDown"), DeleteFollower(3, "ScaledDown")]),
    ({1: UP, 2: UP}, 1, False, [DeleteFollower(1, "ScaledDown"), DeleteFollower(2, "ScaledDown")]),
    ({1: UP, 2: UP}, 3, True, [DeleteFollower(1, "Suspended"), DeleteFollower(2, "Suspended")]),
    ({1: UP}, 3, False, [CreateFollower(2)]),  # follower lost: recreated, the other kept
    ({1: UP, 2: pod(phase="Failed")}, 3, False, [DeleteFollower(2, "PodFailed")]),
    ({1: UP, 2: pod(terminating=True)}, 3, False, []),  # wait until it is gone, then create it again
    ({1: OLD, 2: OLD}, 3, False, [DeleteFollower(1, "SpecChanged")]),  # rolling: one at a time
    ({1: LOADING, 2: OLD}, 3, False, []),  # ... and only while the others serve
    ({2: OLD}, 3, False, [CreateFollower(1)]),  # missing ones first
    ({1: UP, 2: OLD, 3: OLD}, 3, False, [DeleteFollower(3, "ScaledDown")]),
])
def test_decide_followers(followers: dict, replicas: int, suspend: bool, expected: list) -> None:
    assert decide_followers(followers, replicas=replicas, desired_hash=HASH, suspend=suspend) == expected


# --- status -------------------------------------------------------------------------------------------------

def learner_status(*followers: FollowerState, version: int = 9) -> TrainStatus:
    return TrainStatus(state="idle", weight_version=version,
                       replication=ReplicationStatus(role="learner", followers=list(followers)))


def seen(name: str, version: int, lag_s: float) -> FollowerState:
    return FollowerState(name=name, weight_version=version, lag_versions=9 - version, lag_seconds=lag_s,
                         last_seen="2026-12-01T18:00:00Z")


@pytest.mark.parametrize("followers,runtime,expected", [
    ({}, learner_status(), ("True", "NoFollowers")),
    ({1: UP, 2: UP}, learner_status(seen("chat-follower-1", 9, 0), seen("chat-follower-2", 8, 20)), ("True", "InSync")),
    ({1: UP, 2: UP}, learner_status(seen("chat-follower-1", 9, 0), seen("chat-follower-2", 3, 900)),
     ("False", "FollowerBehind")),
    ({1: UP, 2: UP}, learner_status(seen("chat-follower-1", 9, 0)), ("Unknown", "NotReported")),
    ({1: UP}, None, ("Unknown", "LearnerUnavailable")),  # learner lost: followers keep serving
    ({1: LOADING, 2: pod(phase="Failed")}, learner_status(), ("True", "NoFollowers")),
])
def test_followers_in_sync(followers: dict, runtime: Optional[TrainStatus], expected: tuple[str, str]) -> None:
    spec = parse_spec(base(replicas=3))
    learner = pod()
    replicas, verdict = replicas_status(spec, learner, followers, runtime, OWNER)
    assert (verdict.status, verdict.reason) == expected
    assert replicas.desired == 3
    assert replicas.ready == 1 + sum(p is UP for p in followers.values())


def test_status_replicas_and_condition_in_the_resource() -> None:
    spec = base(replicas=3)
    body = {"metadata": {"name": "chat", "namespace": "ml", "generation": 2}, "spec": spec}
    runtime = learner_status(seen("chat-follower-1", 9, 0), seen("chat-follower-2", 7, 42.5))
    replicas = replicas_status(parse_spec(spec), pod(), {1: UP, 2: UP}, runtime, OWNER)
    status = compute_status(body, pod(), runtime, NOW, desired_hash=HASH, replicas=replicas).to_dict()
    assert status["replicas"] == {
        "desired": 3, "ready": 3, "maxLagSeconds": 42.5, "followers": [
            {"name": "chat-follower-1", "ready": True, "weightVersion": 9, "lagVersions": 0, "lagSeconds": 0.0},
            {"name": "chat-follower-2", "ready": True, "weightVersion": 7, "lagVersions": 2, "lagSeconds": 42.5}]}
    insync = next(c for c in status["conditions"] if c["type"] == "FollowersInSync")
    assert insync["status"] == "True" and insync["observedGeneration"] == 2
    # One replica: neither the condition nor status.replicas.
    single = compute_status({**body, "spec": base()}, pod(), runtime, NOW, desired_hash=HASH,
                            replicas=replicas_status(parse_spec(base()), pod(), {}, runtime, OWNER)).to_dict()
    assert "replicas" not in single and all(c["type"] != "FollowersInSync" for c in single["conditions"])
