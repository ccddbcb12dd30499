"""bench/rounding_drift.py's ways of writing float32 updates onto bf16 weights, on updates far under an ulp
(as a fine-tuning step's are): round to nearest loses them, stochastic rounding keeps their mean but adds noise
much larger than they are, the compensated write ends within half an ulp of the float32 result, and started
at random (dithered) it keeps one rounding draw's noise, not one per write."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import rounding_drift as rd  # noqa: E402


def _tiny_updates(steps: int = 400) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Updates of 0.5% of an ulp in one direction plus 2% in a random one at each step (a fine-tuning run's
    steps mostly do not agree: in bench/rounding_drift.py's run their float32 sum is far smaller than their
    sizes' sum)."""
    g = torch.Generator().manual_seed(0)
    w0 = (torch.randn(64, 64, generator=g) * 0.05).to(torch.bfloat16)
    ulp = w0.float().abs().clamp_min(1e-3) * 2.0 ** -8  # at most an ulp of bf16 (8 significant bits)
    direction = torch.randn(64, 64, generator=g).sign()
    return w0, [ulp * (0.005 * direction + 0.02 * torch.randn(64, 64, generator=g).sign()) for _ in range(steps)]


def test_the_ways_of_writing_tiny_updates():
    w0, updates = _tiny_updates()
    rows = rd.drift_rows(w0, updates)
    exact_change, _ = rows["float32"]
    assert rows["nearest"][0] < 0.01 * exact_change  # (nearly) every write rounded back: the update is lost
    stochastic_change, stochastic_error = rows["stochastic"]
    compensated_change, compensated_error = rows["compensated"]
    assert stochastic_error > exact_change  # noise larger than the update itself
    assert compensated_error < 0.5 * exact_change
    assert compensated_change == pytest.approx(exact_change, rel=0.5)
    dithered_change, dithered_error = rows["dithered"]
    assert dithered_error < 0.5 * stochastic_error  # one rounding draw per element, not one per write
    assert dithered_change == pytest.approx(exact_change, rel=0.5)


def test_an_unknown_way_is_refused():
    w0, updates = _tiny_updates(1)
    with pytest.raises(ValueError, match="way must be one of"):
        rd.replay(w0, updates, "truncate", torch.Generator())
