"""The projection in force for each matrix (a component of apollo.Apollo).

Regenerated from its seed (functional.projection_seed of the parameter's name) when a projection
period begins and kept between steps in a small cache (r * min(m, n) floats per matrix, E times
for a batch of E experts), so a step costs no RNG launches and no hashing; never saved: a restart
regenerates it. A new period writes the new values into the same tensor, so a captured CUDA graph
that reads it sees them.
"""

from __future__ import annotations

import torch

from .functional import param_seed, projection_matrix, projection_seed


class Projections:
    def __init__(self) -> None:
        self._gens: dict[torch.device, torch.Generator] = {}
        self._cache: dict[torch.Tensor, tuple[tuple[int, int], torch.Tensor]] = {}
        self._seeds: dict[tuple[str, int], int] = {}  # param_seed(name, base seed), hashed once

    def get(self, p: torch.Tensor, name: str, seed: int, gap: int, step: int, rank: int,
            shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The (rank, min(m, n)) projection of parameter `p` (named `name`) at 1-based `step`;
        (E, rank, min(m, n)) for a batch of E matrices. `shape`: the whole matrix's when `p` is one
        tensor-parallel rank's piece of it (default: p's own)."""
        tag = (seed, (step - 1) // gap)  # the two sha256 hashes run once per period
        hit = self._cache.get(p)
        if hit is not None and hit[0] == tag and hit[1].device == p.device and hit[1].shape[-2] == rank:
            return hit[1]
        base = self._seeds.get((name, seed))
        if base is None:
            base = self._seeds[(name, seed)] = param_seed(name, seed)
        gen = self._gens.get(p.device)
        if gen is None:
            gen = self._gens[p.device] = torch.Generator(device=p.device)
        proj = projection_matrix(tuple(p.shape) if shape is None else shape, rank, projection_seed(base, step, gap),
                                 device=p.device, generator=gen)
        if hit is not None and hit[1].device == p.device and hit[1].shape == proj.shape:
            proj = hit[1].copy_(proj)  # same address: a captured CUDA graph reads the new values
        self._cache[p] = (tag, proj)
        return proj
