"""APOLLO under tensor parallelism (docs/tensor-parallel.md, "APOLLO under TP"): `Apollo(..., tp=...)`'s
component; None at TP=1, where nothing here runs.

Each rank's optimizer holds its own pieces of the model's tensors under their HF names, and a `Shard` per
name says where its piece lies in the whole HF tensor. Projections (side, rank, seed) are those of the
whole matrix: every rank generates TP=1's projection and uses the columns its rows contract with. Per
parameter (`plan_of`):

- KEPT: the projection keeps the sharded dimension (o_proj, down_proj; gate/up projected on the right):
  R and its moments are this rank's slice of TP=1's, and so is a channel-wise scale; the tensor-wise
  scale's norms, ||G|| and the limiter's ||scale G|| are sums of squares over the ranks.
- CONTRACTED: the projection contracts the sharded dimension (q/k/v projected on the left): each rank's
  P_r G_r is a partial sum of R; the sum is shared, then moments and scale are computed on every rank
  (replicated), ||G|| (per matrix, or per kept channel) from sums of squares.
- WHOLE: the gradient itself is shared, summed (partial gradients: KV heads held by several ranks,
  Qwen3's q/k norms) or rank 0's (replicated parameters such as norm weights, whose copies' gradients
  may differ by an ulp), and every rank computes TP=1's update of the whole tensor and writes its rows.
- LOCAL: nothing to share (elementwise AdamW of a sharded tensor; a tensor only this rank trains, such
  as a row-parallel bias, which vLLM adds on rank 0 only).

One collective per bucket (decoder layer) carries all of it plus the step's finite verdict. It is an
all-gather followed by a sum in rank order, so every rank gets bitwise the same numbers: an
all-reduce's result may differ by an ulp between ranks (measured with vLLM's shared-memory all-reduce,
docs/tensor-parallel.md), and replicated moments, scales and weights must never drift apart (a
checkpoint's gather refuses copies that differ). Stochastic rounding of weights several ranks hold draws
from one stream that every rank advances alike; sharded weights draw from each rank's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.distributed as dist

from .functional import (DECAY, adam_moments, adamw_direction, apollo_direction, effective_rank, grad_norm,
                         limited_update, project, projected_shape, projects_left, scale_of)
from .rounding import DEFAULT_CHUNK_ELEMS, RoundingGenerators, apply_update_
from .bucket_update import commit

KEPT, CONTRACTED, WHOLE, LOCAL = "kept", "contracted", "whole", "local"
SHARED_STREAM = "tp-shared"  # rounding bits of weights several ranks hold


@dataclass(frozen=True)
class Shard:
    """Where one rank's tensor lies in the whole HF tensor of `global_shape`: its first `length`
    entries along `dim` are the whole tensor's [start, start + length) (entries past `length`:
    vocabulary padding); dim None: the whole tensor. `copies` consecutive ranks hold these same
    entries; `partial`: each rank's gradient is its share, the true one their sum."""

    global_shape: tuple[int, ...]
    dim: int | None = None
    start: int = 0
    length: int = 0
    copies: int = 1
    partial: bool = False

    def real(self, t: torch.Tensor) -> torch.Tensor:
        """`t` (this rank's tensor, or one shaped like it) without its padding."""
        return t if self.dim is None else t.narrow(self.dim, 0, self.length)

    def mine(self, whole: torch.Tensor) -> torch.Tensor:
        """This rank's entries of a tensor of the whole shape."""
        return whole if self.dim is None else whole.narrow(self.dim, self.start, self.length)


@dataclass(frozen=True)
class Plan:
    """How one parameter is updated under TP: its kind (module docstring), the whole matrix's
    projection side and rank, and the numbers it puts into the bucket's collective."""

    kind: str
    shard: Shard | None
    apollo: bool
    left: bool = True
    channel: bool = False
    rank: int = 0
    slots: int = 0
    first: bool = False  # the slots take rank 0's numbers, not the sum


def plan_of(name: str, p: torch.Tensor, group: Mapping[str, Any], shard: Shard | None) -> Plan:
    apollo = group["algorithm"] == "apollo" and p.dim() in (2, 3)
    if apollo and p.dim() == 3 and shard is not None:
        raise ValueError(f"{name}: batches of matrices (MoE experts) are not supported under tensor parallelism")
    if shard is None:
        return Plan(LOCAL, None, apollo)
    if shard.dim is not None and shard.copies > 1 and not shard.partial:
        raise ValueError(f"{name}: a sharded tensor held by {shard.copies} ranks must have partial gradients")
    whole = shard.global_shape
    numel = math.prod(whole)
    if shard.partial or (shard.dim is None and shard.copies > 1):
        return Plan(WHOLE, shard, apollo, projects_left(whole) if apollo else True,
                    group["scale"] == "channel", effective_rank(whole, group["rank"]) if apollo else 0,
                    numel, first=not shard.partial)
    if not apollo or shard.dim is None:
        return Plan(LOCAL, shard, apollo)
    left, channel, rank = projects_left(whole), group["scale"] == "channel", effective_rank(whole, group["rank"])
    contracted = 0 if left else 1
    if shard.dim != contracted:
        return Plan(KEPT, shard, True, left, channel, rank, 2 if channel else 3)
    kept = whole[1 - contracted]
    return Plan(CONTRACTED, shard, True, left, channel, rank, rank * kept + (kept if channel else 1))


class TensorParallel:
    """The tensor-parallel context of one rank's optimizer: `shards` (HF name -> Shard) for every tensor
    the ranks share or split (a name missing: a tensor of this rank alone), and `group`, the trainer's
    process group (default: the default group; never vLLM's)."""

    def __init__(self, shards: Mapping[str, Shard], group: Any = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        for name, s in shards.items():
            if s.copies < 1 or self.size % s.copies or s.dim not in (None, 0, 1) or s.length < 0:
                raise ValueError(f"{name}: invalid shard {s} for tensor parallel size {self.size}")
        self.shards = dict(shards)

    @classmethod
    def from_layout(cls, layout: Any, group: Any = None) -> "TensorParallel":
        """The context of this rank (its rank in `group`) for a `weights.tp_shards.TensorParallelLayout`,
        as `weights.tp_model.build_tp_rank_model` builds the rank's model (imported here: nothing else in
        the optimizer depends on weights/)."""
        from ..weights.tp_model import partial_gradient_names, rank0_only_names
        from ..weights.tp_shards import REPLICATED, VOCAB

        rank = dist.get_rank(group)
        if dist.get_world_size(group) != layout.tp_size:
            raise ValueError(f"the group has {dist.get_world_size(group)} ranks, the layout {layout.tp_size}")
        whole, partial, rank0 = layout.layout.hf_shapes(), set(partial_gradient_names(layout)), rank0_only_names(layout)
        shards = {}
        for t in layout.rank_tensors(rank).values():
            if t.rule == VOCAB and not t.pieces:  # this rank holds only padding rows
                hf = t.name  # vocab-parallel tensors keep their HF name
                shards[hf] = Shard(whole[hf], 0, whole[hf][0], 0)
            for piece in t.pieces:
                if piece.hf_name in rank0:
                    continue  # rank 0's alone: a LOCAL parameter there, absent elsewhere
                shards[piece.hf_name] = Shard(whole[piece.hf_name], None if t.rule == REPLICATED else piece.dim,
                                              piece.hf_start, piece.length, piece.copies, piece.hf_name in partial)
        return cls(shards, group)

    # ------------------------------------------------------------------ shapes
    def shard(self, name: str | None) -> Shard | None:
        return self.shards.get(name) if name is not None else None

    def projection_shape(self, name: str, p: torch.Tensor) -> tuple[int, ...]:
        s = self.shard(name)
        return tuple(p.shape) if s is None else s.global_shape

    def moment_shape(self, name: str | None, p: torch.Tensor, group: Mapping[str, Any]) -> tuple[int, ...]:
        """Shape of the parameter's Adam moments on this rank."""
        plan = plan_of(name, p, group, self.shard(name))
        if not plan.apollo:
            return tuple(plan.shard.real(p).shape) if plan.shard is not None else tuple(p.shape)
        if plan.kind == KEPT:
            return _kept_shape(plan, tuple(plan.shard.real(p).shape))
        shape = tuple(p.shape) if plan.shard is None else plan.shard.global_shape
        return projected_shape(shape, effective_rank(shape, group["rank"]))

    def state_shard(self, name: str, p: torch.Tensor, group: Mapping[str, Any], key: str) -> Shard | None:
        """Where this rank's optimizer state tensor `key` of parameter `name` lies in TP=1's (the
        checkpoint's form, checkpoint/tp_gather.py): a Shard along its dim, or None: the whole of it."""
        plan = plan_of(name, p, group, self.shard(name))
        s = plan.shard
        if s is None or key not in ("exp_avg", "exp_avg_sq") or s.dim is None or (plan.apollo and plan.kind != KEPT):
            return None
        if not plan.apollo:
            return Shard(s.global_shape, s.dim, s.start, s.length, s.copies)
        whole = projected_shape(s.global_shape, plan.rank)
        return Shard(whole, s.dim, s.start, s.length, s.copies)

    # ------------------------------------------------------------------ collectives
    def check_same(self, signature: Any) -> None:
        """Every rank must update the same buckets and train the same shared tensors with the same
        hyperparameters (the bucket collectives pair up by it): one all-gather at construction."""
        everyone: list[Any] = [None] * self.size
        dist.all_gather_object(everyone, signature, group=self.group)
        for rank, other in enumerate(everyone):
            if other != signature:
                raise ValueError(f"tensor parallel rank {rank} trains other buckets, shared tensors or "
                                 f"hyperparameters than rank {self.rank}")

    def agree(self, flag: bool, device: torch.device) -> bool:
        """True on every rank if `flag` is true on every rank."""
        t = torch.tensor([int(flag)], dtype=torch.int32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return bool(t.item())

    def exact_sum(self, buf: torch.Tensor, first: list[tuple[int, int]]) -> torch.Tensor:
        """The ranks' `buf` summed in rank order (bitwise the same on every rank); in the `first`
        ranges, rank 0's numbers."""
        everyone = torch.empty(self.size * buf.numel(), dtype=buf.dtype, device=buf.device)
        dist.all_gather_single(everyone, buf, group=self.group)
        parts = everyone.view(self.size, -1)
        total = parts[0].clone()
        for r in range(1, self.size):
            total += parts[r]
        for start, stop in first:
            total[start:stop] = parts[0, start:stop]
        return total

    # ------------------------------------------------------------------ one bucket
    @torch.no_grad()
    def update_bucket(self, prepared: list, names: Mapping[torch.Tensor, str], consts: torch.Tensor,
                      gate: torch.Tensor, rounding: RoundingGenerators) -> torch.Tensor:
        """The tensor-parallel counterpart of bucket_update.bucket_update (eager): local numbers, one
        exact sum over the ranks, then the same update on every rank; all or nothing, on every rank
        alike. `prepared`: bucket_update.Prepared items, their projections of the whole matrices."""
        plans = [plan_of(names.get(it.param), it.param, it.group, self.shard(names.get(it.param)))
                 for it in prepared]
        offsets, first, size = [], [], 0
        for plan in plans:
            offsets.append(size)
            if plan.first:
                first.append((size, size + plan.slots))
            size += plan.slots
        buf = torch.zeros(size + 1, dtype=torch.float32, device=gate.device)
        local = [_local(plan, it, buf[off:off + plan.slots], consts[i])
                 for i, (plan, it, off) in enumerate(zip(plans, prepared, offsets))]
        # The verdict so far: this rank's gate and its LOCAL parameters' (no other rank computes those).
        buf[size] = torch.stack([~gate] + [~r[5] for r, _ in local if r is not None]).sum()
        total = self.exact_sum(buf, first)
        ok = total[size] == 0
        results = []
        for i, (plan, it, off, (done, carry)) in enumerate(zip(plans, prepared, offsets, local)):
            if done is None:
                done = _finish(plan, it, total[off:off + plan.slots], consts[i], carry)
                ok = ok & done[5]  # computed from the shared numbers: the same on every rank
            results.append(done)
        seed = prepared[0].group["seed"]
        for i, (plan, it, (m, v, norm, src, coeff, _)) in enumerate(zip(plans, prepared, results)):
            st = it.state
            commit(ok, (st["exp_avg"], m), (st["exp_avg_sq"], v), (st["limiter_norm"], norm) if plan.apollo else None)
            stream = SHARED_STREAM if plan.kind == WHOLE else f"tp-rank{self.rank}"
            real = plan.shard.real if plan.shard is not None else (lambda t: t)
            residual = st.get("residual")
            apply_update_(real(it.param.data), src, coeff, decay=consts[i][DECAY], ok=ok, rounding=it.group["rounding"],
                          generator=rounding.get(gate.device, seed, stream),
                          residual=None if residual is None else real(residual), chunk_elems=DEFAULT_CHUNK_ELEMS)
        gate.copy_(ok)
        return ok


def _kept_shape(plan: Plan, real: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of a KEPT parameter's R on this rank: the whole matrix's side, this rank's rows/columns."""
    return (plan.rank, real[1]) if plan.left else (real[0], plan.rank)


def _local(plan: Plan, it: Any, slots: torch.Tensor, c: torch.Tensor) -> tuple[Any, Any]:
    """Before the collective: (a LOCAL parameter's result, None); for the others their numbers are
    written into `slots` and the result is (None, what _finish needs of this rank's values)."""
    st, shard = it.state, plan.shard
    grad = shard.real(it.grad) if shard is not None else it.grad
    if plan.kind == LOCAL:
        if plan.apollo:
            m, v, norm, coeff, ok = apollo_direction(grad, it.proj, st["exp_avg"], st["exp_avg_sq"],
                                                     st["limiter_norm"], c, left=projects_left(tuple(grad.shape)),
                                                     channel=it.group["scale"] == "channel")
            return (m, v, norm, grad, coeff, ok), None
        m, v, d, coeff, ok = adamw_direction(grad, st["exp_avg"], st["exp_avg_sq"], c)
        return (m, v, None, d, coeff, ok), None
    if plan.kind == WHOLE:
        shard.mine(slots.view(shard.global_shape)).copy_(grad)
    elif plan.kind == CONTRACTED:
        proj = it.proj.narrow(-1, shard.start, shard.length)
        r = project(grad, proj, plan.left)
        slots[:r.numel()] = r.reshape(-1)
        slots[r.numel():] = _contracted_grad_norms(grad, plan).square().reshape(-1)
    else:  # KEPT: R and its moments are this rank's slice of TP=1's
        r = project(grad, it.proj, plan.left)
        m, v, r_tilde = adam_moments(r, st["exp_avg"], st["exp_avg_sq"], c)
        if plan.channel:  # the channels are this rank's: their scale is complete here
            dim = -2 if plan.left else -1
            r_norms = torch.linalg.vector_norm(r, dim=dim, keepdim=True)
            scale = scale_of(torch.linalg.vector_norm(r_tilde, dim=dim, keepdim=True), r_norms)
            slots[0] = (scale * grad_norm(grad, dim, keepdim=True)).square().sum()
            slots[1] = r_norms.square().sum()
            return None, (m, v, scale)
        slots[0] = r.square().sum()
        slots[1] = r_tilde.square().sum()
        slots[2] = grad_norm(grad).square()
        return None, (m, v, None)
    return None, None


def _contracted_grad_norms(grad: torch.Tensor, plan: Plan) -> torch.Tensor:
    """||G|| (tensor-wise), or its norms per channel of the kept dimension (channel-wise), of this rank's rows."""
    if not plan.channel:
        return grad_norm(grad)
    return grad_norm(grad, -2 if plan.left else -1, keepdim=True)


def _finish(plan: Plan, it: Any, shared: torch.Tensor, c: torch.Tensor, carry: Any):
    """After the collective: (exp_avg, exp_avg_sq, limiter norm, source, coeff, ok) as bucket_update's
    directions, from `shared` (this parameter's summed numbers) and `carry` (_local's); the norms, the
    limiter and `ok` are the same on every rank."""
    st, shard = it.state, plan.shard
    grad = shard.real(it.grad)
    if plan.kind == WHOLE:
        whole = shared.view(shard.global_shape)
        if not plan.apollo:
            m, v, d, coeff, _ = adamw_direction(shard.mine(whole), st["exp_avg"], st["exp_avg_sq"], c)
            return m, v, None, d, coeff, torch.isfinite(grad_norm(whole))  # the same on every rank
        m, v, norm, coeff, ok = apollo_direction(whole, it.proj, st["exp_avg"], st["exp_avg_sq"], st["limiter_norm"],
                                                 c, left=plan.left, channel=plan.channel)
        if shard.dim is not None and coeff.shape[shard.dim] > 1:
            coeff = shard.mine(coeff)
        return m, v, norm, shard.mine(whole), coeff, ok
    matrix = (-2, -1)
    dim = -2 if plan.left else -1
    if plan.kind == CONTRACTED:
        n_r = math.prod(projected_shape(shard.global_shape, plan.rank))
        r = shared[:n_r].view(projected_shape(shard.global_shape, plan.rank))
        g_norms = shared[n_r:].sqrt()
        m, v, r_tilde = adam_moments(r, st["exp_avg"], st["exp_avg_sq"], c)
        if plan.channel:
            r_norms = torch.linalg.vector_norm(r, dim=dim, keepdim=True)
            scale = scale_of(torch.linalg.vector_norm(r_tilde, dim=dim, keepdim=True), r_norms)
            scaled_norm = torch.linalg.vector_norm(scale * g_norms.view(r_norms.shape), dim=matrix)
            r_norm = torch.linalg.vector_norm(r_norms, dim=matrix)
        else:
            r_norm = torch.linalg.vector_norm(r, dim=matrix)
            scale = scale_of(torch.linalg.vector_norm(r_tilde, dim=matrix), r_norm)
            scaled_norm = scale * g_norms[0]
            scale = scale[..., None, None]
    else:
        m, v, scale = carry
        if plan.channel:
            scaled_norm, r_norm = shared[0].sqrt(), shared[1].sqrt()
        else:
            r_norm = shared[0].sqrt()
            scale = scale_of(shared[1].sqrt(), r_norm)
            scaled_norm = scale * shared[2].sqrt()
            scale = scale[..., None, None]
    norm, coeff, ok = limited_update(scale, scaled_norm, r_norm, st["limiter_norm"], c, shard.global_shape)
    return m, v, norm, grad, coeff, ok
