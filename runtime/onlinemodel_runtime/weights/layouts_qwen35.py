"""Qwen3.5, dense and MoE: hybrid Gated-DeltaNet (linear attention) and gated full-attention layers.

`text_config.layer_types[i]` says which attention layer i has. What vLLM (0.26 and 0.32 read alike,
`models/qwen3_5.py`, `qwen3_next.py`, `layers/mamba/gdn/qwen_gdn_linear_attn.py`) holds differently:

* Gated-DeltaNet: `in_proj_qkvz` = [in_proj_qkv; in_proj_z] and `in_proj_ba` = [in_proj_b; in_proj_a]
  along dim 0 (Qwen3.5's "flat" layout, `gqa_interleaved_layout=False`; Qwen3-Next interleaves per key
  head and is not supported). `conv1d.weight` is (C, 1, K) on both sides (vLLM unsqueezes its (C, K)
  parameter once at construction). `A_log` is float32 in vLLM whatever it serves; `dt_bias` is not.
* Gated attention: HF `q_proj` has 2 * heads * head_dim rows, per head [query; gate] (HF views the output
  as (heads, 2 * head_dim) and chunks it; vLLM views the q part of `qkv_proj` as (heads, -1) and chunks
  it). vLLM loads HF's q_proj rows unchanged as the first part of `qkv_proj`, so the view is a plain row
  range and no reordering exists on either side.
* RMSNorms other than the linear-attention output norm are zero-centred (x * (1 + w)) in both: the
  stored values are the same, nothing is shifted.

The trainer's model is the text-only causal LM built from the text config. Of a
`...ForConditionalGeneration`, vLLM names the language model `language_model.model.*` and
`language_model.lm_head.weight`; its vision tower `visual.*` is exported but never attached (frozen:
no gradient, no optimizer state, nothing to validate beyond the prefix), or not built at all when vLLM
serves it with `--language-model-only` (then nothing under `visual.*` is exported). Multi-token-prediction
heads (`mtp.*` in the checkpoint) are not loaded by vLLM's served model and not trained. A checkpoint
names the language model as the base does (`model.language_model.*`) and carries the base files'
`model.visual.*` and `mtp.*` tensors over unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from onlinemodel_runtime.checkpoint.model_tensors import CheckpointNames

from .layouts import GLOBAL_ROWS, MLP_ROWS, NORM_ROWS, LayoutError, LayoutPlan
from .layouts_moe import EXPERT_ROWS, ROUTER_ROWS, SHARED_EXPERT_ROWS, expert_sizes

LINEAR_ATTENTION_ROWS = (
    ("linear_attn.dt_bias", (("linear_attn.dt_bias", "v_heads"),), None, None),
    ("linear_attn.A_log", (("linear_attn.A_log", "v_heads"),), None, None),
    ("linear_attn.conv1d.weight", (("linear_attn.conv1d.weight", "conv_dim"),), ("one", "conv_kernel"), None),
    ("linear_attn.in_proj_qkvz.weight",
     (("linear_attn.in_proj_qkv.weight", "conv_dim"), ("linear_attn.in_proj_z.weight", "value_dim")), "hidden", None),
    ("linear_attn.in_proj_ba.weight",
     (("linear_attn.in_proj_b.weight", "v_heads"), ("linear_attn.in_proj_a.weight", "v_heads")), "hidden", None),
    ("linear_attn.norm.weight", (("linear_attn.norm.weight", "v_head_dim"),), None, None),
    ("linear_attn.out_proj.weight", (("linear_attn.out_proj.weight", "hidden"),), "value_dim", None),
)

GATED_ATTENTION_ROWS = (
    ("self_attn.qkv_proj.weight",
     (("self_attn.q_proj.weight", "q_and_gate"), ("self_attn.k_proj.weight", "kv"), ("self_attn.v_proj.weight", "kv")),
     "hidden", None),
    ("self_attn.o_proj.weight", (("self_attn.o_proj.weight", "hidden"),), "q", None),
    ("self_attn.q_norm.weight", (("self_attn.q_norm.weight", "head_dim"),), None, None),
    ("self_attn.k_norm.weight", (("self_attn.k_norm.weight", "head_dim"),), None, None),
)

_ATTENTION = {"linear_attention": LINEAR_ATTENTION_ROWS, "full_attention": GATED_ATTENTION_ROWS}
_TEXT_MODEL_TYPES = {"qwen3_5_text": False, "qwen3_5_moe_text": True}  # model_type -> has experts
_LANGUAGE_MODEL_PREFIXES = (("model.", "language_model.model."), ("lm_head.", "language_model.lm_head."))
# The same model in a multimodal checkpoint (transformers' save_pretrained and the published ones):
# the language model under model.language_model.*, lm_head.weight as it is; model.visual.* beside it.
_CHECKPOINT_PREFIXES = (("model.", "model.language_model."),)


def _refuse_unsupported(arch: str, c: Any) -> bool:
    """Raise LayoutError for variants where vLLM and transformers hold different tensors; return moe."""
    model_type = getattr(c, "model_type", None)
    if model_type not in _TEXT_MODEL_TYPES:
        raise LayoutError(f"{arch}: text config model_type {model_type!r}, expected one of {sorted(_TEXT_MODEL_TYPES)}")
    moe = _TEXT_MODEL_TYPES[model_type]
    if moe != arch.startswith("Qwen3_5Moe"):
        raise LayoutError(f"{arch}: its text config is {model_type!r}; vLLM would build the other MLP kind")
    if getattr(c, "attention_bias", False):
        raise LayoutError(f"{arch} with attention_bias=true is not supported: vLLM's gated attention has no "
                          "q/k/v/o biases, so the HF model would not match")
    if not getattr(c, "attn_output_gate", True):
        raise LayoutError(f"{arch} with attn_output_gate=false is not supported: transformers always gates")
    if getattr(c, "layer_scale", False):
        raise LayoutError(f"{arch} with layer_scale=true is not supported: transformers has no layer scales")
    if moe and int(getattr(c, "shared_expert_intermediate_size", 0) or 0) <= 0:
        raise LayoutError(f"{arch} without a shared expert is not supported: transformers always builds one")
    if moe and not getattr(c, "norm_topk_prob", True):
        raise LayoutError(f"{arch} with norm_topk_prob=false is not supported: transformers always renormalizes")
    types = list(getattr(c, "layer_types", None) or [])
    unknown = sorted(set(types) - set(_ATTENTION))
    if len(types) != int(c.num_hidden_layers) or unknown:
        raise LayoutError(f"{arch}: layer_types must name one of {sorted(_ATTENTION)} for each of the "
                          f"{c.num_hidden_layers} layers, found {len(types)} entries (unknown: {unknown})")
    return moe


def qwen35_plan(config: Any) -> LayoutPlan:
    arch = config.architectures[0]
    multimodal = arch.endswith("ForConditionalGeneration")
    c = config.text_config if multimodal else config
    moe = _refuse_unsupported(arch, c)
    hd = int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    key_dim = int(c.linear_num_key_heads) * int(c.linear_key_head_dim)
    value_dim = int(c.linear_num_value_heads) * int(c.linear_value_head_dim)
    sizes = dict(
        hidden=int(c.hidden_size), head_dim=hd, vocab=int(c.vocab_size),
        q=int(c.num_attention_heads) * hd, q_and_gate=2 * int(c.num_attention_heads) * hd,
        kv=int(c.num_key_value_heads) * hd,
        conv_dim=2 * key_dim + value_dim, value_dim=value_dim, v_heads=int(c.linear_num_value_heads),
        v_head_dim=int(c.linear_value_head_dim), conv_kernel=int(c.linear_conv_kernel_dim), one=1)
    sizes.update(expert_sizes(c) if moe else dict(inter=int(c.intermediate_size)))
    mlp = ROUTER_ROWS + SHARED_EXPERT_ROWS + EXPERT_ROWS if moe else MLP_ROWS
    layers = tuple((_ATTENTION[t] + mlp + NORM_ROWS, f"model.layers.{i}.") for i, t in enumerate(c.layer_types))
    return LayoutPlan(
        tables=((GLOBAL_ROWS, ""),) + layers, sizes=sizes, flags=dict(mlp_bias=False), hf_config=c,
        vllm_prefixes=_LANGUAGE_MODEL_PREFIXES if multimodal else (),
        dtypes={"linear_attn.A_log": torch.float32},
        passengers=("visual.",) if multimodal else (),
        checkpoint=CheckpointNames(renames=_CHECKPOINT_PREFIXES if multimodal else (), experts_per_expert=moe,
                                   carried=("model.visual.", "mtp.") if multimodal else ("mtp.",)))
