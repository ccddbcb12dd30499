"""Unit tests of pod.py: reading a live pod back (its runtime container, address, token, failure)."""

from __future__ import annotations

from typing import Any

from onlinemodel_operator.models_status import FailureStatus
from onlinemodel_operator.pod import api_token_ref, pod_failure, runtime_container, runtime_url

SIDECAR = {"name": "proxy", "ports": [{"name": "http", "containerPort": 1234}],
           "env": [{"name": "ONLINEMODEL_API_TOKEN", "valueFrom": {"secretKeyRef": {"name": "not-this"}}}]}


def pod(**container: Any) -> dict[str, Any]:
    return {"metadata": {"name": "m", "namespace": "ns"},
            "spec": {"containers": [SIDECAR, {"name": "runtime", **container}]},
            "status": {"podIP": "10.1.2.3"}}


def test_the_runtime_container_is_found_by_name() -> None:
    assert runtime_container(pod(image="x"))["image"] == "x"
    assert runtime_container({"spec": {"containers": [SIDECAR]}}) == {}
    assert runtime_container({}) == {}


def test_runtime_url() -> None:
    p = pod(ports=[{"name": "metrics", "containerPort": 9100}, {"name": "http", "containerPort": 9000}])
    assert runtime_url(p) == "http://10.1.2.3:9000"
    p["status"]["podIP"] = "fd00::1"
    assert runtime_url(p) == "http://[fd00::1]:9000"
    assert runtime_url(pod()) == "http://10.1.2.3:8000"  # no named port: the default
    p["status"] = {}
    assert runtime_url(p) is None


def test_api_token_ref_is_the_pods_own() -> None:
    env = [{"name": "A", "value": "b"},
           {"name": "ONLINEMODEL_API_TOKEN", "valueFrom": {"secretKeyRef": {"name": "tok", "key": "k"}}}]
    assert api_token_ref(pod(env=env)) == ("tok", "k")
    assert api_token_ref(pod(env=[{"name": "ONLINEMODEL_API_TOKEN",
                                   "valueFrom": {"secretKeyRef": {"name": "tok"}}}])) == ("tok", "token")
    assert api_token_ref(pod(env=[{"name": "ONLINEMODEL_API_TOKEN", "value": "plain"}])) is None
    assert api_token_ref(pod()) is None


def failed(status: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": "m"}, "status": status}


def test_pod_failure() -> None:
    terminated = {"exitCode": 137, "reason": "OOMKilled", "finishedAt": "2026-11-26T04:58:00Z", "message": "x" * 2000}
    crashed = failed({"phase": "Running", "containerStatuses": [
        {"name": "runtime", "state": {"waiting": {"reason": "CrashLoopBackOff"}}, "lastState": {"terminated": terminated}}]})
    assert pod_failure(crashed) == FailureStatus(exit_code=137, reason="OOMKilled", message="x" * 1024,
                                                 time="2026-11-26T04:58:00Z")
    evicted = failed({"phase": "Failed", "reason": "Evicted", "message": "low on memory"})
    assert pod_failure(evicted) == FailureStatus(reason="Evicted", message="low on memory")
    completed = failed({"phase": "Succeeded", "containerStatuses": [
        {"name": "runtime", "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]})
    assert pod_failure(completed) is None
    assert pod_failure(None) is None
