"""Weight-layout tables: checked against vLLM's own loader, plus every refusal."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, LlamaConfig, Qwen2Config, Qwen3Config

from onlinemodel_runtime.devtools.launcher import free_port
from onlinemodel_runtime.devtools.model_prep import ensure_smollm2, make_tiny_model_dir
from onlinemodel_runtime.weights.layouts import (
    LayoutError,
    Slot,
    hf_views,
    layout_for,
    pack_hf_state_dict,
    padded_vocab_size,
    supported_architectures,
    validate,
)

SMALL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, vocab_size=1000)


def qwen3_config(**kw):
    return Qwen3Config(**{**SMALL, "head_dim": 64, "tie_word_embeddings": True, "dtype": "bfloat16",
                          "architectures": ["Qwen3ForCausalLM"], **kw})


def qwen2_config(**kw):
    return Qwen2Config(**{**SMALL, "tie_word_embeddings": False, "dtype": "bfloat16",
                          "architectures": ["Qwen2ForCausalLM"], **kw})


def llama_config(**kw):
    return LlamaConfig(**{**SMALL, "head_dim": 64, "tie_word_embeddings": True, "dtype": "bfloat16",
                          "architectures": ["LlamaForCausalLM"], **kw})


def random_vllm_tensors(config, dtype=torch.bfloat16, pad=True):
    layout = layout_for(config)
    out = {}
    for name, spec in layout.vllm_specs.items():
        rows = padded_vocab_size(spec.shape[0]) if spec.vocab_padded and pad else spec.shape[0]
        out[name] = torch.randn((rows, *spec.shape[1:])).to(dtype)
    return out


# --- the tables against real vLLM ---------------------------------------------------------------

DENSE = ("qwen3", "qwen2", "llama")


@pytest.mark.parametrize("name", DENSE)
def test_packing_equals_what_vllm_loads(tiny_dirs, vllm_loaded, name):
    """pack_hf_state_dict produces exactly vLLM's named_parameters() after its own load_weights."""
    d = tiny_dirs[name]
    config = AutoConfig.from_pretrained(d)
    real = vllm_loaded[name]["params"]
    mine = pack_hf_state_dict(config, load_file(Path(d) / "model.safetensors"))
    assert sorted(real) == sorted(mine)
    for key in real:
        assert real[key].dtype == mine[key].dtype == torch.bfloat16
        assert torch.equal(real[key], mine[key]), key
    validate(config, real)  # vLLM's real tensors pass validation as they are
    views = hf_views(config, real)
    assert set(views) == set(layout_for(config).hf_to_vllm)


def test_what_vllm_holds_for_dense_models(vllm_loaded):
    qwen2 = vllm_loaded["qwen2"]["params"]
    assert qwen2["model.embed_tokens.weight"].shape[0] == 49216  # vLLM pads the vocabulary
    assert "model.layers.0.self_attn.qkv_proj.bias" in qwen2
    qwen3 = vllm_loaded["qwen3"]
    # Tied: named_parameters() lists the embedding once; lm_head.weight only without dedup.
    assert "lm_head.weight" not in qwen3["params"]
    assert "lm_head.weight" in qwen3["all_names"]
    assert "model.layers.1.self_attn.q_norm.weight" in qwen3["params"]
    llama = vllm_loaded["llama"]["params"]
    assert {"model.layers.0.self_attn.o_proj.bias", "model.layers.0.mlp.gate_up_proj.bias",
            "model.layers.0.mlp.down_proj.bias", "lm_head.weight"} <= set(llama)


# --- the tables themselves ---------------------------------------------------------------------

def test_supported_architectures():
    assert set(supported_architectures()) == {
        "LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM",
        "Qwen3_5ForConditionalGeneration", "Qwen3_5ForCausalLM", "Qwen3_5MoeForConditionalGeneration",
        "Qwen3_5MoeForCausalLM"}


def test_slots_split_qkv_and_gate_up():
    config = qwen3_config(num_attention_heads=4, num_key_value_heads=2)
    layout = layout_for(config)
    p = "model.layers.1."
    assert layout.hf_to_vllm[p + "self_attn.q_proj.weight"] == Slot(p + "self_attn.qkv_proj.weight", 0, 0, 256)
    assert layout.hf_to_vllm[p + "self_attn.k_proj.weight"] == Slot(p + "self_attn.qkv_proj.weight", 0, 256, 128)
    assert layout.hf_to_vllm[p + "self_attn.v_proj.weight"] == Slot(p + "self_attn.qkv_proj.weight", 0, 384, 128)
    assert layout.hf_to_vllm[p + "mlp.up_proj.weight"] == Slot(p + "mlp.gate_up_proj.weight", 0, 256, 256)
    assert layout.hf_to_vllm[p + "self_attn.q_norm.weight"] == Slot(p + "self_attn.q_norm.weight", 0, 0, 64)
    assert layout.vllm_specs[p + "self_attn.qkv_proj.weight"].shape == (512, 128)
    # Tied: HF lm_head.weight lives in vLLM's embedding.
    assert layout.hf_to_vllm["lm_head.weight"] == Slot("model.embed_tokens.weight", 0, 0, 1000)
    assert "lm_head.weight" not in layout.vllm_specs


def test_qwen2_has_qkv_bias_and_untied_head():
    layout = layout_for(qwen2_config())
    assert "model.layers.0.self_attn.qkv_proj.bias" in layout.vllm_specs
    assert "model.layers.0.self_attn.o_proj.bias" not in layout.vllm_specs
    assert layout.hf_to_vllm["lm_head.weight"] == Slot("lm_head.weight", 0, 0, 1000)
    assert layout.hf_to_vllm["model.layers.0.self_attn.v_proj.bias"] == Slot(
        "model.layers.0.self_attn.qkv_proj.bias", 0, 192, 64)


def test_views_are_zero_copy_and_round_trip():
    config = qwen2_config()
    tensors = random_vllm_tensors(config)
    views = hf_views(config, tensors)
    for name, view in views.items():
        slot = layout_for(config).hf_to_vllm[name]
        base = tensors[slot.vllm_name]
        assert view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
        assert torch.equal(view, base[slot.offset:slot.offset + slot.length])
    assert views["model.embed_tokens.weight"].shape == (1000, 128)  # padding rows hidden
    assert tensors["model.embed_tokens.weight"].shape == (1024, 128)
    repacked = pack_hf_state_dict(config, views)
    for name, t in repacked.items():
        assert torch.equal(t, tensors[name] if not name.endswith(("embed_tokens.weight", "lm_head.weight"))
                           else torch.cat([tensors[name][:1000], torch.zeros_like(tensors[name][1000:])]))


def test_tied_views_are_one_tensor():
    config = llama_config()
    views = hf_views(config, random_vllm_tensors(config))
    assert views["lm_head.weight"] is views["model.embed_tokens.weight"]


def test_unpadded_vocab_is_accepted_too():
    config = qwen3_config()
    validate(config, random_vllm_tensors(config, pad=False))


# --- refusals ---------------------------------------------------------------------------------

def test_unknown_architecture():
    config = qwen3_config(architectures=["MistralForCausalLM"])
    with pytest.raises(LayoutError, match=r"unsupported architecture 'MistralForCausalLM'.*supported: "
                                          r"LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM"):
        validate(config, {})
    with pytest.raises(LayoutError, match="unsupported architecture None"):
        validate(qwen3_config(architectures=None), {})


def test_wrong_dtype_names_expected_and_found():
    config = qwen3_config()
    tensors = random_vllm_tensors(config, dtype=torch.float16)
    with pytest.raises(LayoutError) as err:
        validate(config, tensors)
    msg = str(err.value)
    assert "model.embed_tokens.weight: expected dtype torch.bfloat16 (config dtype), found torch.float16" in msg
    # An explicit expectation (what vLLM reports it serves) overrides the config.
    validate(config, tensors, expected_dtype=torch.float16)
    with pytest.raises(LayoutError, match=r"expected dtype torch.float32 \(expected_dtype\), found torch.float16"):
        validate(config, tensors, expected_dtype=torch.float32)


def test_one_tensor_with_wrong_dtype():
    config = qwen3_config()
    tensors = random_vllm_tensors(config)
    tensors["model.layers.1.mlp.down_proj.weight"] = tensors["model.layers.1.mlp.down_proj.weight"].half()
    with pytest.raises(LayoutError, match=r"\(1 problem\(s\)\): model.layers.1.mlp.down_proj.weight: expected dtype "
                                          r"torch.bfloat16 \(config dtype\), found torch.float16$"):
        validate(config, tensors)


def test_wrong_shape_names_expected_and_found():
    config = qwen3_config()
    tensors = random_vllm_tensors(config)
    tensors["model.layers.0.self_attn.qkv_proj.weight"] = torch.zeros(384, 128, dtype=torch.bfloat16)
    with pytest.raises(LayoutError) as err:
        validate(config, tensors)
    assert ("model.layers.0.self_attn.qkv_proj.weight: expected shape (256, 128) "
            "(q_proj[128] + k_proj[64] + v_proj[64]), found (384, 128)") in str(err.value)


def test_wrong_vocab_rows():
    config = qwen3_config()
    tensors = random_vllm_tensors(config)
    tensors["model.embed_tokens.weight"] = torch.zeros(999, 128, dtype=torch.bfloat16)
    with pytest.raises(LayoutError, match=r"model.embed_tokens.weight: expected shape \(1000 or padded 1024, 128\), "
                                          r"found \(999, 128\)"):
        validate(config, tensors)


def test_missing_key():
    config = qwen3_config()
    tensors = random_vllm_tensors(config)
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    with pytest.raises(LayoutError, match=r"missing 1 tensor\(s\): 'model.layers.1.self_attn.k_norm.weight'"):
        validate(config, tensors)


def test_unknown_key():
    config = qwen3_config()
    tensors = random_vllm_tensors(config)
    tensors["model.layers.2.self_attn.qkv_proj.weight"] = torch.zeros(256, 128, dtype=torch.bfloat16)
    with pytest.raises(LayoutError, match=r"unexpected tensor 'model.layers.2.self_attn.qkv_proj.weight'"):
        validate(config, tensors)


def test_tied_lm_head_exported_twice_is_explained():
    config = qwen3_config()
    tensors = random_vllm_tensors(config)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    with pytest.raises(LayoutError, match=r"unexpected tensor 'lm_head.weight' \(tie_word_embeddings=true.*"
                                          r"remove_duplicate=True\)"):
        validate(config, tensors)


def test_untied_model_without_lm_head():
    config = qwen2_config()
    tensors = random_vllm_tensors(config)
    del tensors["lm_head.weight"]
    with pytest.raises(LayoutError, match=r"missing 1 tensor\(s\): 'lm_head.weight'"):
        validate(config, tensors)


def test_unsupported_variants_are_refused():
    with pytest.raises(LayoutError, match="attention_bias=true is not supported"):
        layout_for(qwen3_config(attention_bias=True))
    config = qwen2_config()
    config.head_dim = 32
    with pytest.raises(LayoutError, match="head_dim=32 but vLLM uses hidden_size/num_attention_heads=64"):
        layout_for(config)


def test_pack_refuses_bad_state_dict():
    config = qwen2_config()
    sd = hf_views(config, random_vllm_tensors(config))
    with pytest.raises(LayoutError, match="unexpected HF tensor"):
        pack_hf_state_dict(config, {**sd, "model.extra.weight": torch.zeros(1)})
    sd.pop("model.norm.weight")
    with pytest.raises(LayoutError, match="missing HF tensor.*model.norm.weight"):
        pack_hf_state_dict(config, sd)


def test_non_contiguous_tensor_is_refused():
    config = qwen3_config()
    tensors = random_vllm_tensors(config)
    w = tensors["model.layers.0.mlp.down_proj.weight"]
    tensors["model.layers.0.mlp.down_proj.weight"] = w.t().contiguous().t()
    with pytest.raises(LayoutError, match=r"down_proj.weight: expected a contiguous tensor, found strides \(1, 128\)"):
        validate(config, tensors)
