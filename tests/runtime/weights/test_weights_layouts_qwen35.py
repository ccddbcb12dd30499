"""Qwen3.5 (dense and MoE, multimodal and text-only): the tables against vLLM's loader, and every refusal."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig
from layout_checks import check_logits, check_tables_against_vllm, check_update_through_views

from onlinemodel_runtime.weights.layouts import LayoutError, Slot, layout_for, validate

QWEN35 = ("qwen3_5", "qwen3_5_text", "qwen3_5_moe")


@pytest.mark.parametrize("name", QWEN35)
def test_tables_match_vllms_loader(tiny_dirs, vllm_loaded, name):
    check_tables_against_vllm(tiny_dirs[name], vllm_loaded[name])


@pytest.mark.parametrize("name", QWEN35)
def test_logits_on_vllms_tensors_equal_transformers(tiny_dirs, vllm_loaded, name):
    check_logits(tiny_dirs[name], vllm_loaded[name]["params"])


@pytest.mark.parametrize("name", ("qwen3_5", "qwen3_5_moe"))
def test_training_step_writes_vllms_tensors(tiny_dirs, vllm_loaded, name):
    check_update_through_views(tiny_dirs[name], vllm_loaded[name]["params"])


@pytest.mark.parametrize("name", ("qwen3_5", "qwen3_5_moe"))
def test_language_model_only_exports_the_same_tensors_without_the_vision_tower(tiny_dirs, vllm_loaded,
                                                                                vllm_loaded_language_only, name):
    """vLLM's `--language-model-only` (how the GPU tests serve Qwen3.5) builds no vision tower: the same
    language-model names and bytes, nothing under visual.*; the layout takes it as it is."""
    lm_only, full = vllm_loaded_language_only[name]["params"], vllm_loaded[name]["params"]
    assert any(n.startswith("visual.") for n in full)
    assert sorted(lm_only) == sorted(n for n in full if not n.startswith("visual."))
    for n, t in lm_only.items():
        assert torch.equal(t, full[n]), n
    check_logits(tiny_dirs[name], lm_only)


def test_what_vllm_holds(vllm_loaded):
    real = vllm_loaded["qwen3_5"]["params"]
    lm = "language_model.model.layers."
    # Gated DeltaNet: the four input projections packed in two; A_log in float32, conv1d (C, 1, K).
    assert real[lm + "0.linear_attn.in_proj_qkvz.weight"].shape == (512 + 256, 128)
    assert real[lm + "0.linear_attn.in_proj_ba.weight"].shape == (4, 128)
    assert real[lm + "0.linear_attn.conv1d.weight"].shape == (512, 1, 4)
    assert real[lm + "0.linear_attn.A_log"].dtype == torch.float32
    assert real[lm + "0.linear_attn.dt_bias"].dtype == torch.bfloat16
    # Gated attention: q and its gate (2 heads x 2 x 64 rows), then k and v.
    assert real[lm + "1.self_attn.qkv_proj.weight"].shape == (256 + 64 + 64, 128)
    assert any(n.startswith("visual.") for n in real)
    # Tied: the embedding once; lm_head only without dedup.
    assert "language_model.lm_head.weight" not in real
    assert "language_model.lm_head.weight" in vllm_loaded["qwen3_5"]["all_names"]
    assert "language_model.lm_head.weight" in vllm_loaded["qwen3_5_moe"]["params"]  # untied


def test_slots(tiny_dirs):
    layout = layout_for(AutoConfig.from_pretrained(tiny_dirs["qwen3_5"]))
    lin, attn = "model.layers.0.linear_attn.", "model.layers.1.self_attn."
    qkvz = "language_model." + lin + "in_proj_qkvz.weight"
    assert layout.hf_to_vllm[lin + "in_proj_qkv.weight"] == Slot(qkvz, 0, 0, 512)
    assert layout.hf_to_vllm[lin + "in_proj_z.weight"] == Slot(qkvz, 0, 512, 256)
    ba = "language_model." + lin + "in_proj_ba.weight"
    assert layout.hf_to_vllm[lin + "in_proj_b.weight"] == Slot(ba, 0, 0, 2)
    assert layout.hf_to_vllm[lin + "in_proj_a.weight"] == Slot(ba, 0, 2, 2)
    qkv = "language_model." + attn + "qkv_proj.weight"
    assert layout.hf_to_vllm[attn + "q_proj.weight"] == Slot(qkv, 0, 0, 256)  # per head [query; gate]
    assert layout.hf_to_vllm[attn + "k_proj.weight"] == Slot(qkv, 0, 256, 64)
    assert layout.hf_to_vllm["lm_head.weight"] == Slot("language_model.model.embed_tokens.weight", 0, 0, 49152)
    assert layout.hf_config is layout.config.text_config


# --- refusals ---------------------------------------------------------------------------------

def _config(tiny_dirs, name, **text):
    config = AutoConfig.from_pretrained(tiny_dirs[name])
    target = config.text_config if hasattr(config, "text_config") else config
    for key, value in text.items():
        setattr(target, key, value)
    return config


@pytest.mark.parametrize("name,change,message", [
    ("qwen3_5", dict(attention_bias=True), "attention_bias=true is not supported"),
    ("qwen3_5_text", dict(attn_output_gate=False), "attn_output_gate=false is not supported"),
    ("qwen3_5", dict(layer_scale=True), "layer_scale=true is not supported"),
    ("qwen3_5_moe", dict(shared_expert_intermediate_size=0), "without a shared expert is not supported"),
    ("qwen3_5_moe", dict(norm_topk_prob=False), "norm_topk_prob=false is not supported"),
    ("qwen3_5", dict(layer_types=["linear_attention"] * 3), r"found 3 entries \(unknown: \[\]\)"),
    ("qwen3_5", dict(layer_types=["linear_attention", "sliding_attention"] * 2),
     r"unknown: \['sliding_attention'\]"),
    ("qwen3_5", dict(model_type="qwen3_next"), "text config model_type 'qwen3_next'"),
    ("qwen3_5", dict(model_type="qwen3_5_moe_text"), "vLLM would build the other MLP kind"),
])
def test_unsupported_variants(tiny_dirs, name, change, message):
    with pytest.raises(LayoutError, match=message):
        layout_for(_config(tiny_dirs, name, **change))


def test_wrong_shapes_and_dtypes_are_named(tiny_dirs, vllm_loaded):
    config = AutoConfig.from_pretrained(tiny_dirs["qwen3_5"])
    lin = "language_model.model.layers.0.linear_attn."
    tensors = dict(vllm_loaded["qwen3_5"]["params"])
    tensors[lin + "conv1d.weight"] = tensors[lin + "conv1d.weight"].squeeze(1)  # vLLM's pre-unsqueeze shape
    tensors[lin + "A_log"] = tensors[lin + "A_log"].bfloat16()
    tensors[lin + "in_proj_qkvz.weight"] = tensors[lin + "in_proj_qkvz.weight"][:512]
    with pytest.raises(LayoutError) as err:
        validate(config, tensors)
    msg = str(err.value)
    assert "(3 problem(s))" in msg
    assert f"{lin}conv1d.weight: expected shape (512, 1, 4), found (512, 4)" in msg
    assert f"{lin}A_log: expected dtype torch.float32 (vLLM keeps it so), found torch.bfloat16" in msg
    assert (f"{lin}in_proj_qkvz.weight: expected shape (768, 128) (in_proj_qkv[512] + in_proj_z[256]), "
            "found (512, 128)") in msg


def test_vision_tower_rides_along_and_mtp_is_refused(tiny_dirs, vllm_loaded):
    config = AutoConfig.from_pretrained(tiny_dirs["qwen3_5"])
    tensors = dict(vllm_loaded["qwen3_5"]["params"])
    # Any tensor under visual.* is vLLM's frozen vision tower: exported, never attached.
    tensors["visual.blocks.9.attn.qkv.weight"] = torch.zeros(3, dtype=torch.float16)
    validate(config, tensors)
    tensors["mtp.layers.0.mlp.gate_up_proj.weight"] = torch.zeros(4, 4, dtype=torch.bfloat16)
    with pytest.raises(LayoutError, match=r"unexpected tensor 'mtp.layers.0.mlp.gate_up_proj.weight' \(a "
                                          r"multi-token-prediction head: onlinemodel trains and exports the "
                                          r"served model only\)"):
        validate(config, tensors)
    text_only = AutoConfig.from_pretrained(tiny_dirs["qwen3_5_text"])
    with pytest.raises(LayoutError, match=r"unexpected tensor 'visual.blocks.9.attn.qkv.weight'"):
        validate(text_only, {**vllm_loaded["qwen3_5_text"]["params"],
                             "visual.blocks.9.attn.qkv.weight": torch.zeros(3)})
