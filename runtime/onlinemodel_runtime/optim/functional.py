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
"""

from __future__ import annotations

import hashlib
import math

import torch

_SEED_MASK = (1 << 63) - 1
# Columns of a parameter's row of per-step constants (computed in float64 on the host).
CONSTS = ("lr", "bias_correction1", "bias_correction2", "first_step_cap", "decay", "beta1",
          "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "alpha", "growth_limit")
(LR, BC1, BC2, FIRST, DECAY, BETA1, ONE_M_B1, BETA2, ONE_M_B2, EPS, ALPHA, GAMMA) = range(len(CONSTS))


def const_row(group: dict, step: int) -> list[float]:
    """The row of `CONSTS` for a parameter of `group` at (1-based) `step`. norm_growth_limit=None
    turns the limiter off, and with it the first-step cap (its starting reference)."""
    lr, (beta1, beta2), limit = group["lr"], group["betas"], group["norm_growth_limit"]
    first = 1.0 if step == 1 and limit is not None else 0.0
    return [lr, 1.0 - beta1**step, 1.0 - beta2**step, first, 1.0 - lr * group["weight_decay"],
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
    m, n = shape
    return m <= n


def projected_shape(shape: tuple[int, int], rank: int) -> tuple[int, int]:
    m, n = shape
    return (rank, n) if projects_left(shape) else (m, rank)


def projection_matrix(
    shape: tuple[int, int],
    rank: int,
    seed: int,
    *,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Gaussian (rank, k) matrix with N(0, 1/rank) entries, k = min(m, n); regenerated, never stored.

    The 1/rank variance keeps E||P g||^2 = ||g||^2 (Johnson-Lindenstrauss), so the projected
    gradient has the full gradient's scale and `eps` means the same as in AdamW.
    A given seed gives the same matrix on a given device type; CPU and CUDA RNG streams differ.
    """
    device = torch.device(device)
    k = min(shape)
    if generator is None:
        generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    p = torch.randn((rank, k), generator=generator, device=device, dtype=torch.float32)
    return p.mul_(1.0 / math.sqrt(rank))


def grad_norm(grad: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """float32 norm(s) of a possibly bf16 gradient, not rounded to bf16 on the way (a compiled
    graph would not round it, the eager op would). Measured: dtype=float32 makes no float32 copy
    of a bf16 gradient (CPU, torch 2.13; CUDA, torch 2.11)."""
    return torch.linalg.vector_norm(grad, dim=dim, dtype=torch.float32)


def project(grad: torch.Tensor, proj: torch.Tensor, left: bool) -> torch.Tensor:
    """R = P G (left) or G P^T (right), in float32. The matmul runs in the gradient's dtype
    so a bf16 gradient is never copied to a full-size float32 temporary."""
    p = proj.to(grad.dtype)
    return (p @ grad if left else grad @ p.t()).float()


def adam_moments(x, exp_avg, exp_avg_sq, c):
    """New first and second moments of x and the bias-corrected direction m_hat / (sqrt(v_hat) + eps)."""
    m = exp_avg * c[BETA1] + x * c[ONE_M_B1]
    v = exp_avg_sq * c[BETA2] + x * x * c[ONE_M_B2]
    return m, v, (m / c[BC1]) / ((v / c[BC2]).sqrt() + c[EPS])


def apollo_direction(grad, proj, exp_avg, exp_avg_sq, prev_norm, c, *, left: bool, channel: bool):
    """One APOLLO step for a 2-D gradient; inputs are not modified. `c`: the parameter's row of
    CONSTS; `prev_norm`: the limiter's reference (0-dim float32; unused at a capped first step).

    Returns (exp_avg, exp_avg_sq, update_norm, coeff, ok): the new weight is
    `w * decay + coeff (*) G`, coeff = -lr * alpha * limit * scale (0-dim for scale="tensor",
    one factor per column (n,) or per row (m, 1) for "channel"); update_norm = ||scale (*) G||
    after the limiter (its next reference); ok: every number involved is finite.
    """
    r = project(grad, proj, left)
    m, v, r_tilde = adam_moments(r, exp_avg, exp_avg_sq, c)
    if channel:  # one factor per row/column of the dimension the projection keeps
        dim = 0 if left else 1
        r_norms = torch.linalg.vector_norm(r, dim=dim)
        scale = torch.linalg.vector_norm(r_tilde, dim=dim) / (r_norms + 1e-8)
        scaled_norm = torch.linalg.vector_norm(scale * grad_norm(grad, dim))
        if not left:
            scale = scale.unsqueeze(1)  # (m, 1): one factor per row
        r_norm = torch.linalg.vector_norm(r_norms)
    else:
        r_norm = torch.linalg.vector_norm(r)
        scale = torch.linalg.vector_norm(r_tilde) / (r_norm + 1e-8)
        scaled_norm = scale * grad_norm(grad)
    # First step: no reference norm yet. AdamW's first update is elementwise m_hat/sqrt(v_hat) =
    # sign(g), of norm sqrt(m*n) (RMS 1). A rank-1 projection of a near rank-1 gradient (batch-1
    # online data) can make ||R|| tiny and the scale huge, so cap ||alpha * scale * G|| at that
    # AdamW norm. Later steps: Fira's norm-growth limiter, ||update_t|| <= gamma ||update_t-1||.
    cap = math.sqrt(grad.numel()) / c[ALPHA]
    limit_first = torch.clamp(cap / (scaled_norm + 1e-30), max=1.0)
    limit_next = 1.0 / torch.clamp(scaled_norm / (prev_norm + 1e-8) / c[GAMMA], min=1.0)
    limit = torch.where(c[FIRST] > 0, limit_first, limit_next)
    update_norm = scaled_norm * limit
    ok = torch.isfinite(update_norm) & torch.isfinite(r_norm)
    return m, v, update_norm, scale * (limit * c[ALPHA]) * (-c[LR]), ok


def adamw_direction(grad, exp_avg, exp_avg_sq, c):
    """Dense AdamW (parameters that are not 2-D, groups with algorithm="adamw").

    Returns (exp_avg, exp_avg_sq, direction, coeff, ok); the new weight is
    `w * decay + coeff * direction`, coeff = -lr."""
    m, v, d = adam_moments(grad.float(), exp_avg, exp_avg_sq, c)
    return m, v, d, -c[LR], torch.isfinite(torch.linalg.vector_norm(d))
