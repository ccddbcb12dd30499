"""One tensor-parallel rank's transformers model: views of that rank's vLLM tensors, plus the collectives that
make the ranks together compute the whole model (docs/tensor-parallel.md, "explicit collectives").

The model is built by `hf_model.build_hf_model` from a *local* config (this rank's heads, KV heads,
intermediate size and vocabulary rows), so its parameters are zero-copy views exactly as at TP=1. Hooks then
insert Megatron's two conjugate operators around every tensor-parallel region: at the input of `self_attn`,
`mlp` and `lm_head` (identity forward, all-reduce of the gradient backward) and at the output of `self_attn`
and `mlp` (all-reduce forward, identity backward); the embedding zeroes the rows of tokens another rank holds
and all-reduces. `lm_head` gives this rank's vocabulary columns: `vocab_parallel_cross_entropy` is the loss.
Dense Llama / Qwen3 (explicit `head_dim`); Qwen2 derives head_dim from the head count and is not handled yet.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import nn

from .hf_model import build_hf_model
from .layouts import LayoutError
from .tp_shards import TensorParallelLayout

_ARCHITECTURES = ("LlamaForCausalLM", "Qwen3ForCausalLM")


class _CopyToRegion(torch.autograd.Function):
    """Identity forward; all-reduce (sum) of the gradient backward: every rank's partial input gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromRegion(torch.autograd.Function):
    """All-reduce (sum) forward of the ranks' partial outputs; identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def local_config(tp: TensorParallelLayout) -> Any:
    """The config of the model one rank holds: its share of heads, KV heads, MLP rows and vocabulary rows."""
    c = copy.deepcopy(tp.layout.hf_config)
    c.head_dim = tp.layout.sizes["head_dim"]
    c.num_attention_heads = tp.heads // tp.tp_size
    c.num_key_value_heads = max(1, tp.kv_heads // tp.tp_size)
    c.intermediate_size = tp.layout.sizes["inter"] // tp.tp_size
    c.vocab_size = tp.padded_vocab // tp.tp_size
    return c


def build_tp_rank_model(config: Any, rank_tensors: Mapping[str, torch.Tensor], rank: int, tp_size: int,
                        group: Any = None, **build_kwargs: Any) -> Any:
    """The transformers model of rank `rank`, its parameters views of `rank_tensors` (that rank's vLLM
    `named_parameters()`), with the collectives of `group` (default: the default group) in place.

    Its logits are this rank's vocabulary columns (padding columns included): use
    `vocab_parallel_cross_entropy`. The gradients of `partial_gradient_names` are partial per rank: the
    optimizer sums them (docs/tensor-parallel.md)."""
    tp = TensorParallelLayout(config, tp_size)
    if tp.layout.architecture not in _ARCHITECTURES:
        raise LayoutError(f"tensor-parallel training: {tp.layout.architecture} is not supported yet "
                          f"(supported: {', '.join(_ARCHITECTURES)})")
    if not 0 <= rank < tp_size:
        raise LayoutError(f"rank {rank} is outside tensor parallel size {tp_size}")
    model = build_hf_model(local_config(tp), rank_tensors, **build_kwargs)
    per = tp.padded_vocab // tp_size
    _vocab_parallel_embedding(model.get_input_embeddings(), rank * per, per, group)
    for layer in model.model.layers:
        for region, out_proj in ((layer.self_attn, layer.self_attn.o_proj), (layer.mlp, layer.mlp.down_proj)):
            _tensor_parallel_region(region, group)
            if rank > 0 and out_proj.bias is not None:
                out_proj.bias = None  # a row-parallel bias is added once, by rank 0 (as vLLM does)
    head = model.get_output_embeddings()
    head.register_forward_pre_hook(lambda _m, args: (_CopyToRegion.apply(args[0], group), *args[1:]))
    return model


_INSIDE_REGION = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")
_KV = ("self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.bias")


def partial_gradient_names(tp: TensorParallelLayout) -> tuple[str, ...]:
    """HF names whose gradient on each rank is only that rank's share: replicated parameters used inside a
    tensor-parallel region (Qwen3's q/k norms see this rank's heads only) and, where TP exceeds the KV heads,
    the key/value rows each group of `tp.kv_replicas` ranks holds. The true gradient is their sum over the
    ranks holding the same rows (`Piece.copies` consecutive ranks)."""
    suffixes = _INSIDE_REGION + (_KV if tp.kv_replicas > 1 else ())
    return tuple(n for n in tp.layout.hf_shapes() if n.endswith(suffixes))


_ROW_PARALLEL_BIASES = ("self_attn.o_proj.bias", "mlp.down_proj.bias")


def rank0_only_names(tp: TensorParallelLayout) -> tuple[str, ...]:
    """HF names only rank 0's model holds (and trains): row-parallel biases, which vLLM adds on rank 0 only;
    the other ranks' copies in vLLM's memory are never read (a checkpoint takes rank 0's)."""
    return tuple(n for n in tp.layout.hf_shapes() if n.endswith(_ROW_PARALLEL_BIASES))


def _tensor_parallel_region(module: nn.Module, group: Any) -> None:
    def enter(_m, args, kwargs):
        if args:
            return (_CopyToRegion.apply(args[0], group), *args[1:]), kwargs
        return args, dict(kwargs, hidden_states=_CopyToRegion.apply(kwargs["hidden_states"], group))

    def leave(_m, _args, _kwargs, out):
        if isinstance(out, tuple):
            return (_ReduceFromRegion.apply(out[0], group), *out[1:])
        return _ReduceFromRegion.apply(out, group)

    module.register_forward_pre_hook(enter, with_kwargs=True)
    module.register_forward_hook(leave, with_kwargs=True)


def _vocab_parallel_embedding(embedding: nn.Embedding, start: int, rows: int, group: Any) -> None:
    outside: dict[str, torch.Tensor] = {}

    def enter(_m, args):
        ids = args[0]
        outside["mask"] = (ids < start) | (ids >= start + rows)
        return ((ids - start).masked_fill(outside["mask"], 0), *args[1:])

    def leave(_m, _args, out):
        return _ReduceFromRegion.apply(out.masked_fill(outside.pop("mask").unsqueeze(-1), 0), group)

    embedding.register_forward_pre_hook(enter)
    embedding.register_forward_hook(leave)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, start, real, group):
        logits = logits.float().clone()
        logits[:, real:] = float("-inf")  # vocabulary padding is no token
        top = logits.max(dim=-1).values
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        logits -= top.unsqueeze(-1)
        here = (targets >= start) & (targets < start + logits.shape[-1])
        local = (targets - start).clamp(0, logits.shape[-1] - 1)
        target_logit = logits.gather(1, local.unsqueeze(1)).squeeze(1) * here
        exp = logits.exp()
        total = exp.sum(dim=-1)
        both = torch.stack([target_logit, total])
        dist.all_reduce(both, group=group)
        ctx.save_for_backward(exp / both[1].unsqueeze(-1), here, local)
        return both[1].log() - both[0]

    @staticmethod
    def backward(ctx, grad):
        softmax, here, local = ctx.saved_tensors
        g = softmax.clone()
        g[torch.arange(g.shape[0], device=g.device), local] -= here.to(g.dtype)
        return g * grad.unsqueeze(-1), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_rows: tuple[int, int],
                                 group: Any = None) -> torch.Tensor:
    """Per-token cross-entropy (float32, shape (tokens,)) from this rank's logit columns (tokens, vocabulary
    rows); `vocab_rows`: `TensorParallelLayout.vocab_rows(rank)`. Every rank gets the same numbers; no rank
    gathers the logits."""
    start, real = vocab_rows
    return _VocabParallelCrossEntropy.apply(logits, targets, start, real, group)


def vocab_parallel_top2(logits: torch.Tensor, vocab_rows: tuple[int, int],
                        group: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's two largest logits over every rank's columns (float32, largest first) and their token ids,
    as `early_stop`'s `top2` at TP=1 (`logits`: this rank's (tokens, vocabulary rows)); the same on every rank."""
    start, real = vocab_rows
    tokens = logits.shape[0]
    values = torch.full((tokens, 2), float("-inf"), dtype=torch.float32, device=logits.device)
    ids = torch.zeros((tokens, 2), dtype=torch.float32, device=logits.device)
    k = min(2, real)  # a rank may hold one real row, or padding rows only
    if k:
        top = logits[:, :real].float().topk(k, dim=-1)
        values[:, :k], ids[:, :k] = top.values, (top.indices + start).float()
    # Token ids below 2**24 are exact in float32: one all-gather carries values and ids.
    parts = [torch.empty(2, tokens, 2, dtype=torch.float32, device=logits.device)
             for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, torch.stack([values, ids]), group=group)
    all_values = torch.cat([p[0] for p in parts], dim=-1)  # (tokens, 2 x ranks)
    all_ids = torch.cat([p[1] for p in parts], dim=-1)
    best = all_values.topk(2, dim=-1)
    return best.values, all_ids.gather(-1, best.indices).long()
