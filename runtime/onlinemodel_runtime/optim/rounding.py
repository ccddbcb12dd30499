"""In-place updates of bf16 weights that keep small updates: stochastic rounding or a carried remainder,
CPU and CUDA, eager or compiled.

bf16 is the top 16 bits of an IEEE float32. To round a float32 value x to bf16 without bias we add
a uniform random integer in [0, 2^16) to x's bit pattern and clear the low 16 bits: x is rounded
away from zero with probability (low bits of x) / 2^16, i.e. exactly its fractional distance to the
next bf16 value, so E[round(x)] = x. Sign-magnitude encoding makes this hold for negative x too;
an exact bf16 value (low bits zero) is returned unchanged, so a zero update leaves weights
bit-identical. Round-to-nearest instead drops every update smaller than half a bf16 ulp
(~1/512 of the weight), which is what makes naive in-place bf16 training stall.

Stochastic rounding's price is noise: each write adds about |update| x ulp(w) of variance to every
element, which over hundreds of steps moves a matrix several times as far as the updates themselves
(docs/benchmarks.md, "Rounding noise"). `compensated` keeps a float32 master value of every trained
element without a second copy of the weights: the bf16 weight is the master's top 16 bits rounded to
nearest, and an int16 `residual` (optimizer state) holds the signed difference of the two bit patterns,
what rounding dropped. weight + residual is the master exactly, so training is float32 mixed precision
(no noise, nothing lost, deterministic) for 2 more bytes per trained element, and what is served is the
master to nearest. `ROUNDINGS` lists the three ways.

`round_to_bf16` is the one implementation of stochastic rounding; the random bits come from a seeded generator on the
eager path (reproducible, saved in the optimizer's state_dict: `RoundingGenerators`) and from the
device's global RNG inside a compiled graph (generator=None; philox in-kernel on CUDA).
"""

from __future__ import annotations

import torch

from onlinemodel_protocol.limits import WEIGHT_ROUNDINGS

from .functional import param_seed

# Rows x cols processed per chunk on the eager path: bounds the float32 temporaries to a few
# hundred MiB even for a 150k-row embedding. Compiled graphs fuse the write into one kernel.
DEFAULT_CHUNK_ELEMS = 1 << 24
# How an update is written into bf16 weights (float32 weights take it exactly):
# stochastic: unbiased, noisy; nearest: updates under half an ulp lost (the baseline, reproducible);
# compensated: a float32 master, served to nearest, its low bits kept (deterministic, 2 bytes per element more).
ROUNDINGS = WEIGHT_ROUNDINGS
_LOW16_CLEAR = -65536  # 0xFFFF0000 as int32


def round_to_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """float32 -> bfloat16 with unbiased stochastic rounding (new tensor). torch.rand's 24 random
    bits times 2^16, floored, are exactly uniform on [0, 2^16)."""
    noise = (torch.rand(x.shape, generator=generator, device=x.device) * 65536.0).to(torch.int32)
    return ((x.view(torch.int32) + noise) & _LOW16_CLEAR).view(torch.float32).to(torch.bfloat16)


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """float32 -> bfloat16 with unbiased stochastic rounding (new tensor)."""
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round_to_bf16 needs float32 input, got {x.dtype}")
    return round_to_bf16(x.contiguous(), generator)


def stochastic_add_(
    target: torch.Tensor,
    update: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """target += update, computed in float32 and written with stochastic rounding if target is bf16."""
    if target.dtype == torch.bfloat16:
        target.copy_(round_to_bf16(target.float().add_(update.float()), generator))
    elif target.dtype == torch.float32:
        target.add_(update.float())
    else:
        raise TypeError(f"stochastic_add_ supports bfloat16 and float32 targets, got {target.dtype}")
    return target


def needs_residual(rounding: str, weight: torch.Tensor) -> bool:
    """Whether writing into `weight` this way keeps a remainder (compensated bf16 weights only)."""
    return rounding == "compensated" and weight.dtype == torch.bfloat16


def master_value(w: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """The float32 master value of compensated bf16 weights: the weight's bit pattern as a float32's top
    half, plus the residual's signed low bits (integer arithmetic on the patterns: exact, either sign)."""
    return ((w.view(torch.int16).to(torch.int32) << 16) + residual.to(torch.int32)).view(torch.float32)


def split_master(new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 -> (bf16 to nearest, ties away from zero; int16 residual) with master_value(...) == new.
    Rounding the bit pattern's magnitude: adding half of 2^16 and flooring to a multiple of 2^16 leaves a
    remainder in [-2^15, 2^15), which fits an int16."""
    bits = new.view(torch.int32)
    high = (bits + 32768) >> 16
    return high.to(torch.int16).view(torch.bfloat16), (bits - (high << 16)).to(torch.int16)


def _write(w, src, coeff, decay, ok, rounding: str, generator, residual) -> None:
    if residual is not None:
        out, low = split_master(master_value(w, residual) * decay + src.float() * coeff)
        residual.copy_(torch.where(ok, low, residual))
    else:
        new = w.float() * decay + src.float() * coeff
        if w.dtype == torch.bfloat16 and rounding == "stochastic":
            out = round_to_bf16(new, generator)
        else:
            out = new.to(w.dtype)
    w.copy_(torch.where(ok, out, w))


def apply_update_(
    weight: torch.Tensor,
    src: torch.Tensor,
    coeff: torch.Tensor,
    *,
    decay: torch.Tensor | float,
    ok: torch.Tensor,
    rounding: str = "stochastic",
    generator: torch.Generator | None = None,
    residual: torch.Tensor | None = None,
    chunk_elems: int | None = DEFAULT_CHUNK_ELEMS,
) -> None:
    """weight <- ok ? round(weight * decay + coeff * src) : weight, without a host sync.

    `coeff` is float32 and broadcastable to `weight` (0-dim, (n,), (m, 1), or for a batch of
    matrices (E, m, n) one of those per matrix: (E, 1, 1), (E, 1, n), (E, m, 1)); `ok` a 0-dim
    bool tensor. The new value is computed in float32 (row chunk by row chunk of `chunk_elems`, a
    batch matrix by matrix; None: all at once, as inside a compiled graph); bf16 weights are
    written the `rounding` way (ROUNDINGS); "compensated" needs `residual`, an int16 tensor of the
    weight's shape that carries the remainder from write to write (zeros at first: master = weight).
    """
    if weight.shape != src.shape:
        raise ValueError(f"weight {tuple(weight.shape)} and update {tuple(src.shape)} differ")
    if weight.dtype not in (torch.bfloat16, torch.float32):
        raise TypeError(f"apply_update_ supports bfloat16 and float32 weights, got {weight.dtype}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if needs_residual(rounding, weight) != (residual is not None):
        raise ValueError("a residual goes with compensated rounding of bf16 weights, and only with it")
    if residual is not None and (residual.shape != weight.shape or residual.dtype != torch.int16):
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} does not match weight "
                         f"{tuple(weight.shape)} (int16 expected)")
    if chunk_elems is None:
        _write(weight, src, coeff, decay, ok, rounding, generator, residual)
        return
    if weight.dim() == 3 and coeff.dim() == 3 and coeff.shape[0] == weight.shape[0]:
        # A batch of matrices, each with its own coefficients: whole matrices per chunk, or one
        # matrix at a time in row chunks if a single one is larger than a chunk.
        size = weight.shape[1] * weight.shape[2]
        if size > chunk_elems:
            for i in range(weight.shape[0]):
                apply_update_(weight[i], src[i], coeff[i], decay=decay, ok=ok, rounding=rounding,
                              generator=generator, residual=None if residual is None else residual[i],
                              chunk_elems=chunk_elems)
            return
        per_chunk = chunk_elems // size
        for start in range(0, weight.shape[0], per_chunk):
            stop = start + per_chunk
            _write(weight[start:stop], src[start:stop], coeff[start:stop], decay, ok, rounding, generator,
                   None if residual is None else residual[start:stop])
        return
    w2 = weight if weight.dim() > 1 else weight.view(1, -1)
    g2 = src if src.dim() > 1 else src.view(1, -1)
    r2 = None if residual is None else residual.view(w2.shape)
    cols = w2.shape[-1]
    rows = max(1, chunk_elems // max(1, cols))
    # (m, 1) coefficients (channel-wise scale, one per row) are sliced with the rows.
    per_row = coeff.dim() == 2 and coeff.shape[0] == w2.shape[0] and coeff.shape[0] > 1
    for start in range(0, w2.shape[0], rows):
        stop = min(start + rows, w2.shape[0])
        _write(w2[start:stop], g2[start:stop], coeff[start:stop] if per_row else coeff, decay, ok,
               rounding, generator, None if r2 is None else r2[start:stop])


class RoundingGenerators:
    """The eager path's rounding bits: one generator per device (and per named `stream`: under tensor
    parallelism, one shared by the ranks and one of each rank's own, tensor_parallel.py), seeded from
    the optimizer's seed on first use; its state goes into the optimizer's state_dict so a resume is
    bitwise exact."""

    def __init__(self) -> None:
        self._gens: dict[str, torch.Generator] = {}

    def get(self, device: torch.device, seed: int, stream: str = "") -> torch.Generator:
        key = f"{device}#{stream}" if stream else str(device)
        gen = self._gens.get(key)
        if gen is None:
            gen = self._gens[key] = torch.Generator(device=device)
            # A named stream's seed leaves out the device index: ranks on cuda:0 and cuda:1 share it.
            tag = f"{device.type}#{stream}" if stream else key
            gen.manual_seed(param_seed(f"stochastic-rounding:{tag}", seed))
        return gen

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {key: gen.get_state() for key, gen in self._gens.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], seed: int) -> None:
        for key, gen_state in state.items():
            device_name, _, stream = key.partition("#")
            device = torch.device(device_name)
            if device.type == "cuda" and not torch.cuda.is_available():
                continue  # CUDA rounding stream saved, resumed on CPU: nothing to restore
            self.get(device, seed, stream).set_state(gen_state)
