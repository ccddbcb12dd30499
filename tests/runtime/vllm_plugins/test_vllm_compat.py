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
