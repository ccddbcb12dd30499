"""The one module that touches private vLLM internals: version gate and the CPU live-weights patch."""

import pytest
import torch.nn.functional as F

from onlinemodel_runtime.vllm_plugins import compat


def test_version_parsing():
    assert compat._version_tuple("0.32.0+cpu") == (0, 32)
    assert compat._version_tuple("0.26.0rc1") == (0, 26)


def test_too_old_vllm_is_refused(monkeypatch):
    monkeypatch.setattr(compat, "vllm_version", lambda: "0.25.1")
    with pytest.raises(compat.UnsupportedVLLMError, match="0.26"):
        compat.check_version()


def test_cpu_linears_keep_and_read_live_weights():
    import torch
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    compat.install_live_cpu_linears()
    compat.install_live_cpu_linears()  # idempotent: vLLM loads plugins once per process, maybe more
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(torch.randn(3, 4), requires_grad=False)
    for method in (UnquantizedLinearMethod, UnquantizedEmbeddingMethod):
        method.process_weights_after_loading(None, layer)
        assert layer.weight.numel() == 12, "the weight must not be replaced by an empty tensor"
        assert layer.cpu_linear is F.linear


def test_live_weights_check_after_vllms_own_post_processing(vllm_loaded):
    """What check_live_weights says after vLLM's CPU post-processing (with the live-weights patch)."""
    import torch

    errors = {name: loaded["live_weights_error"] for name, loaded in vllm_loaded.items()}
    assert errors["qwen3"] is None and errors["qwen2"] is None and errors["llama"] is None
    assert "model.layers.0.mlp.experts.routed_experts: vLLM's MoE kernel CPU computes from its own layout" \
        in errors["qwen3_moe"]
    # vLLM's CPU Gated-DeltaNet kernel reads conv1d packed where the CPU has AVX-512 BF16 (as here).
    if torch.cpu._is_avx512_bf16_supported():
        for name in ("qwen3_5", "qwen3_5_text", "qwen3_5_moe"):
            assert "layers.0.linear_attn.conv1d: vLLM's CPU Gated-DeltaNet kernel computes from a packed copy" \
                in errors[name]
    else:
        assert errors["qwen3_5"] is None and errors["qwen3_5_text"] is None
        assert "vLLM's MoE kernel CPU" in errors["qwen3_5_moe"]
