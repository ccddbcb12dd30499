"""The chunked loss is transformers' causal-LM loss, without ever keeping a full set of logits."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from onlinemodel_runtime.trainer.loss import LOSS_CHUNK_BYTES, causal_lm_loss, loss_chunk_tokens

from trainer_fixtures import example, tiny_llama


def batch(tokens: int = 40, prompt: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    ids, labels = example(tokens, prompt)
    return torch.tensor([ids]), torch.tensor([labels])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("chunk", [None, 1, 7, 29, 1000])
def test_loss_equals_transformers(dtype, tied, chunk):
    model = tiny_llama(dtype=dtype, tied=tied)
    ids, labels = batch()
    expected = model(input_ids=ids, labels=labels, use_cache=False).loss
    got = causal_lm_loss(model, ids, labels, chunk)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected.float(), rtol=1e-6 if dtype == torch.float32 else 1e-5, atol=0)


def test_gradients_equal_transformers():
    ours, theirs = tiny_llama(dtype=torch.float32, tied=False), None
    theirs = copy.deepcopy(ours)
    ids, labels = batch()
    causal_lm_loss(ours, ids, labels, 6).backward()
    theirs(input_ids=ids, labels=labels, use_cache=False).loss.backward()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_no_label_gives_nan_like_transformers():
    model = tiny_llama()
    ids, labels = batch(prompt=40)
    assert math.isnan(float(causal_lm_loss(model, ids, labels)))
    assert math.isnan(float(model(input_ids=ids, labels=labels, use_cache=False).loss.detach()))


def _largest_saved(fn) -> int:
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return max(sizes)


def test_full_logits_are_never_kept_for_backward():
    model = tiny_llama(dtype=torch.float32, tied=False, vocab=2000)  # logits dwarf every activation
    ids, labels = batch(tokens=64, prompt=0)
    full_logits = 64 * model.config.vocab_size
    # The probe sees transformers keep them (a control for the probe itself)...
    assert _largest_saved(lambda: model(input_ids=ids, labels=labels, use_cache=False).loss) >= full_logits
    # ... and a chunked loss keep nothing of that size: chunks are recomputed in backward.
    assert _largest_saved(lambda: causal_lm_loss(model, ids, labels, 8)) < full_logits // 4


def test_chunk_tokens_by_bytes_and_by_the_pacers_bound():
    assert loss_chunk_tokens(151936) == LOSS_CHUNK_BYTES // (4 * 151936) == 441
    assert loss_chunk_tokens(151936, max_tokens=80) == 80
    assert loss_chunk_tokens(151936, max_tokens=10_000) == 441
    assert loss_chunk_tokens(10**12) == 1
