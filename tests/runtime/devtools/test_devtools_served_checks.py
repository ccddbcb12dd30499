"""The pieces of the served-model checks (tests/gpu/serving and its CPU variant) on vLLM's loaded tensors,
without a server: the in-place re-initialization reaches vLLM's tensors, and the log-probability tolerance
catches a wrong query-head order in every architecture the GPU tests serve."""

from __future__ import annotations

import pytest
import torch

from onlinemodel_runtime.devtools import served_checks as sc
from onlinemodel_runtime.weights.hf_model import assert_views_of, build_hf_model


def _served_by_reference(ref: torch.Tensor, ids: list[int]) -> list[dict[int, float]]:
    """What vLLM's prompt_logprobs would hold if it computed exactly `ref`: each prompt token and the top 5."""
    return [{ids[i + 1]: float(ref[i, ids[i + 1]]), **{int(t): float(ref[i, t]) for t in ref[i].topk(5).indices}}
            for i in range(len(ids) - 1)]


@pytest.mark.parametrize("name", ["qwen3", "qwen3_moe", "qwen3_5", "qwen3_5_moe"])
def test_the_tolerance_catches_rolled_query_heads(tiny_dirs, vllm_loaded, name):
    tensors = {n: t.clone() for n, t in vllm_loaded[name]["params"].items()}
    before = {n: t.clone() for n, t in tensors.items()}
    model = build_hf_model(tiny_dirs[name], tensors)
    sc.randomize_(model)
    attached = {n for n in tensors if not n.startswith("visual.")}
    assert all(not torch.equal(tensors[n], before[n]) for n in attached)  # written into vLLM's tensors
    ids = sc.chat_token_ids(tiny_dirs[name], sc.PROMPT)
    ref = sc.reference_logprobs(model, ids)
    served = _served_by_reference(ref, ids)
    same = sc.logprob_difference(served, ref)
    assert same["mean"] == same["max"] == 0.0 and same["compared"] >= 5 * (len(ids) - 1)
    assert same["reference_spread"] > 1.0  # far from uniform: a comparison with power
    with sc.rolled_query_heads(model) as layers:
        wrong = sc.logprob_difference(served, sc.reference_logprobs(model, ids))
    assert layers == model.config.num_hidden_layers  # attention and Gated DeltaNet layers alike
    assert wrong["mean"] > sc.POWER * sc.logprob_tolerance(tiny_dirs[name]), wrong
    assert_views_of(model, tensors)  # the views are back ...
    assert torch.equal(sc.reference_logprobs(model, ids), ref)  # ... and compute what they did


def test_a_mixture_of_experts_gets_the_moe_tolerance(tiny_dirs):
    assert [sc.logprob_tolerance(tiny_dirs[n]) for n in ("qwen3", "qwen3_moe", "qwen3_5", "qwen3_5_moe")] == [
        sc.LOGPROB_TOLERANCE, sc.MOE_LOGPROB_TOLERANCE, sc.LOGPROB_TOLERANCE, sc.MOE_LOGPROB_TOLERANCE]


def test_prompt_logprobs_reads_vllms_answer():
    class FakeServer:
        served_model_name = "m"

        def request(self, method, path, body):
            assert (method, path, body["prompt"], body["prompt_logprobs"]) == ("POST", "/v1/completions", [5, 6, 7], 2)
            return 200, {"choices": [{"prompt_logprobs": [
                None, {"6": {"logprob": -1.5, "rank": 2, "decoded_token": "a"}},
                {"7": {"logprob": -0.25, "rank": 1, "decoded_token": "b"}, "9": {"logprob": -3.0, "rank": 2}}]}]}

    assert sc.prompt_logprobs(FakeServer(), [5, 6, 7], top=2) == [{6: -1.5}, {7: -0.25, 9: -3.0}]
