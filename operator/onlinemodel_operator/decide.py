"""What a reconcile pass does: pure functions from what it observed to ONE action, which reconcile.py
executes. Tested as tables in tests/operator/test_operator_decide.py.

One GPU and one ReadWriteOnce volume per OnlineModel: a new pod is created only once the old one is gone,
and a pod that must go is asked for a checkpoint first when its runtime answers. A runtime that refuses the
checkpoints on the volume (another base model) is not restarted until the user decides (the spec changes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional, Union

from onlinemodel_operator.pod import answers, finished_phase, is_terminating, model_changed, spec_hash_of
from onlinemodel_operator.render import made_for


@dataclass(frozen=True)
class WaitForOldPod:
    """The pod is terminating: come back once it is gone."""


@dataclass(frozen=True)
class StopPod:
    """Delete the pod because of `why`; POST /checkpoint first when its runtime answers."""

    why: Literal["Suspended", "SpecChanged"]
    checkpoint_first: bool


@dataclass(frozen=True)
class ReplaceFailedPod:
    """The pod is over for good (phase Failed or Succeeded): record its failure and delete it."""

    phase: str


@dataclass(frozen=True)
class StopForModelChange:
    """The runtime exited with EXIT_MODEL_CHANGED: record why (status.modelChanged) and delete the pod;
    restarting it would only fail again."""

    message: str


@dataclass(frozen=True)
class CreatePod:
    """No pod and not suspended: create the rendered one."""


@dataclass(frozen=True)
class Nothing:
    """The pod runs the current spec (or, suspended or held for a model change, there is none): leave it."""


PodAction = Union[WaitForOldPod, StopPod, ReplaceFailedPod, StopForModelChange, CreatePod, Nothing]


def decide(pod: Optional[Mapping[str, Any]], *, desired_hash: str, suspend: bool,
           held_hash: Optional[str] = None) -> PodAction:
    """The one thing to do about the pod of an OnlineModel whose spec is valid (a refused spec changes
    nothing that runs: reconcile only reports it).

    pod: the live pod of the OnlineModel's name, made for it (None: none); desired_hash: the spec hash of
    the pod the spec renders; suspend: spec.suspend; held_hash: the spec hash whose pod the runtime refused
    for a model change (status.modelChanged), if any.
    """
    if pod is None:
        return Nothing() if suspend or held_hash == desired_hash else CreatePod()
    if is_terminating(pod):
        return WaitForOldPod()
    if suspend:
        return StopPod("Suspended", checkpoint_first=answers(pod))
    phase = finished_phase(pod)
    if phase is not None:
        return ReplaceFailedPod(phase)
    if spec_hash_of(pod) != desired_hash:
        return StopPod("SpecChanged", checkpoint_first=answers(pod))
    refused = model_changed(pod)
    if refused is not None:
        return StopForModelChange(refused)
    return Nothing()


def name_taken(name: str, namespace: str, pod: Optional[Mapping[str, Any]],
               service: Optional[Mapping[str, Any]], token_secret: Optional[Mapping[str, Any]] = None) -> Optional[str]:
    """Why the pod, Service or generated token Secret name is someone else's (the operator never touches
    what it did not make)."""
    for kind, obj in (("Pod", pod), ("Service", service), ("Secret", token_secret)):
        if obj is not None and not made_for(obj, name):
            taken = obj["metadata"]["name"]
            fix = "set spec.training.apiTokenSecretRef" if kind == "Secret" else "give the OnlineModel another name"
            return f"{kind} {namespace}/{taken} exists and was not created for this OnlineModel; delete it or {fix}"
    return None


# --- the checkpoint-requested annotation ------------------------------------------------------------------

@dataclass(frozen=True)
class AlreadyHandled:
    """status.checkpoint.requested holds this value already (seen again on resume): only reconcile."""


@dataclass(frozen=True)
class WaitUntilServing:
    """The pod does not serve yet: come back later."""


@dataclass(frozen=True)
class PostCheckpoint:
    """Ask the pod's runtime for a checkpoint now."""


CheckpointRequestAction = Union[AlreadyHandled, WaitUntilServing, PostCheckpoint]


def decide_checkpoint_request(value: str, handled: Optional[str],
                              pod: Optional[Mapping[str, Any]]) -> CheckpointRequestAction:
    """What to do about the annotation's new `value`, given the value last handled and the live pod."""
    if value == handled:
        return AlreadyHandled()
    if pod is None or not answers(pod):
        return WaitUntilServing()
    return PostCheckpoint()
