"""The checks every served architecture passes, on the GPU with real vLLM (CUDA graphs on): vLLM's logits
equal transformers' on the weights vLLM exported; a sentence taught through POST /train comes back verbatim
from /v1/chat/completions; after POST /checkpoint and a restart on the checkpoint directory, the same
answer. Each test_serving_*.py module imports them for one architecture (its SHAPE), so that each runs on
its own pytest-xdist worker (`--dist loadfile`). The same checks run on CPU, with a tiny Qwen3, in
tests/runtime/e2e/test_served_checks.py."""

from __future__ import annotations

import pytest

from serving_models import record
from onlinemodel_runtime.devtools import served_checks as sc


@pytest.mark.gpu
def test_vllm_logits_equal_transformers_on_the_exported_views(served):
    compared = sc.compare_served_logprobs(served.server, served.state_dir, served.model_dir, sc.PROMPT)
    close, wrong = compared["close"], compared["wrong"]
    record(served.shape, "logits", start_s=served.starts[0], vllm_vs_transformers=close, rolled_heads=wrong)
    assert close["reference_spread"] > 1.0, close
    tolerance = sc.logprob_tolerance(served.model_dir)
    assert close["mean"] < tolerance, close
    assert wrong["mean"] > sc.POWER * tolerance, wrong  # the tolerance would catch a wrong head order


@pytest.mark.gpu
def test_teach_then_checkpoint_and_restart_on_it(served):
    taught = sc.teach(served.server)
    assert taught["answer"] == sc.SENTENCE, taught
    code, info = served.server.request("POST", "/checkpoint", timeout=600)
    assert code == 200, info
    before = served.server.status()
    assert info["step"] == before["steps"]
    served.restart()
    after = served.server.status()
    answer = served.server.chat(sc.QUESTION, max_tokens=48).strip()
    record(served.shape, "teach_checkpoint_restart", taught=taught, checkpoint_s=info["seconds"],
           checkpoint_bytes=info["size_bytes"], restart_s=served.starts[-1], answer_after_restart=answer)
    assert (after["steps"], after["weight_version"]) == (before["steps"], before["weight_version"])
    assert after["checkpoint"]["last"]["path"] == info["path"]
    assert answer == sc.SENTENCE
