"""Tables of decide.py: what a reconcile pass does about the pod, and about a checkpoint request."""

from __future__ import annotations

from typing import Any, Optional

import pytest

from onlinemodel_operator import NAME_LABEL, SPEC_HASH_ANNOTATION
from onlinemodel_protocol.rpc import EXIT_MODEL_CHANGED
from onlinemodel_operator.decide import (
    AlreadyHandled,
    CreatePod,
    Nothing,
    PodAction,
    PostCheckpoint,
    ReplaceFailedPod,
    StopForModelChange,
    StopPod,
    WaitForOldPod,
    WaitUntilServing,
    decide,
    decide_checkpoint_request,
    name_taken,
)

HASH = "h-current"


def pod(*, spec_hash: Optional[str] = HASH, phase: str = "Running", ready: bool = True, ip: Optional[str] = "10.0.0.5",
        terminating: bool = False, label: str = "m", exit_code: Optional[int] = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "m", "namespace": "ns", "labels": {NAME_LABEL: label},
                            "annotations": {SPEC_HASH_ANNOTATION: spec_hash} if spec_hash else {}}
    if terminating:
        meta["deletionTimestamp"] = "2026-11-26T04:59:00Z"
    state: dict[str, Any] = {"running": {"startedAt": "2026-11-26T04:00:00Z"}}
    if exit_code is not None:
        state = {"terminated": {"exitCode": exit_code, "reason": "Error", "message": "other base model"}}
    status: dict[str, Any] = {"phase": phase, "containerStatuses": [
        {"name": "runtime", "ready": ready, "state": state}]}
    if ip:
        status["podIP"] = ip
    return {"metadata": meta, "status": status,
            "spec": {"containers": [{"name": "runtime", "ports": [{"name": "http", "containerPort": 8000}]}]}}


SERVING = pod()
LOADING = pod(ready=False)
OUTDATED = pod(spec_hash="h-old")
NO_HASH = pod(spec_hash=None)
OUTDATED_LOADING = pod(spec_hash="h-old", ready=False)
OUTDATED_NO_IP = pod(spec_hash="h-old", ip=None)
TERMINATING = pod(terminating=True)
OUTDATED_TERMINATING = pod(spec_hash="h-old", terminating=True)
FAILED = pod(phase="Failed", ready=False)
SUCCEEDED = pod(phase="Succeeded", ready=False)
OUTDATED_FAILED = pod(spec_hash="h-old", phase="Failed", ready=False)
REFUSED = pod(ready=False, exit_code=EXIT_MODEL_CHANGED)
OUTDATED_REFUSED = pod(spec_hash="h-old", ready=False, exit_code=EXIT_MODEL_CHANGED)
TERMINATING_REFUSED = pod(ready=False, exit_code=EXIT_MODEL_CHANGED, terminating=True)
CRASHED = pod(ready=False, exit_code=1)

POD_CASES = [
    # (pod, suspend, held_hash, action)
    pytest.param(None, False, None, CreatePod(), id="no pod -> create it"),
    pytest.param(None, True, None, Nothing(), id="no pod, suspended -> nothing"),
    pytest.param(None, False, HASH, Nothing(), id="no pod, this spec refused for a model change -> nothing"),
    pytest.param(None, False, "h-old", CreatePod(), id="no pod, an older spec was refused -> create it"),
    pytest.param(REFUSED, False, None, StopForModelChange("other base model"),
                 id="model change refused -> stop, hold"),
    pytest.param(OUTDATED_REFUSED, False, None, StopPod("SpecChanged", checkpoint_first=False),
                 id="refused, but the spec changed since -> replace"),
    pytest.param(TERMINATING_REFUSED, False, None, WaitForOldPod(), id="refused and terminating -> wait"),
    pytest.param(REFUSED, True, None, StopPod("Suspended", checkpoint_first=False),
                 id="refused, suspended -> delete"),
    pytest.param(CRASHED, False, None, Nothing(), id="another exit code -> the kubelet restarts it"),
    pytest.param(SERVING, False, None, Nothing(), id="current pod serving -> nothing"),
    pytest.param(LOADING, False, None, Nothing(), id="current pod loading -> nothing"),
    pytest.param(TERMINATING, False, None, WaitForOldPod(), id="terminating -> wait"),
    pytest.param(TERMINATING, True, None, WaitForOldPod(), id="terminating, suspended -> wait"),
    pytest.param(OUTDATED_TERMINATING, False, None, WaitForOldPod(), id="outdated and terminating -> wait, no new pod"),
    pytest.param(SERVING, True, None, StopPod("Suspended", checkpoint_first=True), id="suspended, serving -> checkpoint, delete"),
    pytest.param(LOADING, True, None, StopPod("Suspended", checkpoint_first=False), id="suspended, loading -> delete"),
    pytest.param(FAILED, True, None, StopPod("Suspended", checkpoint_first=False), id="suspended, failed -> delete"),
    pytest.param(FAILED, False, None, ReplaceFailedPod("Failed"), id="failed -> replace"),
    pytest.param(SUCCEEDED, False, None, ReplaceFailedPod("Succeeded"), id="succeeded -> replace"),
    pytest.param(OUTDATED_FAILED, False, None, ReplaceFailedPod("Failed"), id="outdated and failed -> replace"),
    pytest.param(OUTDATED, False, None, StopPod("SpecChanged", checkpoint_first=True), id="outdated, serving -> checkpoint, delete"),
    pytest.param(OUTDATED_LOADING, False, None, StopPod("SpecChanged", checkpoint_first=False), id="outdated, loading -> delete"),
    pytest.param(OUTDATED_NO_IP, False, None, StopPod("SpecChanged", checkpoint_first=False), id="outdated, no IP -> delete"),
    pytest.param(NO_HASH, False, None, StopPod("SpecChanged", checkpoint_first=True), id="no spec hash -> checkpoint, delete"),
]


@pytest.mark.parametrize("the_pod,suspend,held_hash,action", POD_CASES)
def test_pod_action(the_pod: Optional[dict[str, Any]], suspend: bool, held_hash: Optional[str],
                    action: PodAction) -> None:
    assert decide(the_pod, desired_hash=HASH, suspend=suspend, held_hash=held_hash) == action


SERVICE = {"metadata": {"name": "m", "labels": {NAME_LABEL: "m"}}}
FOREIGN_SERVICE = {"metadata": {"name": "m", "labels": {"app": "web"}}}
UNLABELLED_POD = {"metadata": {"name": "m"}}


TOKEN_SECRET = {"metadata": {"name": "m-api-token", "labels": {NAME_LABEL: "m"}}}
FOREIGN_SECRET = {"metadata": {"name": "m-api-token"}}


@pytest.mark.parametrize("the_pod,service,secret,taken", [
    pytest.param(None, None, None, None, id="nothing there yet"),
    pytest.param(SERVING, SERVICE, TOKEN_SECRET, None, id="all ours"),
    pytest.param(pod(label="other"), SERVICE, None, "Pod ns/m", id="pod of another OnlineModel"),
    pytest.param(UNLABELLED_POD, None, None, "Pod ns/m", id="pod someone else made"),
    pytest.param(SERVING, FOREIGN_SERVICE, None, "Service ns/m", id="service someone else made"),
    pytest.param(SERVING, SERVICE, FOREIGN_SECRET, "Secret ns/m-api-token", id="token Secret someone else made"),
])
def test_name_taken(the_pod: Optional[dict[str, Any]], service: Optional[dict[str, Any]],
                    secret: Optional[dict[str, Any]], taken: Optional[str]) -> None:
    reason = name_taken("m", "ns", the_pod, service, secret)
    if taken is None:
        assert reason is None
    else:
        assert reason is not None and reason.startswith(f"{taken} exists and was not created for this")


@pytest.mark.parametrize("value,handled,the_pod,action", [
    pytest.param("r2", "r2", None, AlreadyHandled(), id="handled before -> reconcile only"),
    pytest.param("r2", "r2", SERVING, AlreadyHandled(), id="handled before, serving -> reconcile only"),
    pytest.param("r2", "r1", None, WaitUntilServing(), id="no pod -> wait"),
    pytest.param("r2", None, LOADING, WaitUntilServing(), id="loading -> wait"),
    pytest.param("r2", None, pod(ip=None), WaitUntilServing(), id="no IP -> wait"),
    pytest.param("r2", None, TERMINATING, WaitUntilServing(), id="terminating -> wait"),
    pytest.param("r2", "r1", SERVING, PostCheckpoint(), id="new value, serving -> POST /checkpoint"),
    pytest.param("r1", None, OUTDATED, PostCheckpoint(), id="first value, outdated pod serving -> POST /checkpoint"),
])
def test_checkpoint_request_action(value: str, handled: Optional[str], the_pod: Optional[dict[str, Any]],
                                   action: Any) -> None:
    assert decide_checkpoint_request(value, handled, the_pod) == action
