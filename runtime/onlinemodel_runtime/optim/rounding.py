"""Unbiased in-place updates of bf16 weights (stochastic rounding), CPU and CUDA.

bf16 is the top 16 bits of an IEEE float32. To round a float32 value x to bf16 without bias we add
a uniform random integer in [0, 2^16) to x's bit pattern and clear the low 16 bits: x is rounded
away from zero with probability (low bits of x) / 2^16, i.e. exactly its fractional distance to the
next bf16 value, so E[round(x)] = x. Sign-magnitude encoding makes this hold for negative x too;
an exact bf16 value (low bits zero) is returned unchanged, so a zero update leaves weights
bit-identical. Round-to-nearest instead drops every update smaller than half a bf16 ulp
(~1/512 of the weight), which is what makes naive in-place bf16 training stall.
"""

from __future__ import annotations

import torch

# Rows x cols processed per chunk on the eager path: bounds the float32 temporaries to a few
# hundred MiB even for a 150k-row embedding.
DEFAULT_CHUNK_ELEMS = 1 << 24
_LOW16_CLEAR = -65536  # 0xFFFF0000 as int32


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """float32 -> bfloat16 with unbiased stochastic rounding (new tensor)."""
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round_to_bf16 needs float32 input, got {x.dtype}")
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(
        0, 1 << 16, bits.shape, dtype=torch.int32, device=x.device, generator=generator
    )
    rounded = bits.add(noise).bitwise_and_(_LOW16_CLEAR)
    # Exact conversion: the low 16 bits are already zero.
    return rounded.view(torch.float32).to(torch.bfloat16)


def stochastic_add_(
    target: torch.Tensor,
    update: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """target += update, computed in float32 and written with stochastic rounding if target is bf16."""
    if target.dtype == torch.bfloat16:
        target.copy_(stochastic_round_to_bf16(target.float().add_(update.float()), generator))
    elif target.dtype == torch.float32:
        target.add_(update.float())
    else:
        raise TypeError(f"stochastic_add_ supports bfloat16 and float32 targets, got {target.dtype}")
    return target


def _chunk_rows(t: torch.Tensor, chunk_elems: int) -> int:
    cols = t.shape[-1] if t.dim() > 1 else t.numel()
    return max(1, chunk_elems // max(1, cols))


@torch.no_grad()
def apply_update_(
    weight: torch.Tensor,
    grad: torch.Tensor,
    coeff: torch.Tensor,
    *,
    decay: float,
    ok: torch.Tensor,
    stochastic: bool = True,
    generator: torch.Generator | None = None,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> None:
    """weight <- ok ? round(weight * decay + coeff * grad) : weight, without a host sync.

    `coeff` is float32 and broadcastable to `weight` (0-dim, (n,) or (m, 1)); `ok` a 0-dim bool
    tensor. The new value is computed in float32 row chunk by row chunk; bf16 weights get
    stochastic rounding (unless stochastic=False: round to nearest, the baseline that loses updates).
    """
    if weight.shape != grad.shape:
        raise ValueError(f"weight {tuple(weight.shape)} and grad {tuple(grad.shape)} differ")
    if weight.dtype not in (torch.bfloat16, torch.float32):
        raise TypeError(f"apply_update_ supports bfloat16 and float32 weights, got {weight.dtype}")
    w2 = weight if weight.dim() > 1 else weight.view(1, -1)
    g2 = grad if grad.dim() > 1 else grad.view(1, -1)
    rows = _chunk_rows(w2, chunk_elems)
    # (m, 1) coefficients (channel-wise scale, one per row) are sliced with the rows.
    per_row = coeff.dim() == 2 and coeff.shape[0] == w2.shape[0] and coeff.shape[0] > 1
    for start in range(0, w2.shape[0], rows):
        stop = min(start + rows, w2.shape[0])
        w = w2[start:stop]
        c = coeff[start:stop] if per_row else coeff
        w32 = w.float()
        new = w32 * decay if decay != 1.0 else w32.clone()
        new.addcmul_(g2[start:stop], c)
        if weight.dtype == torch.bfloat16:
            if stochastic:
                out = stochastic_round_to_bf16(new, generator)
            else:
                out = new.to(torch.bfloat16)
        else:
            out = new
        w.copy_(torch.where(ok, out, w))


def _fused_bf16_update(w, g, coeff, decay, ok):  # pragma: no cover - compiled, CUDA only
    new = w.float() * decay + g.float() * coeff
    bits = new.view(torch.int32)
    noise = (torch.rand_like(new) * 65536.0).to(torch.int32)
    out = ((bits + noise) & _LOW16_CLEAR).view(torch.float32).to(torch.bfloat16)
    w.copy_(torch.where(ok, out, w))


_FUSED = None
_FUSED_VERIFIED = False


def fused_bf16_update_(weight, grad, coeff, decay_t, ok) -> bool:
    """One-kernel CUDA version of apply_update_ (torch.compile; uses the default CUDA RNG, so not
    reproducible run to run). Returns False, having done nothing, if compilation is unavailable."""
    global _FUSED, _FUSED_VERIFIED
    if _FUSED is None:
        _FUSED = torch.compile(_fused_bf16_update, dynamic=True, fullgraph=True)
    if _FUSED is False:
        return False
    if _FUSED_VERIFIED:
        _FUSED(weight, grad, coeff, decay_t, ok)
        return True
    # First call compiles; if that fails (no Triton, no compiler) use the eager path from then on.
    try:
        _FUSED(weight, grad, coeff, decay_t, ok)
    except Exception:  # noqa: BLE001
        _FUSED = False
        return False
    _FUSED_VERIFIED = True
    return True
