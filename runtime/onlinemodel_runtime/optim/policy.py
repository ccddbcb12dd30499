"""Which parameters train, and with what: a documented, configurable choice.

Five classes of parameters in a decoder-only transformer:
- blocks:     2-D weights inside the decoder blocks (attention, dense MLP, a MoE layer's shared
              expert): the bulk of a dense model and where a fact is stored; APOLLO keeps ~nothing
              per matrix.
- experts:    a MoE layer's fused routed experts, 3-D (E, m, n) (transformers 5's `...Experts`
              modules): the bulk of a MoE model; APOLLO treats each expert as a matrix of its own.
- router:     a MoE layer's routing and gating weights (the `...Router` module's weight, which picks
              the experts, and Qwen3.5 MoE's `shared_expert_gate`, which scales the shared expert).
- embeddings: input embedding and LM head (often one tied matrix): a vocab-by-hidden matrix that
              only the rows of tokens in the batch get gradient for.
- norms:      every other parameter, none of them a matrix: norm weights, biases, Gated
              DeltaNet's conv1d kernels (C, 1, K), A_log and dt_bias. Tiny; AdamW for them costs nothing.
Each class is "apollo" (matrices and batches of them), "adamw" (dense, float32 moments) or "frozen"
(requires_grad=False: no gradient is computed or stored for it); norms are never "apollo".
Experts trained with "apollo" get a group of their own that is always APOLLO-Mini (rank 1, tensor
scale, alpha sqrt(128)), whatever rank the other matrices get: a rank-r state per expert costs E times
a matrix's (rank 64 at the 35B-A3B shape would be ~32 GB), and bench/moe_optim.py chose Mini for them.
The defaults were chosen by bench/teach_fact_optimizers.py and bench/moe_optim.py
(docs/optimizer.md).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from .hyperparams import rank_defaults

CHOICES_2D = ("apollo", "adamw", "frozen")
CHOICES_1D = ("adamw", "frozen")
# Module attribute names of gates that are plain linears (not a `...Router` module).
_GATE_NAMES = ("shared_expert_gate",)


@dataclass(frozen=True)
class TrainPolicy:
    blocks: str = "apollo"
    experts: str = "apollo"
    router: str = "frozen"
    embeddings: str = "frozen"
    norms: str = "frozen"

    def __post_init__(self) -> None:
        for f in fields(self):
            choices = CHOICES_1D if f.name == "norms" else CHOICES_2D
            if getattr(self, f.name) not in choices:
                raise ValueError(f"TrainPolicy.{f.name} must be one of {choices}, got {getattr(self, f.name)!r}")


def classify(model: torch.nn.Module) -> dict[str, str]:
    """Map each parameter name (as named_parameters() yields it) to its class (a TrainPolicy field)."""
    by_id: dict[int, str] = {}
    for module_name, module in model.named_modules():
        kind = type(module).__name__
        attribute = module_name.rpartition(".")[2]
        for p in module.parameters(recurse=False):
            if kind.endswith("Experts"):
                by_id[id(p)] = "experts" if p.dim() == 3 else "norms"  # (a bias per expert is no matrix)
            elif kind.endswith("Router") or attribute in _GATE_NAMES:
                by_id[id(p)] = "router"
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is not None and getattr(module, "weight", None) is not None:
            by_id[id(module.weight)] = "embeddings"
    return {name: by_id.get(id(p), "blocks" if p.dim() == 2 else "norms")
            for name, p in model.named_parameters()}


def apply_policy(model: torch.nn.Module, policy: TrainPolicy) -> list[dict[str, Any]]:
    """Set requires_grad per the policy and return Apollo parameter groups (with names).

    Frozen parameters get requires_grad=False; the rest are grouped by algorithm. Pass the
    result to Apollo(groups, lr=...); group-level keys override the constructor's defaults.
    """
    classes = classify(model)
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        choice = getattr(policy, classes[name])
        if choice == "frozen":
            p.requires_grad_(False)
            continue
        p.requires_grad_(True)
        mini = choice == "apollo" and classes[name] == "experts"
        g = groups.setdefault((choice, mini), {"algorithm": choice, "params": [], "param_names": [],
                                               **(dict(rank=1, **rank_defaults(1)) if mini else {})})
        g["params"].append(p)
        g["param_names"].append(name)
    return list(groups.values())


def make_optimizer(model: torch.nn.Module, policy: TrainPolicy | None = None, **hparams: Any):
    """Apply `policy` to `model` and build an Apollo optimizer over what trains."""
    from .apollo import Apollo

    groups = apply_policy(model, policy or TrainPolicy())
    if not groups:
        raise ValueError("the training policy freezes every parameter: nothing to optimize")
    return Apollo(groups, **hparams)
