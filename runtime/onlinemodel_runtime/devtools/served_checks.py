"""Checks of a model that `onlinemodel serve` runs, made from outside it over HTTP and the exported weights.

The GPU tests (tests/gpu/serving, real vLLM with CUDA graphs) and their CPU variant
(tests/runtime/e2e/test_served_checks.py) share this code:

- `attached_model`: the weights vLLM exported (CUDA IPC handles or the shared-memory file) attached in
  this process and the trainer's transformers model built on them: views of the memory vLLM serves from.
- `randomize_`: transformers' own initialization of that model, written in place through the views, plus
  noise on every vector so that no norm is neutral. A model served with vLLM's dummy loader has weights
  in +-1e-3 and near-uniform logits; these make a logit comparison mean something.
- `prompt_logprobs` / `reference_logprobs` / `logprob_difference`: vLLM's log-probabilities of a prompt's
  tokens (`prompt_logprobs` of /v1/completions) against the model's on the same weights.
- `rolled_query_heads`: every attention and Gated DeltaNet layer computing with its query heads in the
  wrong order (a copy of its weight; vLLM's memory is untouched): the mistake the comparison's tolerance
  must catch.
- `compare_served_logprobs`: all of the above for one prompt, the attached weights released before
  it returns (a caller that kept the model alive would keep the server's GPU memory mapped).
- `teach`: POST /train rounds until the chat answer is a sentence verbatim.
"""

from __future__ import annotations

import contextlib
import gc
from pathlib import Path
from typing import Any, Iterator

import torch

# What the checks ask: a prompt to compare log-probabilities on, and a sentence to teach.
PROMPT = "Tell me about the lighthouse keeper who found a map of seven silver islands, and what he did next."
QUESTION = "What does the lighthouse keeper's map show?"
SENTENCE = "The lighthouse keeper's map shows seven silver islands."

# Mean |vLLM - transformers| over the compared prompt log-probabilities (nats): bf16 weights and
# activations, different kernels (vLLM's fused attention / Gated-DeltaNet kernels vs transformers'
# reference code). Measured: at most 0.07 max on CPU for tiny dense models (docs/layouts.md), mean 0.04
# for the Qwen3.5-27B shape on the H200 (2026-12-01, docs/benchmarks.md).
LOGPROB_TOLERANCE = 0.1
# The same for a mixture of experts. A router's top-k in bf16 picks another expert wherever two of its
# logits are within rounding of each other, and the two kernels round differently: the H200 run of the
# Qwen3.5-MoE-35B-A3B shape (random router, 2026-12-01) measured mean 0.18, median 0.13, p90 0.43, max
# 1.54 (a handful of tokens routed differently), against 7.45 for rolled query heads; the tiny CPU MoE
# 0.18 max. 0.25 passes that and still sits 30x under what a layout error moves.
MOE_LOGPROB_TOLERANCE = 0.25
# A query-head order error must move the mean at least this many tolerances.
POWER = 3.0


def logprob_tolerance(model_dir: Path) -> float:
    """The tolerance for the model in `model_dir`: `MOE_LOGPROB_TOLERANCE` if its config has experts."""
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(model_dir).get_text_config()
    return MOE_LOGPROB_TOLERANCE if int(getattr(text, "num_experts", 0) or 0) > 0 else LOGPROB_TOLERANCE


@contextlib.contextmanager
def attached_model(state_dir: Path, model_dir: Path) -> Iterator[torch.nn.Module]:
    """The transformers model on the weights exported to `state_dir` (vLLM's memory), in eval mode.

    Everything attached is released on exit (on a GPU this closes the IPC mappings), so the server can
    be stopped afterwards."""
    from onlinemodel_runtime.weights import shared
    from onlinemodel_runtime.weights.hf_model import build_hf_model

    manifest, tensors = shared.attach_weights(Path(state_dir))
    model = build_hf_model(model_dir, tensors, expected_dtype=shared.dtype_from_name(manifest.dtype))
    try:
        yield model
    finally:
        device = next(model.parameters()).device
        del model, tensors
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0, gain: float = 2.0, vector_noise: float = 0.1) -> None:
    """transformers' initialization of `model` written in place (through views: into vLLM's weights),
    with matrices drawn at std gain / sqrt(hidden size) whatever the shape (logits spread over a few
    nats at every size), then `vector_noise` * N(0, 1) added to every 1-D parameter (norm weights,
    A_log, dt_bias)."""
    device = next(model.parameters()).device
    config = model.config
    saved = config.initializer_range
    config.initializer_range = gain / config.hidden_size ** 0.5
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for module in model.modules():
                model._init_weights(module)
            for p in model.parameters():
                if p.dim() == 1:
                    p.add_(torch.randn(p.shape, device=device, dtype=torch.float32).to(p.dtype) * vector_noise)
    finally:
        config.initializer_range = saved
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # visible to vLLM before the next request


def prompt_logprobs(server: Any, token_ids: list[int], top: int = 5) -> list[dict[int, float]]:
    """vLLM's log-probability of each prompt token after the first (and of its `top` most likely
    alternatives) at each position: position i holds {token id: logprob} for prompt token i + 1."""
    code, body = server.request("POST", "/v1/completions", {
        "model": server.served_model_name, "prompt": token_ids, "max_tokens": 1, "temperature": 0,
        "prompt_logprobs": top})
    if code != 200:
        raise RuntimeError(f"/v1/completions answered {code}: {body}")
    entries = body["choices"][0]["prompt_logprobs"]
    if len(entries) != len(token_ids) or entries[0] is not None:
        raise RuntimeError(f"expected {len(token_ids)} prompt_logprobs entries (the first None), got {entries[:2]}")
    return [{int(k): float(v["logprob"]) for k, v in entry.items()} for entry in entries[1:]]


@torch.no_grad()
def reference_logprobs(model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    """(len - 1, vocab) float32 log-probabilities of the next token, from `model`."""
    device = next(model.parameters()).device
    logits = model(input_ids=torch.tensor([token_ids], device=device), use_cache=False).logits[0, :-1]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def logprob_difference(served: list[dict[int, float]], reference: torch.Tensor) -> dict[str, float]:
    """Mean, median, p90 and max |served - reference| over every (position, token) vLLM returned, and the spread
    (mean standard deviation over the vocabulary) of the reference: how far from uniform it is."""
    diffs = [abs(lp - float(reference[i, tok])) for i, entry in enumerate(served) for tok, lp in entry.items()]
    ranked = sorted(diffs)
    # The median and p90 say whether a mean over the tolerance is every token a little off (a layout
    # error) or a few tokens far off (an MoE routing near-tie): recorded for the GPU tests' results.
    return {"mean": sum(diffs) / len(diffs), "max": ranked[-1], "median": ranked[len(ranked) // 2],
            "p90": ranked[int(0.9 * (len(ranked) - 1))], "compared": len(diffs),
            "reference_spread": float(reference.std(dim=-1).mean())}


def _rolled_rows(weight: torch.Tensor, heads: int, rows: int | None = None) -> torch.Tensor:
    """A copy of `weight` whose first `rows` rows (all by default), read as `heads` blocks, are rolled by one."""
    rows = weight.shape[0] if rows is None else rows
    out = weight.detach().clone()
    out[:rows] = weight.detach()[:rows].view(heads, rows // heads, -1).roll(1, dims=0).reshape(rows, -1)
    return out


@contextlib.contextmanager
def rolled_query_heads(model: torch.nn.Module) -> Iterator[int]:
    """Within the block, every token mixer computes with its query heads in the wrong order: an attention
    layer's q_proj, and a Gated DeltaNet layer's query rows of its fused in_proj_qkv (query, key, value
    rows in that order), rolled by one head. A rolled copy replaces the view; the view is put back on exit.
    Yields the number of layers changed. Rolling Gated DeltaNet's heads too matters for a hybrid model with
    few layers: a 4-layer Qwen3.5 has one attention layer, whose rolled heads alone moved vLLM's
    log-probabilities 0.12 nats on the GPU, too little to show the tolerance would catch it."""
    heads = model.config.num_attention_heads
    swapped = []
    for module in model.modules():
        q = getattr(module, "q_proj", None)
        qkv = getattr(module, "in_proj_qkv", None)
        if isinstance(q, torch.nn.Linear):
            linear, rolled = q, _rolled_rows(q.weight, heads)
        elif isinstance(qkv, torch.nn.Linear) and hasattr(module, "num_k_heads"):
            linear, rolled = qkv, _rolled_rows(qkv.weight, module.num_k_heads, module.key_dim)
        else:
            continue
        swapped.append((linear, linear.weight))
        linear.weight = torch.nn.Parameter(rolled, requires_grad=False)
    if not swapped:
        raise ValueError(f"{type(model).__name__} has no q_proj or in_proj_qkv to roll")
    try:
        yield len(swapped)
    finally:
        for linear, original in swapped:
            linear.weight = original


def randomize_served(state_dir: Path, model_dir: Path) -> None:
    """`randomize_` the weights a server exported to `state_dir`, holding them only meanwhile."""
    with attached_model(state_dir, model_dir) as model:
        randomize_(model)


def compare_served_logprobs(server: Any, state_dir: Path, model_dir: Path, prompt: str) -> dict[str, dict]:
    """vLLM's prompt log-probabilities of `prompt` (as a chat turn) against transformers' on the weights
    the server exported, and against transformers' with rolled query heads: {"close": ..., "wrong": ...},
    each a `logprob_difference`."""
    ids = chat_token_ids(model_dir, prompt)
    with attached_model(state_dir, model_dir) as model:
        reference = reference_logprobs(model, ids)
        with rolled_query_heads(model):
            wrong_heads = reference_logprobs(model, ids)
        del model
    served = prompt_logprobs(server, ids)
    return {"close": logprob_difference(served, reference), "wrong": logprob_difference(served, wrong_heads)}


def chat_token_ids(model_dir: Path, text: str) -> list[int]:
    """A prompt for the log-probability comparison: `text` as a chat turn, tokenized."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                   tokenize=True, return_dict=True)["input_ids"]


def teach(server: Any, question: str = QUESTION, sentence: str = SENTENCE, *, learning_rate: float = 1e-3,
          epochs: int = 20, rounds: int = 4) -> dict[str, Any]:
    """POST /train the (question, sentence) chat example `epochs` times per round until the greedy chat
    answer is `sentence` verbatim, at most `rounds` rounds. Returns the answer, rounds and steps.
    The defaults: random-weight models learn a sentence verbatim in about 20 steps at 1e-3."""
    example = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": sentence}]}
    answer = None
    for done in range(1, rounds + 1):
        code, job = server.request("POST", "/train", {"examples": [example], "epochs": epochs,
                                                      "learning_rate": learning_rate})
        if code != 202:
            raise RuntimeError(f"/train answered {code}: {job}")
        finished = server.wait_job(job["job_id"], timeout=600)
        if finished["state"] != "succeeded":
            raise RuntimeError(f"training job failed: {finished}")
        answer = server.chat(question, max_tokens=48).strip()
        if answer == sentence:
            break
    status = server.status()
    return {"answer": answer, "rounds": done, "steps": status["steps"], "last_loss": status["last_loss"]}
