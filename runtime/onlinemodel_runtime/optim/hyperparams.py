"""Apollo's hyperparameter validation, defaults and the per-step report."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from onlinemodel_protocol.limits import LEARNING_RATE_DEFAULT

from .rounding import ROUNDINGS

SCALES = ("tensor", "channel")
ALGORITHMS = ("apollo", "adamw")
MINI_ALPHA = math.sqrt(128.0)


def rank_defaults(rank: int) -> dict[str, Any]:
    """The scale and alpha a rank implies: rank 1 is APOLLO-Mini (tensor scale, alpha sqrt(128)), any other
    rank a scale per channel and alpha 1 (the paper's settings)."""
    return {"scale": "tensor", "alpha": MINI_ALPHA} if rank == 1 else {"scale": "channel", "alpha": 1.0}
# The trainer's default rate is the optimizer's too (see limits.py for why it is not torch's 1e-3).
DEFAULT_LR = LEARNING_RATE_DEFAULT


@dataclass(frozen=True)
class StepReport:
    """What one optimizer step did. `skipped`: some update was not applied because a loss,
    gradient or result was not finite. `partial` (hook mode only): the non-finite gradient showed
    up after `params_updated` parameters had already been updated with finite values."""

    applied: bool
    skipped: bool
    reason: str | None
    step: int  # optimizer steps applied so far (this one included if applied)
    params_updated: int
    params_total: int
    partial: bool = False


def upgrade_group(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved param group in today's keys: checkpoints before 2026-12-03 hold `stochastic_rounding`
    (a bool) where groups now hold `rounding`."""
    if "stochastic_rounding" in saved and "rounding" not in saved:
        stochastic = saved["stochastic_rounding"]
        saved = {k: v for k, v in saved.items() if k != "stochastic_rounding"}
        saved["rounding"] = "stochastic" if stochastic else "nearest"
    return saved


def load_keeping_rounding(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """`optimizer.load_state_dict(state_dict)`, keeping the `rounding` its groups have now. torch restores the
    hyperparameters saved with the state; the way of writing bf16 weights is the deployment's choice
    (--weight-rounding, which the optimizer was built with) and may change across a restart."""
    configured = [group["rounding"] for group in optimizer.param_groups]
    optimizer.load_state_dict(state_dict)
    for group, rounding in zip(optimizer.param_groups, configured):
        group["rounding"] = rounding


def check_group(group: dict[str, Any]) -> None:
    lr = group["lr"]
    if isinstance(lr, torch.Tensor) or not isinstance(lr, (int, float)) or not (0.0 <= lr < math.inf):
        raise ValueError(f"Invalid learning rate: {lr!r} (a finite float >= 0)")
    betas = group["betas"]
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"Invalid betas: {betas!r} (two floats in [0, 1))")
    if not (isinstance(group["eps"], (int, float)) and group["eps"] > 0.0):
        raise ValueError(f"Invalid eps: {group['eps']!r} (a float > 0)")
    if not (isinstance(group["weight_decay"], (int, float)) and group["weight_decay"] >= 0.0):
        raise ValueError(f"Invalid weight_decay: {group['weight_decay']!r} (a float >= 0)")
    rank = group["rank"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"Invalid rank: {rank!r} (an int >= 1)")
    if group["scale"] not in SCALES:
        raise ValueError(f"Invalid scale: {group['scale']!r} (one of {SCALES})")
    if not (isinstance(group["alpha"], (int, float)) and 0.0 < group["alpha"] < math.inf):
        raise ValueError(f"Invalid alpha: {group['alpha']!r} (a finite float > 0)")
    gap = group["update_proj_gap"]
    if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
        raise ValueError(f"Invalid update_proj_gap: {gap!r} (an int >= 1)")
    ngl = group["norm_growth_limit"]
    if ngl is not None and not (isinstance(ngl, (int, float)) and 1.0 <= ngl < math.inf):
        raise ValueError(f"Invalid norm_growth_limit: {ngl!r} (a finite float >= 1, or None: no limiter)")
    if group["rounding"] not in ROUNDINGS:
        raise ValueError(f"Invalid rounding: {group['rounding']!r} (one of {ROUNDINGS})")
    if group["algorithm"] not in ALGORITHMS:
        raise ValueError(f"Invalid algorithm: {group['algorithm']!r} (one of {ALGORITHMS})")
    if isinstance(group["seed"], bool) or not isinstance(group["seed"], int):
        raise ValueError(f"Invalid seed: {group['seed']!r} (an int)")
