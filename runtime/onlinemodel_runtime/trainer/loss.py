"""The training loss: next-token cross-entropy, through the LM head a chunk of tokens at a time.

transformers' causal-LM loss materializes float32 logits for every position (2k tokens x 152k vocabulary:
1.2 GB, and as much again for their gradient). Here only the positions that carry a label go through the
LM head, in chunks of at most ``loss_chunk_tokens`` tokens, each chunk's logits recomputed in backward
(non-reentrant ``torch.utils.checkpoint``), so one chunk's logits exist at a time. The math is
transformers' ``ForCausalLMLoss``: labels shifted by one, ``IGNORE_INDEX`` skipped, the mean over the
counted tokens (a MoE router's auxiliary loss, off in every supported config, is not added).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from onlinemodel_protocol.rpc import IGNORE_INDEX

LOSS_CHUNK_BYTES = 256 * 2**20  # float32 logits of one chunk
# (a chunk's logits, its targets) -> their summed loss.
CrossEntropy = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def loss_chunk_tokens(vocab_size: int, max_tokens: int | None = None) -> int:
    """Tokens per chunk: LOSS_CHUNK_BYTES of float32 logits, or `max_tokens` if smaller (the pacer's bound
    while requests wait)."""
    tokens = max(1, LOSS_CHUNK_BYTES // (4 * vocab_size))
    return tokens if max_tokens is None else max(1, min(tokens, max_tokens))


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The summed next-token loss of one chunk from its whole-vocabulary logits (tensor parallelism passes
    its vocab-parallel one instead: trainer/tp_group.py)."""
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def _chunk_loss_sum(head: nn.Module, cross_entropy: CrossEntropy, hidden: torch.Tensor,
                    targets: torch.Tensor) -> torch.Tensor:
    return cross_entropy(head(hidden), targets)


def labelled_hidden(model: nn.Module, input_ids: torch.Tensor,
                    labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The last hidden state at each position whose next token carries a label, and those labels:
    (counted tokens, hidden size) and (counted tokens,)."""
    hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
    targets = labels[:, 1:].reshape(-1)
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, keep)
    return hidden, targets.index_select(0, keep)


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                   chunk_tokens: int | None = None, cross_entropy: CrossEntropy = cross_entropy_sum) -> torch.Tensor:
    """Mean next-token loss of a transformers causal LM on `input_ids` (batch, seq) with `labels` (same
    shape; IGNORE_INDEX where no loss); NaN when no label counts, as transformers'. `cross_entropy` turns
    each chunk's logits into its summed loss (a tensor-parallel rank's logits are its vocabulary columns)."""
    head = model.get_output_embeddings()
    hidden, targets = labelled_hidden(model, input_ids, labels)
    chunk = chunk_tokens or loss_chunk_tokens(head.out_features)
    total = hidden.new_zeros((), dtype=torch.float32)
    part = functools.partial(_chunk_loss_sum, head, cross_entropy)
    for start in range(0, targets.numel(), chunk):
        total = total + checkpoint(part, hidden[start:start + chunk], targets[start:start + chunk],
                                   use_reentrant=False)
    return total / targets.numel()
