"""Optimizer for training served bf16 weights in place: APOLLO(-Mini) + stochastic rounding.

Public API: Apollo, StepReport, TrainPolicy, apply_policy, make_optimizer,
stochastic_round_to_bf16, stochastic_add_. See docs/optimizer.md.
"""

from .apollo import Apollo
from .hyperparams import DEFAULT_LR, StepReport
from .policy import TrainPolicy, apply_policy, make_optimizer
from .rounding import stochastic_add_, stochastic_round_to_bf16

__all__ = [
    "DEFAULT_LR",
    "Apollo",
    "StepReport",
    "TrainPolicy",
    "apply_policy",
    "make_optimizer",
    "stochastic_add_",
    "stochastic_round_to_bf16",
]
