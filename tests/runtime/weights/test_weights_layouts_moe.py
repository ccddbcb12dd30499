"""Mixture-of-experts layouts (Qwen3 MoE; Qwen3.5 MoE's experts): tables against vLLM's loader, refusals."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, Qwen3MoeConfig
from layout_checks import check_logits, check_tables_against_vllm, check_update_through_views

from onlinemodel_runtime.weights.hf_model import build_hf_model
from onlinemodel_runtime.weights.layouts import LayoutError, Slot, layout_for, validate
from onlinemodel_runtime.optim import TrainPolicy, make_optimizer


def test_tables_match_vllms_loader(tiny_dirs, vllm_loaded):
    check_tables_against_vllm(tiny_dirs["qwen3_moe"], vllm_loaded["qwen3_moe"])


def test_logits_on_vllms_tensors_equal_transformers(tiny_dirs, vllm_loaded):
    check_logits(tiny_dirs["qwen3_moe"], vllm_loaded["qwen3_moe"]["params"])


def test_training_step_writes_vllms_tensors(tiny_dirs, vllm_loaded):
    check_update_through_views(tiny_dirs["qwen3_moe"], vllm_loaded["qwen3_moe"]["params"])


def test_experts_are_whole_vllm_tensors(tiny_dirs, vllm_loaded):
    real = vllm_loaded["qwen3_moe"]["params"]
    experts = "model.layers.0.mlp.experts."
    assert real[experts + "routed_experts.w13_weight"].shape == (4, 2 * 32, 128)  # (E, 2I, H): gate, up
    assert real[experts + "routed_experts.w2_weight"].shape == (4, 128, 32)  # (E, H, I)
    assert "model.layers.1.mlp.gate_up_proj.weight" in real  # mlp_only_layers=[1]: a dense MLP
    layout = layout_for(AutoConfig.from_pretrained(tiny_dirs["qwen3_moe"]))
    assert layout.hf_to_vllm[experts + "gate_up_proj"] == Slot(experts + "routed_experts.w13_weight", 0, 0, 4)
    assert layout.hf_to_vllm["model.layers.2.mlp.gate.weight"] == Slot("model.layers.2.mlp.gate.weight", 0, 0, 4)
    assert "model.layers.1.mlp.gate.weight" not in layout.hf_to_vllm
    moe35 = vllm_loaded["qwen3_5_moe"]["params"]
    shared = "language_model.model.layers.0.mlp.shared_expert"
    assert moe35[shared + ".gate_up_proj.weight"].shape == (2 * 96, 128)
    assert moe35[shared + "_gate.weight"].shape == (1, 128)


def test_sparse_layers_follow_decoder_sparse_step():
    config = Qwen3MoeConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=32, moe_intermediate_size=16, num_experts=2,
                            decoder_sparse_step=2, vocab_size=100, architectures=["Qwen3MoeForCausalLM"])
    layout = layout_for(config)
    sparse = [i for i in range(4) if f"model.layers.{i}.mlp.experts.gate_up_proj" in layout.hf_to_vllm]
    assert sparse == [1, 3]


def test_optimizer_policy_accepts_expert_parameters(tiny_dirs, vllm_loaded):
    """The trainer's default policy over 3-D experts (per-expert APOLLO) and the router (frozen): a
    step reaches vLLM's fused expert tensor, the router stays as served."""
    tensors = {n: t.clone() for n, t in vllm_loaded["qwen3_moe"]["params"].items()}
    model = build_hf_model(tiny_dirs["qwen3_moe"], tensors, train=True)
    optimizer = make_optimizer(model, TrainPolicy(), lr=1e-2)
    trained = {n for g in optimizer.param_groups for n in g["param_names"]}
    assert {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"} <= trained
    assert "model.layers.0.mlp.gate.weight" not in trained
    w13 = tensors["model.layers.0.mlp.experts.routed_experts.w13_weight"]
    router = tensors["model.layers.0.mlp.gate.weight"]
    before, router_before = w13.clone(), router.clone()
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(2))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    assert not torch.equal(w13, before) and torch.equal(router, router_before)
    assert optimizer.state[model.model.layers[0].mlp.experts.gate_up_proj]["limiter_norm"].shape == (4,)


# --- refusals ---------------------------------------------------------------------------------

def test_qwen3_moe_variants_are_refused(tiny_dirs):
    config = AutoConfig.from_pretrained(tiny_dirs["qwen3_moe"])
    config.shared_expert_intermediate_size = 32
    with pytest.raises(LayoutError, match="shared_expert_intermediate_size > 0 is not supported"):
        layout_for(config)
    config = AutoConfig.from_pretrained(tiny_dirs["qwen3_moe"])
    config.attention_bias = True
    with pytest.raises(LayoutError, match="attention_bias=true is not supported"):
        layout_for(config)


def test_transposed_experts_are_refused(tiny_dirs, vllm_loaded):
    config = AutoConfig.from_pretrained(tiny_dirs["qwen3_moe"])
    tensors = dict(vllm_loaded["qwen3_moe"]["params"])
    name = "model.layers.2.mlp.experts.routed_experts.w2_weight"
    tensors[name] = tensors[name].transpose(1, 2).contiguous()  # (E, I, H): a transposed expert layout
    with pytest.raises(LayoutError, match=rf"{name}: expected shape \(4, 128, 32\), found \(4, 32, 128\)"):
        validate(config, tensors)
