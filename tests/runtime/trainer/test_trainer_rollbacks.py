"""Whether a checkpoint's optimizer state fits the optimizer configured now (rollbacks.py)."""

from __future__ import annotations

import torch

from onlinemodel_runtime.optim import TrainPolicy, make_optimizer
from onlinemodel_runtime.trainer.rollbacks import Rollbacks
from tests.runtime.trainer.trainer_fixtures import tiny_llama


class _Service(Rollbacks):
    def __init__(self, optimizer) -> None:
        self.optimizer = optimizer


def _state(rank: int) -> dict:
    return make_optimizer(tiny_llama(dtype=torch.float32), TrainPolicy(), rank=rank).state_dict()


def test_a_state_of_another_rank_does_not_fit_and_says_which():
    service = _Service(make_optimizer(tiny_llama(dtype=torch.float32), TrainPolicy(), rank=64))
    assert service._optimizer_misfit(_state(64)) is None
    assert service._optimizer_misfit(None) is None
    # A server upgraded from the rank-1 default keeps its weights and starts the moments fresh.
    assert service._optimizer_misfit(_state(1)) == (
        "the checkpoint's optimizer state has ranks [1], the configured ones are [64]")
