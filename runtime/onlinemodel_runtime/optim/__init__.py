"""Optimizer for training served bf16 weights in place: APOLLO(-Mini) + stochastic or compensated rounding.

Public API: Apollo, StepReport, TrainPolicy, apply_policy, make_optimizer,
stochastic_round_to_bf16, stochastic_add_. See docs/optimizer.md.

Layout: the math once - functional.py (directions, seeds, projections, per-step constants),
rounding.py (the weight write: stochastic, to nearest, or with the remainder carried), bucket_update.py (one bucket's update: run
eagerly, compiled, or captured). apollo.py, the torch.optim.Optimizer, owns its components:
hooks.py (hook mode), gate.py (the step's device-side verdict), projections.py,
compiled_buckets.py with graphs.py (compiled call and CUDA-graph replay), streams.py (side CUDA
stream), tensor_parallel.py (`tp=`: one tensor-parallel rank's share of the update). policy.py:
which parameters train; hyperparams.py: validation; reference.py: the tests' float64 reference.
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
