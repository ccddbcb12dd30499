"""The training step: one example, one optimizer step, updates applied in place during backward."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from onlinemodel_runtime.trainer.anchor import AnchorTerm
from onlinemodel_runtime.trainer.loss import CrossEntropy, causal_lm_loss, cross_entropy_sum, loss_chunk_tokens
from onlinemodel_runtime.trainer.memory import MemoryMonitor
from onlinemodel_runtime.trainer.pacing import Pacer


@dataclass(frozen=True)
class StepResult:
    loss: float  # the example's own loss (without the anchor term)
    tokens: int
    applied: bool
    # Parameters written in place by this step, even when it was skipped part way (hook mode): the
    # served weights changed whenever this is above zero.
    params_updated: int
    skipped_reason: str | None
    seconds: float
    anchor_loss: float | None = None  # the anchor term added to it, if any


def train_step(model: torch.nn.Module, optimizer, input_ids: list[int], labels: list[int], *,
               learning_rate: float | None = None, pacer: Pacer | None = None,
               memory: MemoryMonitor | None = None, chunk_tokens: int | None = None,
               cross_entropy: CrossEntropy = cross_entropy_sum, anchor: AnchorTerm | None = None) -> StepResult:
    """Forward (the loss over the vocabulary in chunks, loss.py), then backward with the optimizer's
    per-layer hooks: each layer's update is written as soon as its gradients are complete (HOGWILD: vLLM
    keeps serving from the same memory), so there is never a full-model gradient buffer. `pacer` yields
    the GPU to serving at its hooks and tells them which pass runs; `memory` measures the step's peak.
    `chunk_tokens` (default: from the LM head and the pacer) and `cross_entropy`: see `step_chunk_tokens`
    and loss.py; tensor-parallel ranks pass rank 0's chunk, so that they run the same collectives.
    `anchor` (trainer/anchor.py), if enabled, adds its KL term to the loss that is differentiated.
    """
    started = time.perf_counter()
    if learning_rate is not None:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
    device = next(p.device for p in model.parameters())
    ids = torch.tensor([input_ids], dtype=torch.long, device=device)
    target = torch.tensor([labels], dtype=torch.long, device=device)
    chunk = chunk_tokens or step_chunk_tokens(model, pacer)
    if memory is not None:
        memory.begin_step()
    if pacer is not None:
        pacer.begin_forward()
    try:
        loss = causal_lm_loss(model, ids, target, chunk, cross_entropy)
        anchor_loss = anchor.loss(model, chunk) if anchor is not None and anchor.enabled else None
        if pacer is not None:
            pacer.begin_backward()
        report = optimizer.backward_step(loss if anchor_loss is None else loss + anchor_loss)
    finally:
        if pacer is not None:
            pacer.end_step()
        if memory is not None:
            memory.end_step()
    return StepResult(
        loss=float(loss.detach()),
        tokens=len(input_ids),
        applied=report.applied,
        params_updated=report.params_updated,
        skipped_reason=report.reason if report.skipped else None,
        seconds=time.perf_counter() - started,
        anchor_loss=None if anchor_loss is None else float(anchor_loss.detach()),
    )


def step_chunk_tokens(model: torch.nn.Module, pacer: Pacer | None = None) -> int:
    """Tokens per chunk of the loss: from the LM head's size, and the pacer's bound while requests wait."""
    head = model.get_output_embeddings()
    bound = pacer.tokens_per_slice(4 * head.in_features * head.out_features) if pacer is not None else None
    return loss_chunk_tokens(head.out_features, bound)
