"""Which part of each Hugging Face weight a vLLM tensor-parallel rank holds, per architecture.

vLLM splits each layer over N ranks (``vllm/model_executor/layers/linear.py``, ``vocab_parallel_embedding.py``):

* column-parallel (``qkv_proj``, ``gate_up_proj``, their biases): every packed part is split along its rows,
  and each rank packs ITS rows of each part: rank r holds ``[q_r; k_r; v_r]``, ``[gate_r; up_r]``. Query rows
  go by heads; key/value rows by KV heads, and where N exceeds the KV heads each KV head is replicated on
  N / kv_heads consecutive ranks (rank r holds head ``r // replicas``).
* row-parallel (``o_proj``, ``down_proj``): split along the input features (dim 1); a bias is held whole on
  every rank and added by rank 0 only.
* vocab-parallel (``embed_tokens``, ``lm_head``): the vocabulary padded to a multiple of 64 is split in N equal
  row blocks; the rows past the real vocabulary (on the last ranks) are zero padding.
* everything else (RMSNorm weights, Qwen3's per-head q/k norms) is replicated.

The table below says this once per row of ``layouts.py``'s tables; splitting an HF state dict into each rank's
vLLM tensors and gathering them back are derived from it. Checked against vLLM 0.32 on CPU (gloo) at
``--tensor-parallel-size 3`` with SmolLM2-135M (docs/tensor-parallel.md). Dense Llama / Qwen2 / Qwen3 only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Collection, Mapping, Sequence

import torch

from .layouts import LayoutError, ModelLayout, padded_vocab_size

COLUMN, ROW, VOCAB, REPLICATED = "column", "row", "vocab", "replicated"

# vLLM row name (as in layouts.py's tables, relative to the layer) -> how vLLM shards it.
TP_RULES: Mapping[str, str] = {
    "model.embed_tokens.weight": VOCAB,
    "lm_head.weight": VOCAB,
    "model.norm.weight": REPLICATED,
    "input_layernorm.weight": REPLICATED,
    "post_attention_layernorm.weight": REPLICATED,
    "self_attn.qkv_proj.weight": COLUMN,
    "self_attn.qkv_proj.bias": COLUMN,
    "self_attn.o_proj.weight": ROW,
    "self_attn.o_proj.bias": REPLICATED,  # used by rank 0 only (RowParallelLinear.forward)
    "self_attn.q_norm.weight": REPLICATED,
    "self_attn.k_norm.weight": REPLICATED,
    "mlp.gate_up_proj.weight": COLUMN,
    "mlp.gate_up_proj.bias": COLUMN,
    "mlp.down_proj.weight": ROW,
    "mlp.down_proj.bias": REPLICATED,  # used by rank 0 only
}

DENSE_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


@dataclass(frozen=True)
class Piece:
    """On one rank, HF tensor ``hf_name``'s slice ``[hf_start, hf_start + length)`` along ``dim`` lies in vLLM
    tensor ``vllm_name`` at ``[offset, offset + length)`` along the same dim (the other dims whole)."""

    hf_name: str
    vllm_name: str
    dim: int
    hf_start: int
    offset: int
    length: int
    copies: int = 1  # how many consecutive ranks hold these same rows (replicated tensors, KV heads)


@dataclass(frozen=True)
class RankTensor:
    """One vLLM tensor on one rank: its shape and the HF pieces it is packed from (rows past the pieces:
    zero vocabulary padding)."""

    name: str
    shape: tuple[int, ...]
    rule: str
    pieces: tuple[Piece, ...]


class TensorParallelLayout:
    """What each of ``tp_size`` ranks holds for one model config, as vLLM shards it."""

    def __init__(self, config: Any, tp_size: int):
        if tp_size < 1:
            raise LayoutError(f"tensor parallel size must be >= 1, got {tp_size}")
        self.layout = ModelLayout(config)
        if self.layout.architecture not in DENSE_ARCHITECTURES:
            raise LayoutError(f"tensor parallelism: {self.layout.architecture} is not supported yet "
                              f"(supported: {', '.join(DENSE_ARCHITECTURES)})")
        self.tp_size = tp_size
        c, sizes = self.layout.hf_config, self.layout.sizes
        self.heads = int(c.num_attention_heads)
        self.kv_heads = int(getattr(c, "num_key_value_heads", None) or self.heads)
        self.padded_vocab = padded_vocab_size(sizes["vocab"])
        # The same refusals as vLLM's `divide()`, said in words.
        problems = [f"{what} ({n}) is not divisible by the tensor parallel size {tp_size}"
                    for what, n in (("num_attention_heads", self.heads), ("intermediate_size", sizes["inter"]),
                                    ("the padded vocabulary", self.padded_vocab)) if n % tp_size]
        if self.kv_heads % tp_size and tp_size % self.kv_heads:
            problems.append(f"num_key_value_heads ({self.kv_heads}) and the tensor parallel size {tp_size}: "
                            "neither divides the other")
        if problems:
            raise LayoutError(f"{self.layout.architecture} cannot be split in {tp_size} ranks: " + "; ".join(problems))
        self.kv_replicas = max(1, tp_size // self.kv_heads)
        self._rows = self._row_names()

    def _row_names(self) -> dict[str, tuple[str, tuple[tuple[str, str], ...]]]:
        """vLLM name -> (rule, ((HF name, size symbol), ...)) for every tensor in the layout."""
        rows = {}
        for table, prefix in self.layout.plan.tables:
            for vname, parts, _cols, _flag in table:
                full = self.layout.vllm_name(prefix + vname)
                if full in self.layout.vllm_specs:
                    rows[full] = (TP_RULES[vname], tuple((prefix + hf, sym) for hf, sym in parts))
        return rows

    def _part_range(self, symbol: str, rank: int) -> tuple[int, int, int]:
        """(start, length, copies) of rank's rows of a column-parallel part of size `symbol`."""
        size = self.layout.sizes[symbol]
        if symbol == "kv" and self.kv_replicas > 1:
            head_dim = size // self.kv_heads
            return (rank // self.kv_replicas) * head_dim, head_dim, self.kv_replicas
        per = size // self.tp_size
        return rank * per, per, 1

    def vocab_rows(self, rank: int) -> tuple[int, int]:
        """(first token id, number of real tokens) of rank's vocabulary rows; the rest up to
        padded_vocab / tp_size are padding."""
        per = self.padded_vocab // self.tp_size
        return rank * per, max(0, min(per, self.layout.sizes["vocab"] - rank * per))

    def rank_tensor(self, name: str, rank: int) -> RankTensor:
        if not 0 <= rank < self.tp_size:
            raise LayoutError(f"rank {rank} is outside tensor parallel size {self.tp_size}")
        rule, parts = self._rows[name]
        full = self.layout.vllm_specs[name].shape
        if rule == REPLICATED:
            return RankTensor(name, full, rule,
                              tuple(Piece(hf, name, 0, 0, 0, full[0], self.tp_size) for hf, _ in parts))
        if rule == ROW:
            per = full[1] // self.tp_size
            return RankTensor(name, (full[0], per, *full[2:]), rule,
                              (Piece(parts[0][0], name, 1, rank * per, 0, per),))
        if rule == VOCAB:
            start, real = self.vocab_rows(rank)
            pieces = (Piece(parts[0][0], name, 0, start, 0, real),) if real else ()
            return RankTensor(name, (self.padded_vocab // self.tp_size, *full[1:]), rule, pieces)
        pieces, offset = [], 0
        for hf, symbol in parts:
            start, length, copies = self._part_range(symbol, rank)
            pieces.append(Piece(hf, name, 0, start, offset, length, copies))
            offset += length
        return RankTensor(name, (offset, *full[1:]), rule, tuple(pieces))

    def rank_tensors(self, rank: int) -> dict[str, RankTensor]:
        """vLLM name -> what rank `rank` holds, in the layout table's order."""
        return {name: self.rank_tensor(name, rank) for name in self._rows}

    def rank_shapes(self, rank: int) -> dict[str, tuple[int, ...]]:
        return {name: t.shape for name, t in self.rank_tensors(rank).items()}

    # -- both directions ----------------------------------------------------------------------
    def split_hf_state_dict(self, hf_state_dict: Mapping[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
        """Rank `rank`'s vLLM tensors (fresh memory) from a whole HF state dict, as vLLM's loader packs them."""
        self._check_hf(hf_state_dict)
        out = {}
        for name, t in self.rank_tensors(rank).items():
            first = hf_state_dict[self._rows[name][1][0][0]]
            packed = torch.zeros(t.shape, dtype=first.dtype, device=first.device)
            for p in t.pieces:
                packed.narrow(p.dim, p.offset, p.length).copy_(
                    hf_state_dict[p.hf_name].narrow(p.dim, p.hf_start, p.length))
            out[name] = packed
        return out

    def gather_hf_state_dict(self, ranks: Sequence[Mapping[str, torch.Tensor]],
                             names: Collection[str] | None = None) -> dict[str, torch.Tensor]:
        """The whole HF state dict from every rank's vLLM tensors (rank order); `names`: only the HF tensors
        packed in these vLLM tensors (a checkpoint gathers one layer at a time). Replicated tensors and
        replicated KV heads are taken from the lowest rank holding them, after checking that every other
        copy is equal: copies that drifted apart mean the trainer's ranks disagree, which must not pass
        silently into a checkpoint."""
        if len(ranks) != self.tp_size:
            raise LayoutError(f"expected tensors of {self.tp_size} ranks, got {len(ranks)}")
        out: dict[str, torch.Tensor] = {}
        hf_shapes = self.layout.hf_shapes()
        for rank, tensors in enumerate(ranks):
            for name, t in self.rank_tensors(rank).items():
                if names is not None and name not in names:
                    continue
                src = tensors.get(name)
                if src is None or tuple(src.shape) != t.shape:
                    found = None if src is None else tuple(src.shape)
                    raise LayoutError(f"rank {rank}: {name} expected shape {t.shape}, found {found}")
                for p in t.pieces:
                    if p.hf_name not in out:
                        out[p.hf_name] = torch.empty(hf_shapes[p.hf_name], dtype=src.dtype, device=src.device)
                    piece = src.narrow(p.dim, p.offset, p.length)
                    target = out[p.hf_name].narrow(p.dim, p.hf_start, p.length)
                    if rank % p.copies == 0:  # the first of the ranks holding these rows
                        target.copy_(piece)
                    elif not torch.equal(target, piece):
                        raise LayoutError(f"rank {rank}: its copy of {p.hf_name} [{p.hf_start}:"
                                          f"{p.hf_start + p.length}] along dim {p.dim} differs from a lower rank's")
        return out

    def _check_hf(self, hf_state_dict: Mapping[str, torch.Tensor]) -> None:
        want = self.layout.hf_shapes()
        if self.layout.tied:
            want.pop("lm_head.weight")
        problems = [f"{n}: expected shape {s}, found "
                    f"{None if hf_state_dict.get(n) is None else tuple(hf_state_dict[n].shape)}"
                    for n, s in want.items() if hf_state_dict.get(n) is None or tuple(hf_state_dict[n].shape) != s]
        problems += [f"unexpected HF tensor {n!r}" for n in hf_state_dict if n not in want]
        if problems:
            raise LayoutError(f"{self.layout.architecture} state dict does not match the config: "
                              + "; ".join(problems[:8]))


def tp_layout_for(config: Any, tp_size: int) -> TensorParallelLayout:
    """The tensor-parallel layout of `config` at `tp_size` ranks; LayoutError if vLLM could not split it."""
    return TensorParallelLayout(config, tp_size)
