"""The training loop: one example per optimizer step, updates applied in place during backward."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepResult:
    loss: float
    tokens: int
    applied: bool
    # Parameters written in place by this step, even when it was skipped part way (hook mode): the
    # served weights changed whenever this is above zero.
    params_updated: int
    skipped_reason: str | None
    seconds: float


def train_step(model: torch.nn.Module, optimizer, input_ids: list[int], labels: list[int],
               *, learning_rate: float | None = None) -> StepResult:
    """Forward, backward with the optimizer's per-parameter hooks, report.

    The optimizer writes each parameter's update as soon as its gradient is ready (HOGWILD: vLLM keeps
    serving from the same memory meanwhile), so there is never a full-model gradient buffer.
    """
    started = time.perf_counter()
    if learning_rate is not None:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
    device = next(p.device for p in model.parameters())
    ids = torch.tensor([input_ids], dtype=torch.long, device=device)
    target = torch.tensor([labels], dtype=torch.long, device=device)
    out = model(input_ids=ids, labels=target, use_cache=False)
    report = optimizer.backward_step(out.loss)
    loss = float(out.loss.detach())
    return StepResult(
        loss=loss,
        tokens=len(input_ids),
        applied=report.applied,
        params_updated=report.params_updated,
        skipped_reason=report.reason if report.skipped else None,
        seconds=time.perf_counter() - started,
    )
