"""A tensor-parallel rank's model: two gloo processes compute the TP=1 model's logits, loss and gradients."""

from __future__ import annotations

import multiprocessing

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from onlinemodel_runtime.weights.layouts import LayoutError
from onlinemodel_runtime.weights.tp_model import (build_tp_rank_model, partial_gradient_names,
                                                  vocab_parallel_cross_entropy, vocab_parallel_top2)
from onlinemodel_runtime.weights.tp_shards import tp_layout_for

TP = 2


def llama(**kw):
    return LlamaConfig(**{**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16, vocab_size=150, dtype="float32",
                                 architectures=["LlamaForCausalLM"]), **kw})


CONFIGS = {"tied": llama(tie_word_embeddings=True),
           "untied-bias": llama(tie_word_embeddings=False, attention_bias=True, mlp_bias=True),
           # one KV head on both ranks, and q/k norms: gradients partial per rank
           "qwen3-kv1": Qwen3Config(**{**llama().to_dict(), "num_key_value_heads": 1, "tie_word_embeddings": True,
                                       "architectures": ["Qwen3ForCausalLM"]})}


def whole_model(config):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # non-zero biases, so a bias added twice would show
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    return model


def reference(config, ids):
    model = whole_model(config)
    logits = model(input_ids=ids).logits[0]
    loss = torch.nn.functional.cross_entropy(logits, ids[0], reduction="none")
    loss.mean().backward()
    return model, logits.detach(), loss.detach()


def _rank(rank, case, init_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=TP)
    config = CONFIGS[case]
    ids = torch.tensor([[3, 77, 149, 0, 74, 75, 12]])
    model, logits, loss = reference(config, ids)
    hf = {n: p.detach() for n, p in model.named_parameters()}
    layout = tp_layout_for(config, TP)
    mine = build_tp_rank_model(config, layout.split_hf_state_dict(hf, rank), rank, TP, requires_grad=True,
                               expected_dtype=torch.float32)
    local = mine(input_ids=ids).logits[0]
    start, real = layout.vocab_rows(rank)
    torch.testing.assert_close(local[:, :real], logits[:, start:start + real], rtol=1e-5, atol=1e-5)
    my_loss = vocab_parallel_cross_entropy(local, ids[0], layout.vocab_rows(rank))
    torch.testing.assert_close(my_loss, loss, rtol=1e-5, atol=1e-5)
    values, ids = vocab_parallel_top2(local.detach(), layout.vocab_rows(rank))
    whole = logits.detach().float().topk(2, dim=-1)
    assert torch.equal(ids, whole.indices)
    torch.testing.assert_close(values, whole.values, rtol=1e-5, atol=1e-5)
    my_loss.mean().backward()
    grads = {n: p.grad for n, p in mine.named_parameters()}
    for name in partial_gradient_names(layout):  # every rank holds the same rows here: sum over all
        dist.all_reduce(grads[name])
    full = {n: p.grad for n, p in model.named_parameters()}
    checked = 0
    for t in layout.rank_tensors(rank).values():
        for p in t.pieces:
            if rank > 0 and p.hf_name.endswith(("o_proj.bias", "down_proj.bias")):
                assert p.hf_name not in grads  # rank 0 adds the row-parallel bias
                continue
            torch.testing.assert_close(grads[p.hf_name].narrow(p.dim, 0, p.length),
                                       full[p.hf_name].narrow(p.dim, p.hf_start, p.length), rtol=1e-4, atol=1e-6,
                                       msg=lambda m, n=p.hf_name: f"rank {rank} {n}: {m}")
            checked += 1
    assert checked >= 20
    assert bool(partial_gradient_names(layout)) == (case == "qwen3-kv1")
    dist.destroy_process_group()


@pytest.mark.parametrize("case", CONFIGS)
def test_two_ranks_compute_the_whole_model(case, tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, case, str(tmp_path / "init"))) for r in range(TP)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * TP


def test_qwen2_is_refused():
    from transformers import Qwen2Config

    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=150, architectures=["Qwen2ForCausalLM"])
    with pytest.raises(LayoutError, match="tensor-parallel training: Qwen2ForCausalLM is not supported yet"):
        build_tp_rank_model(config, {}, 0, TP)
    with pytest.raises(LayoutError, match="rank 2 is outside tensor parallel size 2"):
        build_tp_rank_model(llama(), {}, 2, TP)
