"""Our APOLLO against the authors' own optimizer (PyPI apollo-torch 1.0.3, `APOLLOAdamW`), with
their random projection replaced by ours, so both use the same matrix at every step.

With our norm-growth limiter and first-step cap off (norm_growth_limit=None; theirs:
disable_nl=True), no weight decay, a negligible eps and non-square matrices, the two are the same
optimizer. Each documented difference (docs/optimizer.md, "Where the update differs from the
authors' code") is then shown to exist and to have the documented cause."""

import io
import math

import pytest
import torch
import apollo_torch.apollo as authors_module
from apollo_torch import APOLLOAdamW
from apollo_torch.random_projector import GradientProjector

from onlinemodel_runtime.optim import Apollo
from onlinemodel_runtime.optim.functional import param_seed, projection_matrix, projection_seed

BETAS = (0.9, 0.999)


def _params(shapes: dict[str, tuple]) -> dict[str, torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return {n: torch.nn.Parameter(torch.randn(s, generator=g)) for n, s in shapes.items()}


def _ours(params, *, rank, scale, alpha, lr, eps, wd=0.0, gap=200, limit=None):
    mats = [n for n, p in params.items() if p.dim() == 2]
    vecs = [n for n, p in params.items() if p.dim() != 2]
    groups = [{"params": [params[n] for n in mats], "param_names": mats}]
    if vecs:
        groups.append({"params": [params[n] for n in vecs], "param_names": vecs, "algorithm": "adamw"})
    return Apollo(groups, lr=lr, betas=BETAS, eps=eps, weight_decay=wd, rank=rank, scale=scale,
                  alpha=alpha, update_proj_gap=gap, norm_growth_limit=limit)


def _theirs(params, monkeypatch, *, rank, scale, alpha, lr, eps, wd=0.0, gap=200, limiter=False,
            proj_type="std"):
    """Their optimizer, every matrix projected with ours: the same seed (the parameter's name),
    the same period, oriented as their code uses it ((m, r) on the left, (r, n) on the right)."""
    names = {p: n for n, p in params.items()}

    class OurProjection(GradientProjector):
        def __init__(self, name, group):
            super().__init__(group["rank"], update_proj_gap=group["update_proj_gap"],
                             scale=group["scale"], proj_type=group["proj_type"])
            self.name = name

        def project(self, full_rank_grad, iter):
            self.step = iter + 1  # theirs counts from 0 and draws when iter % gap == 0: as ours
            return super().project(full_rank_grad, iter)

        def get_orthogonal_matrix(self, weights, rank, type, seed):
            seed = projection_seed(param_seed(self.name, 0), self.step, self.update_proj_gap)
            p = projection_matrix(tuple(weights.shape), rank, seed)
            return p.t() if type == "left" else p

    def init_projector(self, group, state):
        return OurProjection(next(names[p] for p, st in self.state.items() if st is state), group)

    monkeypatch.setattr(authors_module.AdamW, "_initialize_projector", init_projector)
    mats = [p for p in params.values() if p.dim() == 2]
    vecs = [p for p in params.values() if p.dim() != 2]
    groups = [{"params": mats, "rank": rank, "proj": "random", "scale_type": scale,
               "scale": alpha**2, "update_proj_gap": gap, "proj_type": proj_type}]  # their scale = alpha^2
    if vecs:
        groups.append({"params": vecs})
    return APOLLOAdamW(groups, lr=lr, betas=BETAS, eps=eps, weight_decay=wd, disable_nl=not limiter)


def _run(params, opt, grads) -> list[dict[str, torch.Tensor]]:
    """Apply the gradients of each step; returns each step's weight change per parameter."""
    deltas = []
    for step_grads in grads:
        before = {n: p.detach().clone() for n, p in params.items()}
        for n, p in params.items():
            p.grad = step_grads[n].clone()
        opt.step()
        deltas.append({n: p.detach() - before[n] for n, p in params.items()})
    return deltas


def _grads(shapes, steps, constant=False):
    g = torch.Generator().manual_seed(1)
    first = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    return [first if constant else {n: torch.randn(s, generator=g) for n, s in shapes.items()}
            for _ in range(steps)]


def _both(shapes, monkeypatch, grads, ours_kw, theirs_kw):
    a, b = _params(shapes), _params(shapes)
    return _run(a, _ours(a, **ours_kw), grads), _run(b, _theirs(b, monkeypatch, **theirs_kw), grads)


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x - y).norm() / y.norm()).item()


def _max_rel(da, db) -> float:
    return max(_rel(a[n], b[n]) for a, b in zip(da, db) for n in a)


SHAPES = {"wide": (6, 10), "tall": (10, 6), "bias": (10,)}


@pytest.mark.parametrize("rank,scale,alpha", [(1, "tensor", math.sqrt(128.0)), (2, "channel", 1.0)])
def test_equal_to_the_authors_with_limiter_and_cap_off(monkeypatch, rank, scale, alpha):
    """Seven steps, a new projection every third: APOLLO-Mini and rank-2 channel APOLLO, and dense
    AdamW for the vector."""
    kw = dict(rank=rank, scale=scale, alpha=alpha, lr=1e-2, eps=1e-12, gap=3)
    ours, theirs = _both(SHAPES, monkeypatch, _grads(SHAPES, 7), kw, kw)
    assert _max_rel(ours, theirs) < 1e-5
    assert all(d[n].norm() > 0 for d in ours for n in d)


def test_first_step_cap(monkeypatch):
    """APOLLO-Mini on a matrix with fewer than alpha^2 = 128 rows: ||alpha s G|| exceeds AdamW's
    first-step norm sqrt(m n); ours caps the first update there, theirs has no cap. Without the
    cap (and limiter) ours equals theirs with their limiter on: at step 1 it only records a norm."""
    shapes = {"w": (16, 64)}
    grads = _grads(shapes, 1)
    kw = dict(rank=1, scale="tensor", alpha=math.sqrt(128.0), lr=1e-2, eps=1e-12)
    capped, theirs = _both(shapes, monkeypatch, grads, dict(kw, limit=1.01), dict(kw, limiter=True))
    uncapped, _ = _both(shapes, monkeypatch, grads, dict(kw, limit=None), kw)
    assert _max_rel(uncapped, theirs) < 1e-5
    assert capped[0]["w"].norm().item() == pytest.approx(1e-2 * math.sqrt(16 * 64), rel=1e-5)
    assert theirs[0]["w"].norm() > 1.5 * capped[0]["w"].norm()


def test_limiter_acts_after_bias_correction(monkeypatch):
    """A constant gradient: the bias-corrected Adam direction is constant, so our limiter (on the
    corrected update) never acts and every update has the same norm. Theirs limits the growth of
    the update before bias correction, m / (sqrt(v) + eps), whose norm grows like
    bc1 / sqrt(bc2) in the first steps: their update shrinks by 1.01 * c2 / c1, c = sqrt(bc2) / bc1."""
    shapes = {"w": (16, 24)}
    grads = _grads(shapes, 5, constant=True)
    kw = dict(rank=1, scale="tensor", alpha=1.0, lr=1e-2, eps=1e-12)
    ours, theirs_limited = _both(shapes, monkeypatch, grads, dict(kw, limit=1.01), dict(kw, limiter=True))
    unlimited, theirs_free = _both(shapes, monkeypatch, grads, dict(kw, limit=None), kw)
    assert _max_rel(ours, unlimited) < 1e-6 and _max_rel(ours, theirs_free) < 1e-5
    norms = [d["w"].norm().item() for d in ours]
    assert max(norms) / min(norms) < 1 + 1e-5
    c = [math.sqrt(1 - BETAS[1] ** t) / (1 - BETAS[0] ** t) for t in (1, 2)]
    n1, n2 = (theirs_limited[i]["w"].norm().item() for i in (0, 1))
    assert n1 == pytest.approx(norms[0], rel=1e-5)
    assert n2 / n1 == pytest.approx(1.01 * c[1] / c[0], rel=1e-4)  # ~0.75


def test_eps_on_the_bias_corrected_second_moment(monkeypatch):
    """Ours adds eps to sqrt(v_hat), theirs to sqrt(v) and corrects the bias in the step size: the
    same update needs their eps = ours * sqrt(1 - beta2^t) (at step 1 here)."""
    grads = _grads(SHAPES, 1)
    kw = dict(rank=1, scale="tensor", alpha=math.sqrt(128.0), lr=1e-2)
    ours, theirs = _both(SHAPES, monkeypatch, grads, dict(kw, eps=1e-2), dict(kw, eps=1e-2))
    _, matched = _both(SHAPES, monkeypatch, grads, dict(kw, eps=1e-2),
                       dict(kw, eps=1e-2 * math.sqrt(1 - BETAS[1])))
    assert _max_rel(ours, theirs) > 1e-2
    assert _max_rel(ours, matched) < 1e-5


def test_a_square_matrix_is_projected_on_the_left(monkeypatch):
    """m == n: ours projects on the left (R = P G), theirs ("std") on the right; told to project
    on the left, theirs is ours again. (Tensor scale: with channel scale their proj_type="left"
    takes the norms along the wrong dimension of a square R and fails.)"""
    shapes = {"sq": (12, 12)}
    grads = _grads(shapes, 3)
    kw = dict(rank=2, scale="tensor", alpha=1.0, lr=1e-2, eps=1e-12)
    ours, theirs = _both(shapes, monkeypatch, grads, kw, kw)
    _, left = _both(shapes, monkeypatch, grads, kw, dict(kw, proj_type="left"))
    assert _max_rel(ours, theirs) > 1e-2
    assert _max_rel(ours, left) < 1e-5


def test_weight_decay_order(monkeypatch):
    """Ours decays the weight before the update (w (1 - lr wd) - lr u, like torch's AdamW), theirs
    decays the updated weight: theirs - ours = lr wd (lr u) = -lr wd * (our update without decay)."""
    grads = _grads(SHAPES, 1)
    kw = dict(rank=1, scale="tensor", alpha=math.sqrt(128.0), lr=0.1, eps=1e-12)
    ours, theirs = _both(SHAPES, monkeypatch, grads, dict(kw, wd=0.5), dict(kw, wd=0.5))
    plain, _ = _both(SHAPES, monkeypatch, grads, kw, kw)
    for n in SHAPES:
        gap = theirs[0][n] - ours[0][n]
        assert gap.norm() > 1e-4
        torch.testing.assert_close(gap, -0.1 * 0.5 * plain[0][n], rtol=1e-4, atol=1e-7)


def test_their_state_does_not_load_with_weights_only():
    """Theirs keeps its projector object in `state`; ours is tensors and plain values only."""
    params = _params({"w": (6, 10)})
    opt = APOLLOAdamW([{"params": list(params.values()), "rank": 1, "proj": "random", "scale_type": "tensor",
                        "scale": 128, "update_proj_gap": 200, "proj_type": "std"}], lr=1e-2)
    _run(params, opt, _grads({"w": (6, 10)}, 1))
    assert isinstance(opt.state[params["w"]]["projector"], GradientProjector)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    with pytest.raises(Exception, match="[Ww]eights only"):
        torch.load(buf, weights_only=True)
