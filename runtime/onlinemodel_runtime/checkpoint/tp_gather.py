"""Checkpoints under tensor parallelism: one HF directory, whatever the TP (docs/tensor-parallel.md).

Saving, every rank calls `save_tp_checkpoint`: rank 0 gathers the ranks' tensors one decoder layer at a time
(`dist.gather`, so it never holds more than one layer of the other ranks), turns them into HF tensors with
`tp_shards.gather_hf_state_dict` (which refuses replicated copies that differ: ranks that disagree must not
be saved) and streams them into `CheckpointStore.save`, which writes the same directory as at TP=1. The
optimizer state is saved in TP=1 form (`optimizer_state_tp1`): what a TP=1 Apollo's state_dict would be,
sharded moments joined, replicated ones once, plus each rank's rounding streams. Loading at any TP=M,
every rank reads the file and keeps its part (`optimizer_state_for_rank`); at TP=1 it loads as it is.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ..weights.layouts import LayoutError
from ..weights.tp_model import rank0_only_names


def hf_state_dict_of(layout: Any, ranks: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The whole HF state dict from every rank's vLLM tensors (`tp_shards.gather_hf_state_dict`), with rank 0's
    copy of the tensors only rank 0 trains (row-parallel biases: the other ranks' copies are never read)."""
    rank0 = rank0_only_names(layout)  # unpacked: the same names in vLLM
    fixed = [dict(r, **{n: ranks[0][n] for n in rank0 if n in r}) if i else r for i, r in enumerate(ranks)]
    return layout.gather_hf_state_dict(fixed)


__all__ = ["LayoutError", "hf_state_dict_of"]
