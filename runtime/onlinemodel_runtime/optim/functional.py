"""Pure APOLLO math for one parameter (Zhu et al., arXiv 2412.05270, Algorithm 1): the one
implementation that every path runs (eager torch ops, torch.compile, CUDA-graph replay; see
bucket_update.py).

Nothing here keeps state: callers pass the moments in and get new ones back, so the optimizer can
commit them conditionally (no GPU->CPU sync on the hot path). The per-step scalars come in as one
float32 row per parameter (`const_row`, columns `CONSTS`), so that a new learning rate or step
never recompiles a graph; the same row drives the eager path.

Shapes: the gradient G is m-by-n. The random projection P removes the SMALLER dimension:
  m <= n: P is (r, m), R = P @ G is (r, n)     ("left")
  m >  n: P is (r, n), R = G @ P^T is (m, r)   ("right")
so R (and each Adam moment) has r * max(m, n) elements. (The authors' code projects a square
matrix on the right: docs/optimizer.md, "Where the update differs from the authors' code".)
A 3-D parameter (E, m, n) is a batch of E independent m-by-n matrices (a layer's fused MoE
experts): every quantity above gets the leading E, so each expert has its own projection, moments,
scale and limiter reference, computed in one batched call.
"""

from __future__ import annotations

import hashlib
import math

import torch

_SEED_MASK = (1 << 63) - 1
# Columns of a parameter's row of per-step constants (computed in float64 on the host).
CONSTS = ("lr", "bias_correction1", "bias_correction2", "decay", "beta1", "one_minus_beta1", "beta2",
          "one_minus_beta2", "eps", "alpha", "growth_limit")
(LR, BC1, BC2, DECAY, BETA1, ONE_M_B1, BETA2, ONE_M_B2, EPS, ALPHA, GAMMA) = range(len(CONSTS))


def const_row(group: dict, step: int) -> list[float]:
    """The row of `CONSTS` for a parameter of `group` at (1-based) `step`. norm_growth_limit=None
    (growth_limit inf) turns the limiter off, and with it the first-update cap (its starting
    reference)."""
    lr, (beta1, beta2), limit = group["lr"], group["betas"], group["norm_growth_limit"]
    return [lr, 1.0 - beta1**step, 1.0 - beta2**step, 1.0 - lr * group["weight_decay"],
            beta1, 1.0 - beta1, beta2, 1.0 - beta2, group["eps"], group["alpha"],
            math.inf if limit is None else limit]


def param_seed(name: str, base_seed: int = 0) -> int:
    """Stable 63-bit seed from a parameter's NAME (never its position in a list).

    hashlib, not hash(): Python's str hash is salted per process, which would break resume.
    Same-shaped layers get different names and therefore different projections.
    """
    digest = hashlib.sha256(f"{base_seed}:{name}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & _SEED_MASK


def projection_seed(seed: int, step: int, update_proj_gap: int) -> int:
    """Seed of the projection in force at (1-based) `step`: a new one every update_proj_gap steps."""
    period = (step - 1) // update_proj_gap
    digest = hashlib.sha256(f"{seed}:{period}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & _SEED_MASK


def projects_left(shape: tuple[int, ...]) -> bool:
    """Whether a matrix (or each matrix of a batch) of `shape` is projected on the left."""
    m, n = shape[-2:]
    return m <= n


def effective_rank(shape: tuple[int, ...], rank: int) -> int:
    """The projection rank used for a parameter of `shape`: at most the smaller matrix dimension."""
    return min(rank, *shape[-2:])


def projected_shape(shape: tuple[int, ...], rank: int) -> tuple[int, ...]:
    """Shape of R and of its Adam moments (the batch dimension, if any, kept in front)."""
    *batch, m, n = shape
    return (*batch, rank, n) if projects_left(shape) else (*batch, m, rank)


def projection_matrix(
    shape: tuple[int, ...],
    rank: int,
    seed: int,
    *,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Gaussian (rank, k) matrix with N(0, 1/rank) entries, k = min(m, n); regenerated, never stored.
    For a batch (E, m, n): (E, rank, k), one independent matrix per member (drawn at once).

    The 1/rank variance keeps E||P g||^2 = ||g||^2 (Johnson-Lindenstrauss), so the projected
    gradient has the full gradient's scale and `eps` means the same as in AdamW.
    A given seed gives the same matrix on a given device type; CPU and CUDA RNG streams differ.
    """
    device = torch.device(device)
    *batch, m, n = shape
    if generator is None:
        generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    p = torch.randn((*batch, rank, min(m, n)), generator=generator, device=device, dtype=torch.float32)
    return p.mul_(1.0 / math.sqrt(rank))


def grad_norm(grad: torch.Tensor, dim: int | tuple[int, ...] | None = None, keepdim: bool = False
              ) -> torch.Tensor:
    """float32 norm(s) of a possibly bf16 gradient, not rounded to bf16 on the way (a compiled
    graph would not round it, the eager op would). Measured: dtype=float32 makes no float32 copy
    of a bf16 gradient (CPU, torch 2.13; CUDA, torch 2.11)."""
    return torch.linalg.vector_norm(grad, dim=dim, keepdim=keepdim, dtype=torch.float32)


def project(grad: torch.Tensor, proj: torch.Tensor, left: bool) -> torch.Tensor:
    """R = P G (left) or G P^T (right), in float32 (batched over a leading expert dimension).
    The matmul runs in the gradient's dtype so a bf16 gradient is never copied to a full-size
    float32 temporary."""
    p = proj.to(grad.dtype)
    return (p @ grad if left else grad @ p.mT).float()


def adam_moments(x, exp_avg, exp_avg_sq, c):
    """New first and second moments of x and the bias-corrected direction m_hat / (sqrt(v_hat) + eps)."""
    m = exp_avg * c[BETA1] + x * c[ONE_M_B1]
    v = exp_avg_sq * c[BETA2] + x * x * c[ONE_M_B2]
    return m, v, (m / c[BC1]) / ((v / c[BC2]).sqrt() + c[EPS])


def apollo_direction(grad, proj, exp_avg, exp_avg_sq, prev_norm, c, *, left: bool, channel: bool):
    """One APOLLO step for an m-by-n gradient, or a batch (E, m, n) of independent ones (experts);
    inputs are not modified. `c`: the parameter's row of CONSTS; `prev_norm`: the limiter's
    reference per matrix (float32, shape () or (E,); 0: no update applied yet).

    Returns (exp_avg, exp_avg_sq, update_norm, coeff, ok): the new weight is
    `w * decay + coeff (*) G`, coeff = -lr * alpha * limit * scale, per matrix (shape (..., 1, 1)
    for scale="tensor"; one factor per column (..., 1, n) or per row (..., m, 1) for "channel");
    update_norm = ||scale (*) G|| after the limiter per matrix (its next reference); ok: every
    number involved is finite.
    """
    r = project(grad, proj, left)
    m, v, r_tilde = adam_moments(r, exp_avg, exp_avg_sq, c)
    matrix = (-2, -1)
    if channel:  # one factor per row/column of the dimension the projection keeps
        dim = -2 if left else -1
        r_norms = torch.linalg.vector_norm(r, dim=dim, keepdim=True)
        scale = scale_of(torch.linalg.vector_norm(r_tilde, dim=dim, keepdim=True), r_norms)
        scaled_norm = torch.linalg.vector_norm(scale * grad_norm(grad, dim, keepdim=True), dim=matrix)
        r_norm = torch.linalg.vector_norm(r_norms, dim=matrix)
    else:
        r_norm = torch.linalg.vector_norm(r, dim=matrix)
        scale = scale_of(torch.linalg.vector_norm(r_tilde, dim=matrix), r_norm)
        scaled_norm = scale * grad_norm(grad, matrix)
        scale = scale[..., None, None]
    update_norm, coeff, ok = limited_update(scale, scaled_norm, r_norm, prev_norm, c, grad.shape)
    return m, v, update_norm, coeff, ok


def scale_of(r_tilde_norm: torch.Tensor, r_norm: torch.Tensor) -> torch.Tensor:
    """APOLLO's scale ||R~|| / ||R|| (per matrix or per channel)."""
    return r_tilde_norm / (r_norm + 1e-8)


def limited_update(scale, scaled_norm, r_norm, prev_norm, c, shape):
    """The limiter applied to a scaled gradient of norm `scaled_norm` (per matrix) whose matrices
    have `shape`: returns (update_norm, coeff, ok) as apollo_direction does. Also the tensor-
    parallel path's (tensor_parallel.py), which gets the norms from the ranks' sums of squares."""
    # No reference yet (nothing applied so far: the first step, or the first step in which an
    # expert received tokens): AdamW's first update is elementwise m_hat/sqrt(v_hat) = sign(g), of
    # norm sqrt(m*n) (RMS 1). A rank-1 projection of a near rank-1 gradient (batch-1 online data)
    # can make ||R|| tiny and the scale huge, so cap ||alpha * scale * G|| at that AdamW norm.
    # Later: Fira's norm-growth limiter, ||update_t|| <= gamma ||update_t-1||. Both off when the
    # growth limit is inf (norm_growth_limit=None).
    cap = math.sqrt(shape[-2] * shape[-1]) / c[ALPHA]
    limit_first = torch.clamp(cap / (scaled_norm + 1e-30), max=1.0)
    limit_next = 1.0 / torch.clamp(scaled_norm / (prev_norm + 1e-8) / c[GAMMA], min=1.0)
    limit = torch.where((prev_norm == 0) & (c[GAMMA] < math.inf), limit_first, limit_next)
    update_norm = scaled_norm * limit
    ok = torch.isfinite(update_norm).all() & torch.isfinite(r_norm).all()
    # A zero gradient (an expert no token was routed to) applies nothing: its reference stays.
    update_norm = torch.where(scaled_norm > 0, update_norm, prev_norm)
    return update_norm, scale * (limit * c[ALPHA])[..., None, None] * (-c[LR]), ok


def project_off(x: torch.Tensor, basis: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """x - (x U) U^T for an m-by-n `x` and the orthonormal columns of `basis` (n, k): x with nothing left in U's
    span, so that as a matrix's change it changes nothing the matrix computes on inputs there. The one
    implementation of that projection: the null space's gradient hooks (trainer/null_space.py) and the update of
    an item kept out (bucket_update, Apollo.keep_out). The products run in the basis's dtype (bf16 for a bf16
    model: in float32 they made a step of the 8B shape 7x slower on an H200), exact in float32. inplace: `x` (a
    float32 scratch update) takes the result; else a new tensor of x's dtype. Writing a result into bf16 weights
    rounds it, and that rounding is not projected (rounding.py)."""
    correction = (x.to(basis.dtype) @ basis) @ basis.mT
    return x.sub_(correction) if inplace else x - correction.to(x.dtype)


def adamw_direction(grad, exp_avg, exp_avg_sq, c):
    """Dense AdamW (parameters that are neither matrices nor batches of them, groups with
    algorithm="adamw").

    Returns (exp_avg, exp_avg_sq, direction, coeff, ok); the new weight is
    `w * decay + coeff * direction`, coeff = -lr."""
    m, v, d = adam_moments(grad.float(), exp_avg, exp_avg_sq, c)
    return m, v, d, -c[LR], torch.isfinite(torch.linalg.vector_norm(d))
