"""Projections: the projection in force for each matrix, cached between steps."""

import pytest
import torch

from onlinemodel_runtime.optim import projections as projections_module
from onlinemodel_runtime.optim.functional import param_seed, projection_matrix, projection_seed
from onlinemodel_runtime.optim.projections import Projections


def test_the_cached_projection_is_the_seeded_one_and_keeps_its_address():
    proj = Projections()
    w = torch.zeros(6, 10)
    first = proj.get(w, "w", 0, 3, 1, 2)
    assert torch.equal(first, projection_matrix((6, 10), 2, projection_seed(param_seed("w", 0), 1, 3)))
    assert proj.get(w, "w", 0, 3, 3, 2) is first  # same period: no new draw
    old = first.clone()
    again = proj.get(w, "w", 0, 3, 4, 2)  # a new period: new values, same tensor
    assert again is first and not torch.equal(again, old)
    assert torch.equal(again, projection_matrix((6, 10), 2, projection_seed(param_seed("w", 0), 4, 3)))
    assert not torch.equal(proj.get(torch.zeros(6, 10), "v", 0, 3, 4, 2), again)  # names seed it
    assert proj.get(w, "w", 0, 3, 4, 1).shape == (1, 6)  # another rank: another tensor


def test_seeds_are_hashed_once_per_period(monkeypatch):
    """Per-step host work: a name is hashed once, its projection seed once per period."""
    calls = {"param_seed": 0, "projection_seed": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    for name in calls:
        monkeypatch.setattr(projections_module, name, counting(name, getattr(projections_module, name)))
    proj = Projections()
    ws = {f"m{i}": torch.zeros(4, 5) for i in range(3)}
    for step in range(1, 8):  # periods: steps 1-3, 4-6, 7
        for name, w in ws.items():
            proj.get(w, name, 0, 3, step, 1)
    assert calls == {"param_seed": 3, "projection_seed": 9}


@pytest.mark.parametrize("shape", [(4, 9), (9, 4), (5, 5)])
def test_the_projection_removes_the_smaller_dimension(shape):
    assert Projections().get(torch.zeros(shape), "w", 0, 10, 1, 2).shape == (2, min(shape))
