"""Mixture-of-experts rows, and Qwen3 MoE: vLLM's fused expert tensors as views of transformers' experts.

transformers 5 keeps a layer's experts as two 3-D parameters: `mlp.experts.gate_up_proj` (E, 2I, H: per
expert its gate rows, then its up rows) and `mlp.experts.down_proj` (E, H, I). vLLM's FusedMoE (0.26 and
0.32 alike: a runner module whose `routed_experts` holds the weights) keeps `w13_weight` (E, 2I, H: w1 =
gate, then w3 = up) and `w2_weight` (E, H, I): the same numbers in the same order, so each HF expert
tensor is one whole vLLM tensor. The router is `mlp.gate.weight` (E, H) on both sides. This holds while
vLLM's MoE kernel keeps the checkpoint layout; `vllm_compat.check_live_weights` refuses kernels that
reorder or prepack the experts. Checkpoints write the experts one by one
(`mlp.experts.{e}.gate_proj.weight`, ...), as `save_pretrained` and the published checkpoints do.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from onlinemodel_runtime.checkpoint.model_tensors import CheckpointNames

from .layouts import ARCHITECTURES, ATTENTION_ROWS, GLOBAL_ROWS, MLP_ROWS, NORM_ROWS, LayoutError, LayoutPlan

_EXPERTS = "mlp.experts.routed_experts."

ROUTER_ROWS = (
    ("mlp.gate.weight", (("mlp.gate.weight", "experts"),), "hidden", None),
)

EXPERT_ROWS = (
    (_EXPERTS + "w13_weight", (("mlp.experts.gate_up_proj", "experts"),), ("moe_inter_x2", "hidden"), None),
    (_EXPERTS + "w2_weight", (("mlp.experts.down_proj", "experts"),), ("hidden", "moe_inter"), None),
)

# One shared expert beside the routed ones, scaled by sigmoid(shared_expert_gate(x)) (Qwen3.5 MoE).
SHARED_EXPERT_ROWS = (
    ("mlp.shared_expert_gate.weight", (("mlp.shared_expert_gate.weight", "one"),), "hidden", None),
    ("mlp.shared_expert.gate_up_proj.weight",
     (("mlp.shared_expert.gate_proj.weight", "shared_inter"), ("mlp.shared_expert.up_proj.weight", "shared_inter")),
     "hidden", None),
    ("mlp.shared_expert.down_proj.weight", (("mlp.shared_expert.down_proj.weight", "hidden"),), "shared_inter", None),
)


def expert_sizes(c: Any) -> dict[str, int]:
    inter = int(c.moe_intermediate_size)
    return dict(experts=int(c.num_experts), moe_inter=inter, moe_inter_x2=2 * inter, one=1,
                shared_inter=int(getattr(c, "shared_expert_intermediate_size", 0) or 0))


def _is_sparse(c: Any, i: int) -> bool:
    # The same rule in transformers' Qwen3MoeDecoderLayer and vLLM's qwen3_moe.py.
    return (i not in (getattr(c, "mlp_only_layers", None) or []) and int(c.num_experts) > 0
            and (i + 1) % int(getattr(c, "decoder_sparse_step", 1) or 1) == 0)


def qwen3_moe_plan(c: Any) -> LayoutPlan:
    """Qwen3's attention and norms; routed experts where the layer is sparse, Qwen3's MLP elsewhere."""
    if int(getattr(c, "shared_expert_intermediate_size", 0) or 0) > 0:
        raise LayoutError("Qwen3MoeForCausalLM with shared_expert_intermediate_size > 0 is not supported: "
                          "vLLM would add a shared expert that transformers' Qwen3 MoE does not have")
    dense = ARCHITECTURES["Qwen3ForCausalLM"](c)  # sizes, flags and refusals of Qwen3's attention
    layers = tuple(
        (NORM_ROWS + ATTENTION_ROWS + (ROUTER_ROWS + EXPERT_ROWS if _is_sparse(c, i) else MLP_ROWS),
         f"model.layers.{i}.")
        for i in range(int(c.num_hidden_layers)))
    return replace(dense, tables=((GLOBAL_ROWS, ""),) + layers, sizes={**dense.sizes, **expert_sizes(c)},
                   checkpoint=CheckpointNames(experts_per_expert=True))
