"""Scaled out (spec.replicas > 1): the follower pods, what to do about them, and what status says.

The learner is the pod `<name>` (as with one replica: clients and volumes keep working); followers are
`<name>-follower-1` .. `<name>-follower-(replicas-1)`, each running `onlinemodel serve --follow
http://<name>-train.<ns>.svc:PORT`. Followers have no checkpoint volume (it is ReadWriteOnce and the
learner's) and no preStop checkpoint: they start from spec.model and pull the learner's latest version,
which holds every tensor training changes. The learner's loss never touches them: they keep serving the
weights they have while the operator recreates the learner from its latest checkpoint.

Pure functions only; reconcile.py executes `decide_followers`' actions.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional, Union

from onlinemodel_operator import FOLLOWER, NAME_LABEL, ROLE_LABEL
from onlinemodel_operator.models_spec import OnlineModelSpec
from onlinemodel_operator.models_status import FollowerReplicaStatus, ReplicasStatus
from onlinemodel_operator.pod import analyze_pod, finished_phase, is_terminating, spec_hash_of
from onlinemodel_operator.status import Verdict
from onlinemodel_operator.config_files import CONFIG_FILES
from onlinemodel_operator.render import (
    CHECKPOINT_DIR,
    Owner,
    render_pod,
    train_service_name,
)
from onlinemodel_protocol.api import TrainStatus
from onlinemodel_protocol.replication import READY_PATH

_SERVE_ONLY = ("--checkpoint-dir", "--checkpoint-keep", "--checkpoint-every-steps", "--checkpoint-every-seconds",
               "--final-checkpoint-timeout", "--sync-interval", "--learning-rate", "--optimizer-rank",
               "--max-examples", "--default-epochs", "--max-decode-slowdown", "--max-body-bytes",
               "--replay-examples", "--anchor-weight", "--null-space-energy", *(f.flag for f in CONFIG_FILES))


def follower_pod_name(owner: Owner, index: int) -> str:
    return f"{owner.name}-follower-{index}"


def follower_index(owner: Owner, pod: Mapping[str, Any]) -> Optional[int]:
    """The index of a follower pod of this OnlineModel (None: not one)."""
    meta = pod.get("metadata") or {}
    if (meta.get("labels") or {}).get(NAME_LABEL) != owner.name:
        return None
    match = re.fullmatch(re.escape(owner.name) + r"-follower-([1-9][0-9]*)", meta.get("name", ""))
    return int(match.group(1)) if match else None


def learner_url(owner: Owner, spec: OnlineModelSpec) -> str:
    return f"http://{train_service_name(owner)}.{owner.namespace}.svc:{spec.serving.port}"


def follower_args(learner_args: list[str], owner: Owner, spec: OnlineModelSpec, index: int) -> list[str]:
    """The learner's `onlinemodel serve` arguments without its training and checkpoint options, plus
    `--follow` (or `--no-training` when training is off: then followers are plain replicas)."""
    own, extra = (learner_args[:learner_args.index("--")], learner_args[learner_args.index("--"):]) \
        if "--" in learner_args else (learner_args, [])
    args: list[str] = []
    i = 0
    while i < len(own):
        if own[i] in _SERVE_ONLY:
            i += 2
        elif own[i] in ("--start-over", "--no-training"):
            i += 1
        else:
            args.append(own[i])
            i += 1
    if spec.training.enabled:
        args += ["--follow", learner_url(owner, spec), "--follower-name", follower_pod_name(owner, index)]
    else:
        args.append("--no-training")
    return args + extra


def render_follower(owner: Owner, spec: OnlineModelSpec, index: int) -> dict[str, Any]:
    pod = copy.deepcopy(render_pod(owner, spec))
    meta = pod["metadata"]
    meta["name"] = follower_pod_name(owner, index)
    meta["labels"][ROLE_LABEL] = FOLLOWER
    pod_spec = pod["spec"]
    # No checkpoints and no config files (guard, anchors): the learner trains, keeps and guards; a follower
    # serves its weights.
    pod_spec["volumes"] = [v for v in pod_spec["volumes"]
                           if v["name"] not in ("checkpoints", *(f.volume for f in CONFIG_FILES))]
    container = pod_spec["containers"][0]
    container["volumeMounts"] = [m for m in container["volumeMounts"]
                                 if m["mountPath"] not in (CHECKPOINT_DIR, *(f.dir for f in CONFIG_FILES))]
    container["args"] = follower_args(container["args"], owner, spec, index)
    del container["lifecycle"]  # nothing to checkpoint; SIGTERM stops it at once
    if spec.training.enabled:  # ready once it serves the learner's weights, not the base model's
        container["readinessProbe"]["httpGet"]["path"] = READY_PATH
    return pod


# --- what to do -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CreateFollower:
    index: int


@dataclass(frozen=True)
class DeleteFollower:
    index: int
    why: Literal["ScaledDown", "Suspended", "PodFailed", "SpecChanged"]


FollowerAction = Union[CreateFollower, DeleteFollower]


def decide_followers(followers: Mapping[int, Mapping[str, Any]], *, replicas: int, desired_hash: str,
                     suspend: bool) -> list[FollowerAction]:
    """Every action on the follower pods (index -> live pod) for this pass. Independent of the learner: a
    lost learner never takes its followers down. An outdated follower is replaced one at a time, and only
    while every other follower serves, so a spec change never empties the Service."""
    wanted = set() if suspend else set(range(1, replicas))
    actions: list[FollowerAction] = []
    for index, pod in sorted(followers.items()):
        if is_terminating(pod):
            continue
        if index not in wanted:
            actions.append(DeleteFollower(index, "Suspended" if suspend else "ScaledDown"))
        elif finished_phase(pod) is not None:
            actions.append(DeleteFollower(index, "PodFailed"))
    actions += [CreateFollower(i) for i in sorted(wanted - set(followers))]
    if actions:
        return actions
    outdated = [i for i, pod in sorted(followers.items()) if i in wanted and spec_hash_of(pod) != desired_hash]
    if outdated and all(analyze_pod(pod).serving for i, pod in followers.items() if i != outdated[0]):
        return [DeleteFollower(outdated[0], "SpecChanged")]
    return []


# --- status -------------------------------------------------------------------------------------------------

def replicas_status(spec: OnlineModelSpec, learner: Optional[Mapping[str, Any]],
                    followers: Mapping[int, Mapping[str, Any]], runtime: Any,
                    owner: Owner) -> tuple[ReplicasStatus, Verdict]:
    """`status.replicas` and the FollowersInSync condition, from the pods and the learner's /train/status
    (`runtime`: its TrainStatus, or anything else when it did not answer)."""
    reported = {}
    if isinstance(runtime, TrainStatus) and runtime.replication is not None:
        reported = {f.name: f for f in runtime.replication.followers}
    rows = []
    for index, pod in sorted(followers.items()):
        name = follower_pod_name(owner, index)
        seen = reported.get(name)
        rows.append(FollowerReplicaStatus(
            name=name, ready=analyze_pod(pod).serving,
            weight_version=seen.weight_version if seen else None,
            lag_versions=seen.lag_versions if seen else None, lag_seconds=seen.lag_seconds if seen else None))
    lags = [r.lag_seconds for r in rows if r.lag_seconds is not None]
    desired = 0 if spec.suspend else spec.replicas
    status = ReplicasStatus(desired=desired,
                            ready=int(learner is not None and analyze_pod(learner).serving) + sum(r.ready for r in rows),
                            followers=rows, max_lag_seconds=max(lags) if lags else None)
    return status, followers_verdict(spec, status, learner_answers=isinstance(runtime, TrainStatus))


def followers_verdict(spec: OnlineModelSpec, status: ReplicasStatus, *, learner_answers: bool) -> Verdict:
    bound = spec.replication.max_lag_seconds
    serving = [f for f in status.followers if f.ready]
    if not serving:
        return Verdict(True, "NoFollowers", "no follower serves" if spec.replicas > 1
                                else "spec.replicas is 1: the learner serves alone")
    behind = [f for f in serving if f.lag_seconds is not None and f.lag_seconds > bound]
    if behind:
        names = ", ".join(f"{f.name} ({f.lag_seconds:.0f}s, {f.lag_versions} versions)" for f in behind)
        return Verdict(False, "FollowerBehind", f"behind the learner by more than {bound:g}s: {names}")
    if not learner_answers:
        return Verdict(None, "LearnerUnavailable",
                                "the learner does not answer; followers keep serving the weights they have")
    silent = [f.name for f in serving if f.weight_version is None]
    if silent:
        return Verdict(None, "NotReported", f"not reported to the learner yet: {', '.join(silent)}")
    return Verdict(True, "InSync", f"{len(serving)} followers within {bound:g}s of the learner")
