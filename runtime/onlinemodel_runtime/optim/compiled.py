"""A whole bucket of parameter updates (one decoder layer) as one torch.compile graph: the GPU hot
path of hook mode.

The eager path (apollo.Apollo._update_bucket_eager with functional.py + rounding.py) launches ~45
small kernels per parameter from Python. A compiled graph per parameter still cost ~0.4 ms of host
time each (guard check, argument handling, launches) on autograd's thread, which made a Qwen3 step
host-bound (1.7B: 226 ms vs fused AdamW's 96 ms). Here one call updates every parameter of a
bucket - projection, moments, scale, limiter, gating, weight write with stochastic rounding - so
the host cost is paid once per decoder layer, not once per matrix.

All-or-nothing per bucket: every item's new values are computed first, then committed under one
flag `gate & all(item finite)`. Same math as functional.apollo_direction / adamw_direction +
rounding.apply_update_ (the bench compares them); randomness differs: rounding bits come from the
device's global RNG (philox in-kernel).

`consts` is a float32 (items, 12) tensor, one row per item:
[lr, bias_correction1, bias_correction2, first_step, decay, beta1, 1-beta1, beta2, 1-beta2, eps,
alpha, gamma], so changing lr, step or any float hyperparameter never recompiles; `spec` holds the
structural flags (apollo, left, channel, stochastic) per item, which do.
"""

from __future__ import annotations

import torch

_LOW16_CLEAR = -65536
# One graph per distinct bucket signature (shapes + spec): a model has ~3 (a decoder layer, the
# embedding, the final norm), a process that trains several model shapes more than dynamo's
# default of 8 per function; past the limit dynamo would silently run the Python eagerly.
RECOMPILE_LIMIT = 64
CONST_COLS = 12


def const_row(group: dict, step: int) -> list[float]:
    """One row of `consts` for a parameter of `group` at `step`, computed in float64 on the host."""
    lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    alpha, gamma = group["alpha"], group["norm_growth_limit"]
    return [lr, 1.0 - beta1**step, 1.0 - beta2**step, 1.0 if step == 1 else 0.0,
            1.0 - lr * weight_decay, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, alpha, gamma]


def _write(w, new, ok, stochastic: bool):
    if w.dtype == torch.bfloat16 and stochastic:
        bits = new.view(torch.int32)
        noise = (torch.rand_like(new) * 65536.0).to(torch.int32)
        out = ((bits + noise) & _LOW16_CLEAR).view(torch.float32).to(torch.bfloat16)
    else:
        out = new.to(w.dtype)
    w.copy_(torch.where(ok, out, w))


def _apollo_direction(grad, proj, exp_avg, exp_avg_sq, limiter_norm, c, left: bool, channel: bool):
    bc1, bc2, first = c[1], c[2], c[3]
    beta1, one_m_b1, beta2, one_m_b2, eps, alpha, gamma = c[5], c[6], c[7], c[8], c[9], c[10], c[11]
    p = proj.to(grad.dtype)
    r = (p @ grad if left else grad @ p.t()).float()
    m = exp_avg * beta1 + r * one_m_b1
    v = exp_avg_sq * beta2 + r * r * one_m_b2
    r_tilde = (m / bc1) / ((v / bc2).sqrt() + eps)
    if channel:
        dim = 0 if left else 1
        r_norms = torch.linalg.vector_norm(r, dim=dim)
        scale = torch.linalg.vector_norm(r_tilde, dim=dim) / (r_norms + 1e-8)
        g_norms = torch.linalg.vector_norm(grad, dim=dim).float()
        scaled_norm = torch.linalg.vector_norm(scale * g_norms)
        if not left:
            scale = scale.unsqueeze(1)
        r_norm = torch.linalg.vector_norm(r_norms)
    else:
        r_norm = torch.linalg.vector_norm(r)
        scale = torch.linalg.vector_norm(r_tilde) / (r_norm + 1e-8)
        scaled_norm = scale * torch.linalg.vector_norm(grad).float()
    # First step: cap ||alpha * s * G|| at sqrt(m*n) (AdamW's first-step norm); later: limiter.
    cap = (torch.ones_like(scaled_norm) * grad.numel()).sqrt() / alpha
    limit_first = torch.clamp(cap / (scaled_norm + 1e-30), max=1.0)
    limit_next = 1.0 / torch.clamp(scaled_norm / (limiter_norm + 1e-8) / gamma, min=1.0)
    limit = torch.where(first > 0, limit_first, limit_next)
    update_norm = scaled_norm * limit
    ok = torch.isfinite(update_norm) & torch.isfinite(r_norm)
    coeff = scale * (limit * alpha) * (-c[0])
    return m, v, update_norm, coeff, ok


def _adamw_direction(grad, exp_avg, exp_avg_sq, c):
    bc1, bc2 = c[1], c[2]
    beta1, one_m_b1, beta2, one_m_b2, eps = c[5], c[6], c[7], c[8], c[9]
    g = grad.float()
    m = exp_avg * beta1 + g * one_m_b1
    v = exp_avg_sq * beta2 + g * g * one_m_b2
    d = (m / bc1) / ((v / bc2).sqrt() + eps)
    return m, v, d, torch.isfinite(torch.linalg.vector_norm(d))


def bucket_update(spec, ws, grads, projs, exp_avgs, exp_avg_sqs, limiter_norms, consts, gate):
    """Update every item of a bucket, all or nothing. spec[i] = (apollo, left, channel,
    stochastic); projs and limiter_norms list the APOLLO items only, in order. Returns the 0-dim
    bool flag: gate and every item's gradient and update finite."""
    results = []
    oks = []
    j = 0
    for i, (apollo, left, channel, _) in enumerate(spec):
        c = consts[i]
        if apollo:
            m, v, update_norm, coeff, ok_i = _apollo_direction(
                grads[i], projs[j], exp_avgs[i], exp_avg_sqs[i], limiter_norms[j], c, left, channel)
            results.append((m, v, update_norm, coeff))
            j += 1
        else:
            m, v, d, ok_i = _adamw_direction(grads[i], exp_avgs[i], exp_avg_sqs[i], c)
            results.append((m, v, None, d))
        oks.append(ok_i)
    ok = gate & torch.stack(oks).all()
    j = 0
    for i, (apollo, _, _, stochastic) in enumerate(spec):
        c = consts[i]
        m, v, update_norm, x = results[i]
        exp_avgs[i].copy_(torch.where(ok, m, exp_avgs[i]))
        exp_avg_sqs[i].copy_(torch.where(ok, v, exp_avg_sqs[i]))
        w = ws[i]
        if apollo:
            limiter_norms[j].copy_(torch.where(ok, update_norm, limiter_norms[j]))
            j += 1
            new = w.float() * c[4] + grads[i].float() * x
        else:
            new = w.float() * c[4] - c[0] * x
        _write(w, new, ok, stochastic)
    return ok


class Compiled:
    """The lazily compiled bucket update; `ok` is False once compilation failed (callers use eager)."""

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
