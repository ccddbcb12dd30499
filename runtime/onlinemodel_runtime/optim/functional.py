"""Pure APOLLO math for one 2-D parameter (Zhu et al., arXiv 2412.05270, Algorithm 1).

Nothing here keeps state: callers pass the moments in and get new ones back, so the optimizer can
commit them conditionally (no GPU->CPU sync on the hot path) and the reference implementation can
share the few definitions that fix the algorithm (seeds, projection matrices).

Shapes: the gradient G is m-by-n. The random projection P removes the SMALLER dimension:
  m <= n: P is (r, m), R = P @ G is (r, n)     ("left")
  m >  n: P is (r, n), R = G @ P^T is (m, r)   ("right")
so R (and each Adam moment) has r * max(m, n) elements.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

_SEED_MASK = (1 << 63) - 1


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


def projection_side(shape: tuple[int, int]) -> str:
    m, n = shape
    return "left" if m <= n else "right"


def projected_shape(shape: tuple[int, int], rank: int) -> tuple[int, int]:
    m, n = shape
    return (rank, n) if projection_side(shape) == "left" else (m, rank)


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
    """float32 norm(s) of a possibly bf16 gradient. The reduction accumulates in float32 inside the
    kernel; asking for dtype=float32 instead could materialize a full-size float32 copy."""
    return torch.linalg.vector_norm(grad, dim=dim).float()


def project(grad: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """R = P G (left) or G P^T (right), in float32. The matmul runs in the gradient's dtype
    so a bf16 gradient is never copied to a full-size float32 temporary."""
    p = proj.to(grad.dtype)
    if projection_side(tuple(grad.shape)) == "left":
        r = p @ grad
    else:
        r = grad @ p.T
    return r.float()


@dataclass
class ApolloDirection:
    """Result of one APOLLO step for one matrix, before it touches the weight.

    The weight update is `-lr * alpha * limit * scale (*) G` where `scale` is a 0-dim tensor
    (tensor-wise) or a vector broadcastable to G (channel-wise) and `limit` is the norm-growth
    limiter's factor. `ok` is a 0-dim bool tensor: every number involved is finite.
    """

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    scale: torch.Tensor  # broadcastable to G; already includes limiter and alpha
    update_norm: torch.Tensor  # ||scale (*) G|| / alpha after limiting: the limiter's next reference
    ok: torch.Tensor


def apollo_direction(
    grad: torch.Tensor,
    proj: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    prev_norm: torch.Tensor,
    step: int,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    alpha: float,
    scale_kind: str,
    norm_growth_limit: float,
) -> ApolloDirection:
    """One APOLLO step for a 2-D gradient. Pure: returns new moments; inputs are not modified.

    `step` is 1-based. `prev_norm` is the limiter's reference (0-dim float32; ignored at step 1).
    """
    shape = tuple(grad.shape)
    r = project(grad, proj)
    m = exp_avg.mul(beta1).add_(r, alpha=1.0 - beta1)
    v = exp_avg_sq.mul(beta2).addcmul_(r, r, value=1.0 - beta2)
    # Bias-corrected Adam direction in the projected space.
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    r_tilde = (m / bc1) / ((v / bc2).sqrt_().add_(eps))

    if scale_kind == "tensor":
        r_norm = torch.linalg.vector_norm(r)
        scale = torch.linalg.vector_norm(r_tilde) / (r_norm + 1e-8)
        g_norm = grad_norm(grad)
        scaled_norm = scale * g_norm
    else:  # "channel": one factor per row/column of the dimension the projection keeps
        dim = 0 if projection_side(shape) == "left" else 1
        r_norm = torch.linalg.vector_norm(r, dim=dim)
        scale = torch.linalg.vector_norm(r_tilde, dim=dim) / (r_norm + 1e-8)
        g_norms = grad_norm(grad, dim)
        scaled_norm = torch.linalg.vector_norm(scale * g_norms)
        if dim == 1:
            scale = scale.unsqueeze(1)  # (m, 1): one factor per row
        r_norm = torch.linalg.vector_norm(r_norm)

    if step == 1:
        # No reference norm yet. AdamW's first update is elementwise m_hat/sqrt(v_hat) = sign(g),
        # of norm sqrt(m*n) (RMS 1). A rank-1 projection of a near rank-1 gradient (batch-1 online
        # data) can make ||R|| tiny and the scale huge, so cap ||alpha * scale * G|| at that AdamW
        # norm; the limiter then allows at most `norm_growth_limit`x growth per step from there.
        cap = math.sqrt(shape[0] * shape[1]) / alpha
        limit = torch.clamp(cap / (scaled_norm + 1e-30), max=1.0)
    else:
        # Fira's norm-growth limiter: ||update_t|| <= gamma * ||update_{t-1}||.
        growth = scaled_norm / (prev_norm + 1e-8)
        limit = 1.0 / torch.clamp(growth / norm_growth_limit, min=1.0)
    update_norm = scaled_norm * limit
    ok = torch.isfinite(update_norm) & torch.isfinite(r_norm)
    return ApolloDirection(
        exp_avg=m, exp_avg_sq=v, scale=scale * (limit * alpha), update_norm=update_norm, ok=ok
    )


def adamw_direction(
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    *,
    beta1: float,
    beta2: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense AdamW direction (for the fallback: norms, biases, policy-chosen params).

    Returns (new exp_avg, new exp_avg_sq, direction, ok); the update is -lr * direction.
    """
    g = grad.float()
    m = exp_avg.mul(beta1).add_(g, alpha=1.0 - beta1)
    v = exp_avg_sq.mul(beta2).addcmul_(g, g, value=1.0 - beta2)
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    d = (m / bc1) / ((v / bc2).sqrt_().add_(eps))
    ok = torch.isfinite(torch.linalg.vector_norm(d))
    return m, v, d, ok
