"""Whether the recent training loss looks healthy: the loss half of a checkpoint's health check.

The other half, every weight finite, is checked while a checkpoint streams the weights out
(``checkpoint/health.py``). Over the last ``HEALTH_LOSS_WINDOW`` steps (skipped ones included):

- any non-finite loss is unhealthy;
- a mean loss above ``HEALTH_DIVERGENCE_FACTOR`` x the lowest such mean seen so far AND above ln(vocabulary
  size) is diverging. The second bound is the loss of a uniform guess: new data a healthy model has not
  learned yet stays well below it (a pretrained model starts at 1-3 nats), a model pushed over the edge
  (too high a learning rate) goes far above it, and a model of random weights starts at it without being
  flagged.
"""

from __future__ import annotations

import collections
import math
import statistics
from typing import Any

from onlinemodel_protocol.limits import HEALTH_DIVERGENCE_FACTOR, HEALTH_LOSS_WINDOW


class LossHealth:
    def __init__(self, vocab_size: int | None, window: int = HEALTH_LOSS_WINDOW,
                 factor: float = HEALTH_DIVERGENCE_FACTOR):
        if window < 1 or factor <= 1:
            raise ValueError(f"window must be >= 1 and factor > 1, got {window}, {factor}")
        self.factor = factor
        self.uniform_loss = math.log(vocab_size) if vocab_size and vocab_size > 1 else 0.0
        self._losses: collections.deque[float] = collections.deque(maxlen=window)
        self.best_mean: float | None = None

    def observe(self, loss: float) -> None:
        self._losses.append(float(loss))
        mean = self._full_finite_mean()
        if mean is not None and (self.best_mean is None or mean < self.best_mean):
            self.best_mean = mean

    def _full_finite_mean(self) -> float | None:
        if len(self._losses) < self._losses.maxlen or not all(map(math.isfinite, self._losses)):
            return None
        return statistics.fmean(self._losses)

    def verdict(self) -> str | None:
        """None when healthy, else why not."""
        bad = sum(not math.isfinite(x) for x in self._losses)
        if bad:
            return f"{bad} of the last {len(self._losses)} training steps had a non-finite loss"
        mean = self._full_finite_mean()
        if mean is not None and self.best_mean is not None and \
                mean > self.factor * self.best_mean and mean > self.uniform_loss:
            return (f"the loss is diverging: its mean over the last {len(self._losses)} steps is {mean:.3g}, above "
                    f"{self.factor:g} x the lowest such mean ({self.best_mean:.3g}) and above the loss of a uniform "
                    f"guess ({self.uniform_loss:.3g})")
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self._losses), "best_mean": self.best_mean}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._losses.clear()
        self._losses.extend(float(x) for x in state.get("losses", []))
        best = state.get("best_mean")
        self.best_mean = None if best is None else float(best)
