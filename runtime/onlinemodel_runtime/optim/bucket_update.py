"""The update of one bucket (the parameters of one decoder layer): the one function every path
runs. Eager on CPU (and with fused=False), with seeded rounding bits and chunked weight writes;
`COMPILED`, the same function through torch.compile (CUDA's default; fused=True elsewhere), a
single graph for the whole bucket; on CUDA that graph is then captured and replayed
(compiled_buckets.py, graphs.py).

Why one graph per bucket: the eager path launches ~45 small kernels per parameter from Python, and
one compiled graph per parameter still cost ~0.4 ms of host time each (guard check, argument
handling, launches) on autograd's thread, which made a Qwen3 step host-bound (1.7B: 226 ms vs
fused AdamW's 96 ms). Here the host cost is paid once per decoder layer, not once per matrix.

All-or-nothing per bucket: every item's new values are computed first, then committed under one
flag `gate & all(item finite)`.

`consts` is a float32 (items, len(CONSTS)) tensor, one `functional.const_row` per item, so changing
lr, step or any float hyperparameter never recompiles; `spec` holds the structural flags
(apollo, left, channel, rounding) per item, which do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from .functional import (CONSTS, DECAY, LR, adamw_direction, apollo_direction, const_row, project_off,
                         projects_left)
from .rounding import apply_update_, needs_residual

# One graph per distinct bucket signature (shapes + spec): a model has ~3 (a decoder layer, the
# embedding, the final norm), a process that trains several model shapes more than dynamo's
# default of 8 per function; past the limit dynamo would silently run the Python eagerly.
RECOMPILE_LIMIT = 64


def bucket_update(spec, ws, grads, projs, exp_avgs, exp_avg_sqs, limiter_norms, residuals, bases, consts, gate,
                  generator=None, chunk_elems=None):
    """Update every item of a bucket, all or nothing. spec[i] = (apollo, left, channel,
    rounding, kept out); projs and limiter_norms list the APOLLO items only, residuals the items that carry a
    remainder (compensated bf16, rounding.needs_residual), bases the items whose update is kept out of a
    basis's span (Apollo.keep_out), each in order. generator and chunk_elems: the eager path's
    (rounding.apply_update_). Returns the 0-dim bool flag: gate and every item's gradient and update finite."""
    results = []
    j = 0
    for i, (apollo, left, channel, _, _) in enumerate(spec):
        if apollo:
            m, v, norm, coeff, ok_i = apollo_direction(
                grads[i], projs[j], exp_avgs[i], exp_avg_sqs[i], limiter_norms[j], consts[i],
                left=left, channel=channel)
            src = grads[i]
            j += 1
        else:
            m, v, src, coeff, ok_i = adamw_direction(grads[i], exp_avgs[i], exp_avg_sqs[i], consts[i])
            norm = None
        results.append((m, v, norm, src, coeff, ok_i))
    ok = gate & torch.stack([r[5] for r in results]).all()
    j = k = b = 0
    for i, (m, v, norm, src, coeff, _) in enumerate(results):
        commit(ok, (exp_avgs[i], m), (exp_avg_sqs[i], v), (limiter_norms[j], norm) if norm is not None else None)
        j += norm is not None
        if spec[i][4]:  # the whole update, coefficients applied, projected (here: one float32 copy at a time), then
            # written with a coefficient of 1. The limiter's reference stays the norm before the projection.
            src, coeff = project_off(coeff * src.float(), bases[b], inplace=True), torch.ones_like(consts[i][LR])
            b += 1
        residual = None
        if needs_residual(spec[i][3], ws[i]):
            residual = residuals[k]
            k += 1
        apply_update_(ws[i], src, coeff, decay=consts[i][DECAY], ok=ok, rounding=spec[i][3],
                      generator=generator, residual=residual, chunk_elems=chunk_elems)
    return ok


def same_width(bases: dict[Any, torch.Tensor]) -> dict[Any, torch.Tensor]:
    """`bases` ({key: (n, k) basis}) with every basis widened by zero columns to the widest one of its rows, dtype
    and device, and contiguous (one copy per basis tensor, shared where the input was). The compiled update is
    specialized to its arguments' shapes and strides: one width per kind of basis gives every decoder layer's
    bucket the same signature, so the model compiles one graph for them all; a width per layer compiled one graph
    per layer (a served SmolLM2's first step on an H200 waited 6.5 minutes). A zero column projects nothing off
    (project_off), so the update is the same."""
    def kind(u: torch.Tensor) -> tuple:
        return u.shape[0], u.dtype, u.device

    widest: dict[tuple, int] = {}
    for u in bases.values():
        widest[kind(u)] = max(widest.get(kind(u), 0), u.shape[1])
    widened: dict[int, torch.Tensor] = {}
    out = {}
    for key, u in bases.items():
        k = widest[kind(u)]
        if (u.shape[1] < k or not u.is_contiguous()) and id(u) not in widened:  # strides are specialized on too
            widened[id(u)] = torch.cat([u, u.new_zeros(u.shape[0], k - u.shape[1])], dim=1)
        out[key] = widened.get(id(u), u)
    return out


def commit(ok, *pairs) -> None:
    """(state tensor, new value) pairs: each state tensor takes its new value where `ok` (None: no pair)."""
    for pair in pairs:
        if pair is not None:
            pair[0].copy_(torch.where(ok, pair[1], pair[0]))


class Prepared(NamedTuple):
    """One parameter of a bucket, ready for its update: `step` is the step being taken (1-based),
    `proj` the projection in force (None: dense AdamW), `basis` the one its update is kept out of (None:
    none; Apollo.keep_out)."""

    group: dict[str, Any]
    param: torch.Tensor
    grad: torch.Tensor
    state: dict[str, Any]
    step: int
    proj: torch.Tensor | None
    basis: torch.Tensor | None = None


@dataclass
class BucketArgs:
    """bucket_update's tensor arguments for a bucket, and its rows of constants (not yet uploaded)."""

    spec: tuple
    ws: list[torch.Tensor]
    grads: list[torch.Tensor]
    projs: list[torch.Tensor]
    ms: list[torch.Tensor]
    vs: list[torch.Tensor]
    lims: list[torch.Tensor]
    res: list[torch.Tensor]
    bases: list[torch.Tensor]
    rows: list[list[float]]

    @classmethod
    def of(cls, prepared: list[Prepared]) -> "BucketArgs":
        args = cls((), [], [], [], [], [], [], [], [], [])
        spec = []
        for group, p, grad, st, step, proj, basis in prepared:
            apollo = proj is not None
            spec.append((apollo, apollo and projects_left(tuple(p.shape)), group["scale"] == "channel",
                         group["rounding"], basis is not None))
            args.rows.append(const_row(group, step))
            args.ws.append(p.data)
            args.grads.append(grad)
            args.ms.append(st["exp_avg"])
            args.vs.append(st["exp_avg_sq"])
            if apollo:
                args.projs.append(proj)
                args.lims.append(st["limiter_norm"])
            if "residual" in st:
                args.res.append(st["residual"])
            if basis is not None:
                args.bases.append(basis)
        args.spec = tuple(spec)
        return args

    def call(self, fn: Any, consts: torch.Tensor, gate: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return fn(self.spec, self.ws, self.grads, self.projs, self.ms, self.vs, self.lims, self.res, self.bases,
                  consts, gate, **kwargs)


class ConstBuffers:
    """The per-step constants in a per-(device, row count) buffer that every compiled call and
    graph reads. Re-uploaded only when the rows change: in a normal step every decoder layer has
    the same rows (same step and hyperparameters), so once per step. Writes and reads are ordered
    by the streams' events (graphs.BucketGraph.run)."""

    def __init__(self) -> None:
        self._bufs: dict[tuple, tuple[torch.Tensor, Any]] = {}  # (device, rows) -> (buffer, key)
        self.serial = 0  # steps begun: hyperparameters may change between steps, not within one

    def new_step(self) -> None:
        self.serial += 1

    def holds(self, device: torch.device, n_rows: int, key: Any) -> bool:
        return self._bufs.get((device, n_rows), (None, None))[1] == key

    def load(self, rows: list[list[float]], device: torch.device, key: Any = None) -> torch.Tensor:
        """The buffer holding `rows`; `key`: what identifies them (default: the rows themselves)."""
        slot = (device, len(rows))
        buf, loaded = self._bufs.get(slot, (None, None))
        if key is None:
            key = tuple(map(tuple, rows))
        if buf is None:
            buf = torch.empty((len(rows), len(CONSTS)), dtype=torch.float32, device=device)
        if loaded != key:
            src = torch.tensor(rows, dtype=torch.float32)
            if device.type == "cuda":  # pinned + non_blocking: a pageable copy would sync
                buf.copy_(src.pin_memory(), non_blocking=True)
            else:
                buf.copy_(src)
            self._bufs[slot] = (buf, key)
        return buf


class Compiled:
    """The lazily compiled bucket_update, shared by every optimizer of the process; `ok` is False
    once compilation failed (callers then run bucket_update eagerly)."""

    def __init__(self) -> None:
        self.fn = None
        self.ok = True

    def get(self):
        if self.fn is None:
            cfg = torch._dynamo.config
            name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
            if getattr(cfg, name) < RECOMPILE_LIMIT:
                setattr(cfg, name, RECOMPILE_LIMIT)
            # Static shapes: the decoder layers of a model share one signature, so this compiles
            # about three graphs per model, each with kernels specialized to its shapes.
            self.fn = torch.compile(bucket_update, dynamic=False, fullgraph=True)
        return self.fn


COMPILED = Compiled()
