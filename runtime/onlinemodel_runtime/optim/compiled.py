"""Per-parameter updates as single torch.compile graphs (the GPU hot path of hook mode).

The eager path (apollo.Apollo._update_param with functional.py + rounding.py) launches ~45 small
kernels per parameter from Python; in hook mode they run on autograd's thread between backward
kernels and made a Qwen3 step CPU-bound (~1.5 ms per parameter on an H200 host). Here the whole
update of one parameter - projection, moments, scale, limiter, gating, weight write with
stochastic rounding - is one compiled graph: a handful of kernels and one guard check.

Same math as functional.apollo_direction / adamw_direction + rounding.apply_update_ (tests compare
them); randomness differs: rounding bits come from the global RNG of the device (philox in-kernel).
`consts` = float32 tensor [lr, bias_correction1, bias_correction2, first_step, decay] on the
parameter's device, so changing lr or step never recompiles.
"""

from __future__ import annotations

import torch

_LOW16_CLEAR = -65536


def _write(w, new, ok, stochastic: bool):
    if w.dtype == torch.bfloat16 and stochastic:
        bits = new.view(torch.int32)
        noise = (torch.rand_like(new) * 65536.0).to(torch.int32)
        out = ((bits + noise) & _LOW16_CLEAR).view(torch.float32).to(torch.bfloat16)
    else:
        out = new.to(w.dtype)
    w.copy_(torch.where(ok, out, w))


def apollo_update(w, grad, proj, exp_avg, exp_avg_sq, limiter_norm, gate, consts,
                  beta1: float, beta2: float, eps: float, alpha: float, gamma: float,
                  left: bool, channel: bool, stochastic: bool):
    lr, bc1, bc2, first, decay = consts[0], consts[1], consts[2], consts[3], consts[4]
    p = proj.to(grad.dtype)
    r = (p @ grad if left else grad @ p.t()).float()
    m = exp_avg * beta1 + r * (1.0 - beta1)
    v = exp_avg_sq * beta2 + r * r * (1.0 - beta2)
    r_tilde = (m / bc1) / ((v / bc2).sqrt() + eps)
    g32 = grad.float()
    if channel:
        dim = 0 if left else 1
        r_norms = torch.linalg.vector_norm(r, dim=dim)
        scale = torch.linalg.vector_norm(r_tilde, dim=dim) / (r_norms + 1e-8)
        scaled_norm = torch.linalg.vector_norm(scale * torch.linalg.vector_norm(g32, dim=dim))
        if not left:
            scale = scale.unsqueeze(1)
        r_norm = torch.linalg.vector_norm(r_norms)
    else:
        r_norm = torch.linalg.vector_norm(r)
        scale = torch.linalg.vector_norm(r_tilde) / (r_norm + 1e-8)
        scaled_norm = scale * torch.linalg.vector_norm(g32)
    # First step: cap ||alpha * s * G|| at sqrt(m*n) (AdamW's first-step norm); later: limiter.
    cap = (torch.ones_like(scaled_norm) * grad.numel()).sqrt() / alpha
    limit_first = torch.clamp(cap / (scaled_norm + 1e-30), max=1.0)
    limit_next = 1.0 / torch.clamp(scaled_norm / (limiter_norm + 1e-8) / gamma, min=1.0)
    limit = torch.where(first > 0, limit_first, limit_next)
    update_norm = scaled_norm * limit
    ok = gate & torch.isfinite(update_norm) & torch.isfinite(r_norm)
    exp_avg.copy_(torch.where(ok, m, exp_avg))
    exp_avg_sq.copy_(torch.where(ok, v, exp_avg_sq))
    limiter_norm.copy_(torch.where(ok, update_norm, limiter_norm))
    coeff = scale * (limit * alpha) * (-lr)
    _write(w, w.float() * decay + g32 * coeff, ok, stochastic)
    return ok


def adamw_update(w, grad, exp_avg, exp_avg_sq, gate, consts,
                 beta1: float, beta2: float, eps: float, stochastic: bool):
    lr, bc1, bc2, decay = consts[0], consts[1], consts[2], consts[4]
    g = grad.float()
    m = exp_avg * beta1 + g * (1.0 - beta1)
    v = exp_avg_sq * beta2 + g * g * (1.0 - beta2)
    d = (m / bc1) / ((v / bc2).sqrt() + eps)
    ok = gate & torch.isfinite(torch.linalg.vector_norm(d))
    exp_avg.copy_(torch.where(ok, m, exp_avg))
    exp_avg_sq.copy_(torch.where(ok, v, exp_avg_sq))
    _write(w, w.float() * decay - lr * d, ok, stochastic)
    return ok


class Compiled:
    """Lazily compiled versions; `ok` is False once compilation failed (callers use eager)."""

    def __init__(self) -> None:
        self.apollo = None
        self.adamw = None
        self.ok = True

    def get(self, which: str):
        fn = getattr(self, which)
        if fn is None:
            src = apollo_update if which == "apollo" else adamw_update
            fn = torch.compile(src, dynamic=True, fullgraph=True)
            setattr(self, which, fn)
        return fn


COMPILED = Compiled()
