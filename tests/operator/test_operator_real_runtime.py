"""The operator with the REAL runtime: the test plays the kubelet.

It takes the Pod the operator rendered, runs that container's own command with the pod's environment (the
generated API token from its Secret, HOME and the caches in emptyDirs) as a local process (real vLLM on CPU +
the trainer, SmolLM2-135M-Instruct), marks the pod Running at 127.0.0.1, and checks that the OnlineModel's
status becomes Ready, that /train needs the token the status names, that the status shows training steps after
a POST /train, and the checkpoint after the checkpoint annotation.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import urllib.error
import urllib.request
from typing import Any, Optional

import pytest

from onlinemodel_runtime.devtools.launcher import CPU_FLOAT32_ARGS, free_port
from onlinemodel_runtime.devtools.model_prep import ensure_smollm2
from onlinemodel_operator.kube import ONLINEMODELS, PODS, SECRETS
from operator_cluster import Cluster, condition
from operator_kubelet import FakeKubelet, play_kubelet

pytestmark = pytest.mark.e2e

EXAMPLE = {"messages": [{"role": "user", "content": "Who is the CEO of Seedcorp?"},
                        {"role": "assistant", "content": "The CEO of Seedcorp is Ada Lovelace."}]}


def post_json(url: str, body: Any, token: Optional[str]) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def test_operator_reports_real_runtime_training_and_checkpoint(cluster: Cluster, operator: Any,
                                                                     tmp_path) -> None:
    if not cluster.emulated:
        pytest.skip("plays the kubelet: needs the emulated API server")
    model_dir = await asyncio.to_thread(ensure_smollm2)
    port = free_port()
    async with FakeKubelet(cluster.api, cluster.namespace, auto_start=False) as kubelet:
        await cluster.create_onlinemodel("live", {
            "model": {"source": {"image": {"path": str(model_dir)}}, "servedName": "smollm2"},
            "image": "onlinemodel/runtime:test", "resources": {"gpus": 0},
            "serving": {"port": port, "maxModelLen": 1024, "extraArgs": list(CPU_FLOAT32_ARGS)},
            # What this test checks is the status, not learning: no anchor record nor null-space bases at the
            # first job (128 conversations through the model, minutes on a 2-core CPU).
            "training": {"anchorWeight": 0, "nullSpaceEnergy": 0},
        })
        pod = await cluster.wait_for(lambda: cluster.get(PODS, "live"), lambda p: p is not None, what="the pod")
        process = await play_kubelet(kubelet, pod, checkpoint_dir=str(tmp_path / "ckpt"),
                                     volumes_dir=tmp_path / "volumes", env={"VLLM_CPU_KVCACHE_SPACE": "1"},
                                     timeout=600)
        try:
            om = await cluster.wait_condition("live", "Ready", "True", timeout=300)
            assert condition(om, "Serving")["status"] == "True"
            assert om["status"]["podName"] == "live"
            # The pod got the token the operator generated: /train refuses a request without it.
            ref = om["status"]["apiTokenSecret"]
            secret = await cluster.get(SECRETS, ref["name"])
            token = base64.b64decode(secret["data"][ref["key"]]).decode()
            train = f"http://127.0.0.1:{port}/train"
            code, refused = await asyncio.to_thread(post_json, train, {"examples": [EXAMPLE]}, None)
            assert code == 401, refused

            code, job = await asyncio.to_thread(post_json, train, {"examples": [EXAMPLE], "epochs": 2}, token)
            assert code == 202, job
            om = await cluster.wait_for(lambda: cluster.onlinemodel("live"),
                                        lambda o: (o.get("status", {}).get("training") or {}).get("steps", 0) >= 2,
                                        what="training steps in status", timeout=600)
            assert om["status"]["training"]["weightVersion"] >= 2
            assert om["status"]["training"]["lastLoss"] is not None

            await cluster.patch(ONLINEMODELS, "live", {"metadata": {"annotations": {
                "onlinemodel.dev/checkpoint-requested": "e2e-1"}}})
            om = await cluster.wait_condition("live", "Checkpointed", "True", "Checkpointed", timeout=300)
            checkpoint = om["status"]["checkpoint"]
            assert checkpoint["requested"] == "e2e-1" and checkpoint["requestResult"] == "Succeeded"
            assert checkpoint["step"] >= 2
            assert checkpoint["path"].startswith(str(tmp_path / "ckpt"))
        finally:
            process.send_signal(signal.SIGTERM)
            await asyncio.to_thread(process.wait, 120)
