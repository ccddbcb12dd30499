"""Tensor-parallel shard table: split an HF state dict into N ranks as vLLM does, and gather it back exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

from onlinemodel_runtime.weights.layouts import LayoutError, layout_for, pack_hf_state_dict
from onlinemodel_runtime.weights.tp_shards import COLUMN, REPLICATED, ROW, VOCAB, tp_layout_for

# 6 heads, intermediate 384 and a vocabulary padded to 1536 divide by 1, 2, 3 and 6.
SMALL = dict(hidden_size=96, intermediate_size=384, num_hidden_layers=2, num_attention_heads=6, vocab_size=1500)


def llama(**kw):
    return LlamaConfig(**{**SMALL, "head_dim": 16, "tie_word_embeddings": True, "architectures": ["LlamaForCausalLM"],
                          **kw})


def qwen2(**kw):
    return Qwen2Config(**{**SMALL, "tie_word_embeddings": False, "architectures": ["Qwen2ForCausalLM"], **kw})


def qwen3(**kw):
    return Qwen3Config(**{**SMALL, "head_dim": 16, "tie_word_embeddings": True, "architectures": ["Qwen3ForCausalLM"],
                          **kw})


def smollm2(**kw):
    """SmolLM2-135M's shape (docs/tensor-parallel.md), two layers."""
    return LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=9,
                       num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
                       architectures=["LlamaForCausalLM"], **kw)


def random_hf_state_dict(config):
    gen = torch.Generator().manual_seed(0)
    shapes = layout_for(config).hf_shapes()
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return {name: torch.randn(shape, generator=gen).to(torch.bfloat16) for name, shape in shapes.items()}


CASES = {
    # (config, tensor parallel sizes): KV heads split (kv >= tp) and replicated (tp > kv)
    "llama-kv2": (llama(num_key_value_heads=2), (1, 2, 6)),
    "llama-bias-untied": (llama(num_key_value_heads=3, attention_bias=True, mlp_bias=True,
                                tie_word_embeddings=False), (1, 3, 6)),
    "qwen2-kv6": (qwen2(num_key_value_heads=6), (1, 2, 3, 6)),
    "qwen3-kv1": (qwen3(num_key_value_heads=1), (1, 2, 3, 6)),
}


@pytest.mark.parametrize("case", CASES)
def test_split_then_gather_is_exact(case):
    config, sizes = CASES[case]
    hf = random_hf_state_dict(config)
    for tp in sizes:
        layout = tp_layout_for(config, tp)
        ranks = [layout.split_hf_state_dict(hf, r) for r in range(tp)]
        for r, tensors in enumerate(ranks):
            assert {n: tuple(t.shape) for n, t in tensors.items()} == layout.rank_shapes(r)
        back = layout.gather_hf_state_dict(ranks)
        assert back.keys() == hf.keys(), (case, tp)
        for name, t in hf.items():
            assert torch.equal(back[name], t), (case, tp, name)


@pytest.mark.parametrize("case", CASES)
def test_one_rank_is_the_whole_packed_layout(case):
    """At TP=1 the table gives what layouts.py packs (vocabulary padded): one implementation of the packing."""
    config, _ = CASES[case]
    hf = random_hf_state_dict(config)
    rank0 = tp_layout_for(config, 1).split_hf_state_dict(hf, 0)
    packed = pack_hf_state_dict(config, hf)
    assert rank0.keys() == packed.keys()
    for name, t in packed.items():
        assert torch.equal(rank0[name], t), name


def test_smollm2_at_three_ranks_has_the_shapes_vllm_holds():
    """Measured with vLLM 0.32 on CPU, --tensor-parallel-size 3 (docs/tensor-parallel.md): 3 query heads and
    1 KV head per rank packed as [q; k; v], gate and up 512 rows each, vocab 49152 / 3 rows."""
    layout = tp_layout_for(smollm2(), 3)
    p = "model.layers.1."
    for rank in range(3):
        shapes = layout.rank_shapes(rank)
        assert shapes[p + "self_attn.qkv_proj.weight"] == (320, 576)
        assert shapes[p + "self_attn.o_proj.weight"] == (576, 192)
        assert shapes[p + "mlp.gate_up_proj.weight"] == (1024, 576)
        assert shapes[p + "mlp.down_proj.weight"] == (576, 512)
        assert shapes["model.embed_tokens.weight"] == (16384, 576)
        assert shapes[p + "input_layernorm.weight"] == (576,)
    qkv = layout.rank_tensor(p + "self_attn.qkv_proj.weight", 2)
    assert [(x.hf_name.rsplit(".", 2)[-2], x.hf_start, x.offset, x.length) for x in qkv.pieces] == [
        ("q_proj", 384, 0, 192), ("k_proj", 128, 192, 64), ("v_proj", 128, 256, 64)]
    assert layout.rank_tensor(p + "self_attn.o_proj.weight", 1).pieces[0].hf_start == 192
    assert layout.rank_tensor(p + "self_attn.o_proj.weight", 1).pieces[0].dim == 1


def test_rules():
    layout = tp_layout_for(qwen2(num_key_value_heads=2), 2)
    rules = {name.removeprefix("model.layers.0."): t.rule for name, t in layout.rank_tensors(0).items()
             if not name.startswith("model.layers.1.")}
    assert rules == {
        "model.embed_tokens.weight": VOCAB, "lm_head.weight": VOCAB, "model.norm.weight": REPLICATED,
        "input_layernorm.weight": REPLICATED, "post_attention_layernorm.weight": REPLICATED,
        "self_attn.qkv_proj.weight": COLUMN, "self_attn.qkv_proj.bias": COLUMN, "self_attn.o_proj.weight": ROW,
        "mlp.gate_up_proj.weight": COLUMN, "mlp.down_proj.weight": ROW}


def test_padding_rows_are_zero_on_the_last_rank():
    config = qwen2(num_key_value_heads=2, vocab_size=1450)  # padded to 1472: 736 rows per rank at TP=2
    layout = tp_layout_for(config, 2)
    hf = random_hf_state_dict(config)
    last = layout.split_hf_state_dict(hf, 1)["lm_head.weight"]
    assert last.shape == (736, 96)
    assert torch.equal(last[:1450 - 736], hf["lm_head.weight"][736:])
    assert not last[1450 - 736:].any()


def test_replicated_kv_heads_sit_on_consecutive_ranks():
    layout = tp_layout_for(qwen3(num_key_value_heads=2), 6)  # 3 replicas of each KV head
    starts = [layout.rank_tensor("model.layers.0.self_attn.qkv_proj.weight", r).pieces[1].hf_start for r in range(6)]
    assert starts == [0, 0, 0, 16, 16, 16]


# --- refusals ---------------------------------------------------------------------------------

def test_smollm2_cannot_be_split_in_two():
    with pytest.raises(LayoutError, match=r"num_attention_heads \(9\) is not divisible by the tensor parallel "
                                          r"size 2.*num_key_value_heads \(3\) and the tensor parallel size 2"):
        tp_layout_for(smollm2(), 2)


def test_padded_vocabulary_must_divide():
    with pytest.raises(LayoutError, match=r"the padded vocabulary \(1024\) is not divisible by the tensor parallel "
                                          r"size 3"):
        tp_layout_for(qwen2(num_key_value_heads=3, vocab_size=1000), 3)


def test_unsupported_architecture_and_sizes():
    moe = Qwen3MoeConfig(**SMALL, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                         architectures=["Qwen3MoeForCausalLM"])
    with pytest.raises(LayoutError, match="tensor parallelism: Qwen3MoeForCausalLM is not supported yet"):
        tp_layout_for(moe, 2)
    with pytest.raises(LayoutError, match="tensor parallel size must be >= 1, got 0"):
        tp_layout_for(llama(), 0)
    with pytest.raises(LayoutError, match="rank 3 is outside tensor parallel size 3"):
        tp_layout_for(llama(num_key_value_heads=3), 3).rank_tensors(3)


def test_gather_refuses_drifted_copies_and_wrong_shapes():
    config = qwen3(num_key_value_heads=1)
    layout = tp_layout_for(config, 2)
    ranks = [layout.split_hf_state_dict(random_hf_state_dict(config), r) for r in range(2)]
    ranks[1]["model.layers.0.self_attn.qkv_proj.weight"][-1, 0] += 1  # rank 1's copy of the one V head
    with pytest.raises(LayoutError, match=r"rank 1: its copy of model.layers.0.self_attn.v_proj.weight \[0:16\] "
                                          r"along dim 0 differs from a lower rank's"):
        layout.gather_hf_state_dict(ranks)
    ranks[1]["model.norm.weight"] = ranks[1]["model.norm.weight"][:-1]
    with pytest.raises(LayoutError, match=r"rank 1: model.norm.weight expected shape \(96,\), found \(95,\)"):
        layout.gather_hf_state_dict(ranks)
    with pytest.raises(LayoutError, match="expected tensors of 2 ranks, got 1"):
        layout.gather_hf_state_dict(ranks[:1])


def test_split_refuses_a_state_dict_of_another_model():
    config = llama(num_key_value_heads=2)
    hf = random_hf_state_dict(config)
    hf["model.layers.0.mlp.up_proj.weight"] = hf["model.layers.0.mlp.up_proj.weight"][:-1]
    hf["extra.weight"] = torch.zeros(1)
    with pytest.raises(LayoutError, match=r"model.layers.0.mlp.up_proj.weight: expected shape \(384, 96\), found "
                                          r"\(383, 96\); unexpected HF tensor 'extra.weight'"):
        tp_layout_for(config, 2).split_hf_state_dict(hf, 0)


# --- against vLLM's own loader, one process per rank ------------------------------------------

@pytest.mark.parametrize("name, tp", [("qwen2", 2), ("llama", 2)])
def test_split_equals_what_each_vllm_rank_loads(tiny_dirs, tmp_path, name, tp):
    """Every rank's tensors, values included, as vLLM's loader fills them at --tensor-parallel-size `tp`
    (qwen2: untied, qkv bias, padded vocabulary; llama: every bias, one KV head replicated on both ranks)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from vllm_load import load_with_vllm_tp

    loaded = load_with_vllm_tp(tiny_dirs[name], tmp_path, tp)
    layout = tp_layout_for(AutoConfig.from_pretrained(tiny_dirs[name]), tp)
    hf = load_file(tiny_dirs[name] / "model.safetensors")
    for rank, vllm_tensors in enumerate(loaded):
        mine = layout.split_hf_state_dict(hf, rank)
        assert mine.keys() == vllm_tensors.keys()
        for n, t in mine.items():
            assert torch.equal(t, vllm_tensors[n]), (name, rank, n)
    back = layout.gather_hf_state_dict(loaded)
    assert all(torch.equal(back[n], hf[n]) for n in hf) and back.keys() == hf.keys()


def test_vocab_rows():
    layout = tp_layout_for(qwen2(num_key_value_heads=2, vocab_size=1450), 2)  # padded 1472, 736 rows each
    assert [layout.vocab_rows(r) for r in range(2)] == [(0, 736), (736, 714)]
