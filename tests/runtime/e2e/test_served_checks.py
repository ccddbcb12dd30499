"""The GPU serving checks (tests/gpu/serving) on CPU, with real vLLM and a tiny random Qwen3, so that
their code runs in CI: vLLM's prompt log-probabilities equal transformers' on the weights vLLM exported
(attached over the shared-memory file, re-initialized in place), within a tolerance that a wrong query-head
order exceeds; a sentence taught through POST /train comes back verbatim; after POST /checkpoint and a
restart on the checkpoint directory, the same answer."""

import pytest

from onlinemodel_runtime.devtools import served_checks as sc
from onlinemodel_runtime.devtools.model_prep import make_tiny_model_dir

from .conftest import EAGER, start_server

pytestmark = pytest.mark.e2e


def test_served_tiny_qwen3_logits_teach_checkpoint_restart(model_dir, e2e_root):
    tiny = make_tiny_model_dir("qwen3", e2e_root / "tiny-qwen3", tokenizer_dir=model_dir)
    ckpt, state = e2e_root / "tiny-checkpoints", e2e_root / "tiny-state"
    server = start_server(tiny, e2e_root, "tiny-1", checkpoint_dir=ckpt,
                          extra_args=["--max-model-len", "1024", "--state-dir", str(state), *EAGER])
    try:
        sc.randomize_served(state, tiny)  # as the GPU tests do with vLLM's dummy weights
        compared = sc.compare_served_logprobs(server, state, tiny, sc.PROMPT)
        close, wrong = compared["close"], compared["wrong"]
        print("logprobs", close, "rolled heads", wrong)
        assert close["reference_spread"] > 1.0, close
        assert close["mean"] < sc.logprob_tolerance(tiny), close
        assert wrong["mean"] > sc.POWER * sc.logprob_tolerance(tiny), wrong

        taught = sc.teach(server)
        print("taught", taught)
        assert taught["answer"] == sc.SENTENCE, taught
        code, info = server.request("POST", "/checkpoint")
        assert code == 200, info
        before = server.status()
    finally:
        server.stop()
    server = start_server(tiny, e2e_root, "tiny-2", checkpoint_dir=ckpt,
                          extra_args=["--max-model-len", "1024", "--state-dir", str(e2e_root / "tiny-state-2"), *EAGER])
    try:
        after = server.status()
        assert (after["steps"], after["weight_version"]) == (before["steps"], before["weight_version"])
        assert after["checkpoint"]["last"]["path"] == info["path"]
        assert server.chat(sc.QUESTION, max_tokens=48).strip() == sc.SENTENCE
    finally:
        server.stop()
