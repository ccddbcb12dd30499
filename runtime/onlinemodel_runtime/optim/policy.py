"""Which parameters train, and with what: a documented, configurable choice.

Three classes of parameters in a decoder-only transformer:
- blocks:     2-D weights inside the decoder blocks (attention and MLP linears): the bulk of the
              model and where a fact is stored; APOLLO keeps ~nothing per matrix.
- embeddings: input embedding and LM head (often one tied matrix): a vocab-by-hidden matrix that
              only the rows of tokens in the batch get gradient for.
- norms:      1-D parameters (norm weights, biases): tiny; AdamW for them costs nothing.
Each class is "apollo" (2-D only), "adamw" (dense, float32 moments) or "frozen"
(requires_grad=False: no gradient is computed or stored for it).
The default was chosen by bench/teach_fact_optimizers.py (see docs/optimizer.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

CHOICES_2D = ("apollo", "adamw", "frozen")
CHOICES_1D = ("adamw", "frozen")


@dataclass(frozen=True)
class TrainPolicy:
    blocks: str = "apollo"
    embeddings: str = "frozen"
    norms: str = "frozen"

    def __post_init__(self) -> None:
        if self.blocks not in CHOICES_2D:
            raise ValueError(f"TrainPolicy.blocks must be one of {CHOICES_2D}, got {self.blocks!r}")
        if self.embeddings not in CHOICES_2D:
            raise ValueError(f"TrainPolicy.embeddings must be one of {CHOICES_2D}, got {self.embeddings!r}")
        if self.norms not in CHOICES_1D:
            raise ValueError(f"TrainPolicy.norms must be one of {CHOICES_1D}, got {self.norms!r}")


def classify(model: torch.nn.Module) -> dict[str, str]:
    """Map each parameter name (as named_parameters() yields it) to blocks|embeddings|norms."""
    special: set[int] = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is not None and getattr(module, "weight", None) is not None:
            special.add(id(module.weight))
    out = {}
    for name, p in model.named_parameters():
        if id(p) in special:
            out[name] = "embeddings"
        elif p.dim() < 2:
            out[name] = "norms"
        else:
            out[name] = "blocks"
    return out


def apply_policy(model: torch.nn.Module, policy: TrainPolicy) -> list[dict[str, Any]]:
    """Set requires_grad per the policy and return Apollo parameter groups (with names).

    Frozen parameters get requires_grad=False; the rest are grouped by algorithm. Pass the
    result to Apollo(groups, lr=...); group-level keys override the constructor's defaults.
    """
    classes = classify(model)
    groups: dict[str, dict[str, list[Any]]] = {}
    for name, p in model.named_parameters():
        choice = getattr(policy, classes[name])
        if choice == "frozen":
            p.requires_grad_(False)
            continue
        p.requires_grad_(True)
        g = groups.setdefault(choice, {"params": [], "param_names": []})
        g["params"].append(p)
        g["param_names"].append(name)
    return [dict(algorithm=alg, **g) for alg, g in groups.items()]


def make_optimizer(model: torch.nn.Module, policy: TrainPolicy | None = None, **hparams: Any):
    """Apply `policy` to `model` and build an Apollo optimizer over what trains."""
    from .apollo import Apollo

    groups = apply_policy(model, policy or TrainPolicy())
    if not groups:
        raise ValueError("the training policy freezes every parameter: nothing to optimize")
    return Apollo(groups, **hparams)
