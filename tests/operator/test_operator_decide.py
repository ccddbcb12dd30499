"""Tables of decide.py: what a reconcile pass does about the pod, and about a checkpoint request."""

from __future__ import annotations

from typing import Any, Optional

import pytest

from onlinemodel_operator import NAME_LABEL, SPEC_HASH_ANNOTATION
from onlinemodel_operator.decide import (
    AlreadyHandled,
    CreatePod,
    Nothing,
    PodAction,
    PostCheckpoint,
    ReplaceFailedPod,
    StopPod,
    WaitForOldPod,
    WaitUntilServing,
    decide,
    decide_checkpoint_request,
    name_taken,
)

HASH = "h-current"


def pod(*, spec_hash: Optional[str] = HASH, phase: str = "Running", ready: bool = True, ip: Optional[str] = "10.0.0.5",
        terminating: bool = False, label: str = "m") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "m", "namespace": "ns", "labels": {NAME_LABEL: label},
                            "annotations": {SPEC_HASH_ANNOTATION: spec_hash} if spec_hash else {}}
    if terminating:
        meta["deletionTimestamp"] = "2026-11-26T04:59:00Z"
    status: dict[str, Any] = {"phase": phase, "containerStatuses": [
        {"name": "runtime", "ready": ready, "state": {"running": {"startedAt": "2026-11-26T04:00:00Z"}}}]}
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

POD_CASES = [
    # (pod, suspend, action)
    pytest.param(None, False, CreatePod(), id="no pod -> create it"),
    pytest.param(None, True, Nothing(), id="no pod, suspended -> nothing"),
    pytest.param(SERVING, False, Nothing(), id="current pod serving -> nothing"),
    pytest.param(LOADING, False, Nothing(), id="current pod loading -> nothing"),
    pytest.param(TERMINATING, False, WaitForOldPod(), id="terminating -> wait"),
    pytest.param(TERMINATING, True, WaitForOldPod(), id="terminating, suspended -> wait"),
    pytest.param(OUTDATED_TERMINATING, False, WaitForOldPod(), id="outdated and terminating -> wait, no new pod"),
    pytest.param(SERVING, True, StopPod("Suspended", checkpoint_first=True), id="suspended, serving -> checkpoint, delete"),
    pytest.param(LOADING, True, StopPod("Suspended", checkpoint_first=False), id="suspended, loading -> delete"),
    pytest.param(FAILED, True, StopPod("Suspended", checkpoint_first=False), id="suspended, failed -> delete"),
    pytest.param(FAILED, False, ReplaceFailedPod("Failed"), id="failed -> replace"),
    pytest.param(SUCCEEDED, False, ReplaceFailedPod("Succeeded"), id="succeeded -> replace"),
    pytest.param(OUTDATED_FAILED, False, ReplaceFailedPod("Failed"), id="outdated and failed -> replace"),
    pytest.param(OUTDATED, False, StopPod("SpecChanged", checkpoint_first=True), id="outdated, serving -> checkpoint, delete"),
    pytest.param(OUTDATED_LOADING, False, StopPod("SpecChanged", checkpoint_first=False), id="outdated, loading -> delete"),
    pytest.param(OUTDATED_NO_IP, False, StopPod("SpecChanged", checkpoint_first=False), id="outdated, no IP -> delete"),
    pytest.param(NO_HASH, False, StopPod("SpecChanged", checkpoint_first=True), id="no spec hash -> checkpoint, delete"),
]


@pytest.mark.parametrize("the_pod,suspend,action", POD_CASES)
def test_pod_action(the_pod: Optional[dict[str, Any]], suspend: bool, action: PodAction) -> None:
    assert decide(the_pod, desired_hash=HASH, suspend=suspend) == action


SERVICE = {"metadata": {"name": "m", "labels": {NAME_LABEL: "m"}}}
FOREIGN_SERVICE = {"metadata": {"name": "m", "labels": {"app": "web"}}}
UNLABELLED_POD = {"metadata": {"name": "m"}}


@pytest.mark.parametrize("the_pod,service,taken_by", [
    pytest.param(None, None, None, id="nothing there yet"),
    pytest.param(SERVING, SERVICE, None, id="both ours"),
    pytest.param(pod(label="other"), SERVICE, "Pod", id="pod of another OnlineModel"),
    pytest.param(UNLABELLED_POD, None, "Pod", id="pod someone else made"),
    pytest.param(SERVING, FOREIGN_SERVICE, "Service", id="service someone else made"),
])
def test_name_taken(the_pod: Optional[dict[str, Any]], service: Optional[dict[str, Any]],
                    taken_by: Optional[str]) -> None:
    reason = name_taken("m", "ns", the_pod, service)
    if taken_by is None:
        assert reason is None
    else:
        assert reason is not None and reason.startswith(f"{taken_by} ns/m exists and was not created for this")


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
