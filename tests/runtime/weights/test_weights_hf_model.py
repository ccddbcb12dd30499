"""The mapping acceptance test: a view-backed HF model computes what transformers computes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from onlinemodel_runtime.devtools.model_prep import ensure_smollm2, make_tiny_model_dir
from onlinemodel_runtime.weights.hf_model import assert_views_of, build_hf_model, storage_ranges
from onlinemodel_runtime.weights.layouts import LayoutError, layout_for, pack_hf_state_dict


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("views")
    smol = ensure_smollm2()
    return {
        "qwen3": make_tiny_model_dir("qwen3", root / "qwen3", tokenizer_dir=smol),
        # Qwen2: qkv bias, untied head, vocabulary padded by vLLM (49160 -> 49216 rows).
        "qwen2": make_tiny_model_dir("qwen2", root / "qwen2", tokenizer_dir=smol, vocab_size=49160),
        "smollm2": smol,  # Llama, tied embeddings, 30 layers
    }


def _reference_and_views(model_dir):
    ref = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    # What vLLM holds: merged, padded tensors in fresh memory (not shared with `ref`).
    packed = pack_hf_state_dict(ref.config, ref.state_dict())
    model = build_hf_model(model_dir, packed)
    return ref, packed, model


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "smollm2"])
def test_logits_equal_transformers(model_dirs, arch):
    ref, packed, model = _reference_and_views(model_dirs[arch])
    assert type(model) is type(ref)
    ids = torch.randint(0, ref.config.vocab_size, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(ids).logits
        got = model(ids).logits
    assert got.shape == expected.shape == (2, 23, ref.config.vocab_size)
    assert torch.equal(got, expected)

    # Zero copy: every parameter lies in the packed tensors' memory.
    assert_views_of(model, packed)
    packed_storages = {t.untyped_storage().data_ptr() for t in packed.values()}
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert param_storages <= packed_storages
    assert sum(p.numel() for p in model.parameters()) <= sum(t.numel() for t in packed.values())

    # Buffers were computed like transformers does, on the weights' device.
    assert torch.equal(model.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq)
    assert model.model.rotary_emb.inv_freq.device == packed["model.norm.weight"].device

    # Writing through a view changes the packed vLLM tensor at the right rows.
    layer = model.model.layers[1].self_attn
    qkv = packed["model.layers.1.self_attn.qkv_proj.weight"]
    q_rows = layer.q_proj.weight.shape[0]
    k_rows = layer.k_proj.weight.shape[0]
    before = qkv.clone()
    with torch.no_grad():
        layer.k_proj.weight.fill_(0.5)
    assert torch.all(qkv[q_rows:q_rows + k_rows] == 0.5)
    assert torch.equal(qkv[:q_rows], before[:q_rows])
    assert torch.equal(qkv[q_rows + k_rows:], before[q_rows + k_rows:])
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 4] = 7.0
    inter = model.config.intermediate_size
    assert packed["model.layers.0.mlp.gate_up_proj.weight"][inter + 3, 4] == 7.0


def test_tied_embeddings_stay_tied(model_dirs):
    _, packed, model = _reference_and_views(model_dirs["qwen3"])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        model.lm_head.weight[5].fill_(3.0)
    assert torch.all(packed["model.embed_tokens.weight"][5] == 3.0)
    # q/k/v and gate/up are separate HF parameters; lm_head is not one more.
    assert len(list(model.parameters())) == len(layout_for(model.config).hf_to_vllm) - 1


def test_untied_padded_head(model_dirs):
    ref, packed, model = _reference_and_views(model_dirs["qwen2"])
    assert packed["lm_head.weight"].shape[0] == 49216
    assert model.lm_head.weight.shape[0] == 49160
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.model.layers[0].self_attn.q_proj.bias.data_ptr() == \
        packed["model.layers.0.self_attn.qkv_proj.bias"].data_ptr()


def test_training_step_updates_vllm_memory_in_place(model_dirs):
    _, packed, model = _reference_and_views(model_dirs["qwen3"])
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    before = packed["model.layers.0.self_attn.qkv_proj.weight"].clone()
    ptr = packed["model.layers.0.self_attn.qkv_proj.weight"].data_ptr()
    ids = torch.randint(0, 1000, (1, 12))
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert model.model.layers[0].self_attn.v_proj.weight.grad.shape == (64, 128)
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    after = packed["model.layers.0.self_attn.qkv_proj.weight"]
    assert after.data_ptr() == ptr
    assert not torch.equal(before, after)


def test_flags(model_dirs):
    ref = AutoModelForCausalLM.from_pretrained(model_dirs["qwen3"])
    packed = pack_hf_state_dict(ref.config, ref.state_dict())
    model = build_hf_model(ref.config, packed, requires_grad=True, train=True)
    assert model.training and all(p.requires_grad for p in model.parameters())
    model = build_hf_model(ref.config, packed)
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_llama_with_biases_from_config():
    """attention_bias and mlp_bias variants of Llama, without a directory."""
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=64, vocab_size=500, attention_bias=True, mlp_bias=True,
                         tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.1)
    packed = pack_hf_state_dict(config, ref.state_dict())
    assert "model.layers.0.self_attn.o_proj.bias" in packed
    model = build_hf_model(config, packed, expected_dtype=torch.float32)
    ids = torch.randint(0, 500, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_mismatch_is_refused_before_building(model_dirs):
    ref = AutoModelForCausalLM.from_pretrained(model_dirs["qwen3"])
    packed = pack_hf_state_dict(ref.config, ref.state_dict(), dtype=torch.float16)
    with pytest.raises(LayoutError, match="expected dtype torch.bfloat16 .*found torch.float16"):
        build_hf_model(model_dirs["qwen3"], packed)


def test_views_of_rejects_foreign_memory(model_dirs):
    ref = AutoModelForCausalLM.from_pretrained(model_dirs["qwen3"])
    packed = pack_hf_state_dict(ref.config, ref.state_dict())
    with pytest.raises(LayoutError, match="is not a view of the vLLM tensors"):
        assert_views_of(ref, packed)
    assert len(storage_ranges(packed)) == len(packed)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_building_allocates_no_weight_copy(model_dirs):
    """Building the view-backed SmolLM2 (269 MB of bf16 weights) grows the process by far less."""
    ref = AutoModelForCausalLM.from_pretrained(model_dirs["smollm2"])
    packed = pack_hf_state_dict(ref.config, ref.state_dict())
    del ref
    weight_bytes = sum(t.numel() * t.element_size() for t in packed.values())
    before = _rss_bytes()
    model = build_hf_model(model_dirs["smollm2"], packed)
    grown = _rss_bytes() - before
    assert grown < weight_bytes / 10, (grown, weight_bytes)
    assert_views_of(model, packed)
