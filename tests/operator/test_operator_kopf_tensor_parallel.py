"""The real operator (kopf) against kmock's emulator with resources.gpus: 2 (tensor parallelism)."""

from __future__ import annotations

from typing import Any

import pytest

from onlinemodel_operator.kube import PODS
from operator_cluster import Cluster, condition
from operator_fake_runtime import FakeRuntime
from operator_kubelet import VLLM_REFUSES_TP_2, FakeKubelet
from test_operator_kopf import arg, event_reasons, spec
from test_operator_kopf_replicas import pods_named

pytestmark = pytest.mark.e2e


async def test_two_gpus_render_tensor_parallel_pods_and_vllms_refusal_is_reported(
        cluster: Cluster, kubelet: FakeKubelet, runtime: FakeRuntime, operator: Any) -> None:
    kubelet.auto_start = False
    await cluster.create_onlinemodel("tp", spec(runtime.port, replicas=2,
                                                resources={"gpus": 2, "memory": "64Gi"}))
    pods = await pods_named(cluster, "tp", "tp-follower-1")
    for pod in pods.values():  # the learner and its follower alike
        container = pod["spec"]["containers"][0]
        assert container["resources"]["limits"] == {"nvidia.com/gpu": 2, "memory": "64Gi"}
        assert arg(pod, "--tensor-parallel-size") == "2"
        assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "4Gi"}} in pod["spec"]["volumes"]

    # A model whose heads 2 GPUs cannot split: vLLM refuses at start and the container keeps exiting.
    await kubelet.mark_crash_looping("tp", 1, VLLM_REFUSES_TP_2)
    om = await cluster.wait_condition("tp", "Degraded", "True", "CrashLoopBackOff")
    assert "must be divisible by tensor parallel size (2)" in om["status"]["lastFailure"]["message"]
    assert condition(om, "Ready")["status"] == "False" and om["status"]["phase"] == "Failed"
    await cluster.wait_for(lambda: event_reasons(cluster, "tp"), lambda r: "CrashLoopBackOff" in r, what="the event")
    # The pod is the kubelet's to restart (restartPolicy Always); the operator leaves it to the user's fix.
    assert (await cluster.get(PODS, "tp"))["metadata"]["uid"] == pods["tp"]["metadata"]["uid"]
