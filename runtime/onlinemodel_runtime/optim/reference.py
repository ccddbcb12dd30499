"""Readable float64 reference of the optimizer, for tests only (no hooks, no gating, no rounding).

Written straight from the paper's Algorithm 1 (+ our first-update bound; norm_growth_limit=None:
neither it nor the limiter); a 3-D parameter is a batch of independent matrices (MoE experts), each
run through the same 2-D code with its own state. It shares only the definitions that pin down
randomness (seeds and projection matrices) with the optimizer.
"""

from __future__ import annotations

import math

import torch

from .functional import param_seed, projection_matrix, projection_seed


class ReferenceApollo:
    def __init__(self, named_params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 rank=1, scale=None, alpha=None, update_proj_gap=200, norm_growth_limit=1.01, seed=0):
        self.params = list(named_params)
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
        self.rank = rank
        self.scale = scale or ("tensor" if rank == 1 else "channel")
        self.alpha = alpha if alpha is not None else (math.sqrt(128.0) if rank == 1 else 1.0)
        self.gap, self.gamma, self.seed = update_proj_gap, norm_growth_limit, seed
        self.state: dict[str, dict] = {}

    @torch.no_grad()
    def step(self) -> None:
        b1, b2 = self.betas
        for name, p in self.params:
            if p.grad is None:
                continue
            g = p.grad.double()
            st = self.state.setdefault(name, {"step": 0})
            st["step"] += 1
            t = st["step"]
            if p.dim() not in (2, 3):
                # Dense AdamW.
                m = st.get("m", torch.zeros_like(g)) * b1 + (1 - b1) * g
                v = st.get("v", torch.zeros_like(g)) * b2 + (1 - b2) * g * g
                st["m"], st["v"] = m, v
                update = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + self.eps)
            else:
                seed = projection_seed(param_seed(name, self.seed), t, self.gap)
                rows, cols = p.shape[-2:]
                P = projection_matrix(tuple(p.shape), min(self.rank, rows, cols), seed).double()
                if p.dim() == 2:
                    update = self._matrix(st, g, P, t)
                else:  # a batch of experts: each one its own APOLLO problem, with its own state
                    experts = st.setdefault("experts", [{} for _ in range(p.shape[0])])
                    update = torch.stack([self._matrix(experts[e], g[e], P[e], t) for e in range(p.shape[0])])
            new = p.double() * (1 - self.lr * self.wd) - self.lr * update
            p.copy_(new.to(p.dtype))

    def _matrix(self, st: dict, g: torch.Tensor, P: torch.Tensor, t: int) -> torch.Tensor:
        """APOLLO's update (alpha * limited scale * G) of one m-by-n matrix; `st` its own state."""
        b1, b2 = self.betas
        rows, cols = g.shape
        left = rows <= cols
        R = P @ g if left else g @ P.T
        m = st.get("m", torch.zeros_like(R)) * b1 + (1 - b1) * R
        v = st.get("v", torch.zeros_like(R)) * b2 + (1 - b2) * R * R
        st["m"], st["v"] = m, v
        R_tilde = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + self.eps)
        if self.scale == "tensor":
            s = R_tilde.norm() / (R.norm() + 1e-8)
        elif left:  # one factor per column
            s = R_tilde.norm(dim=0) / (R.norm(dim=0) + 1e-8)
        else:  # one factor per row
            s = (R_tilde.norm(dim=1) / (R.norm(dim=1) + 1e-8)).unsqueeze(1)
        scaled = s * g
        norm = scaled.norm()
        prev = st.get("prev_norm", 0.0)
        if self.gamma is not None and prev == 0:  # no update applied yet: capped at AdamW's first norm
            cap = math.sqrt(rows * cols) / self.alpha
            if norm > cap:
                scaled = scaled * (cap / norm)
        elif self.gamma is not None and norm > self.gamma * prev:
            scaled = scaled * (self.gamma * prev / norm)
        if norm > 0:  # a zero gradient (an expert without tokens) keeps its reference
            st["prev_norm"] = scaled.norm()
        return self.alpha * scaled
