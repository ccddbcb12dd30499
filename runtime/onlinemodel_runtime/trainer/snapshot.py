"""What a job can change, copied to host memory before it runs, and written back in place to undo it.

A job writes only the parameters its optimizer updates (``requires_grad``: the training policy's choice,
``optim/policy.py``) and the optimizer's own state; everything else in the served weights is never
written. The snapshot holds exactly those: one host buffer per trained parameter, allocated once and
reused for every job (pinned on a GPU, so the copies run at full PCIe speed), and a host copy of the
optimizer's ``state_dict``. Restoring writes the buffers back into the very tensors vLLM serves; the caller
holds the weights lock for both.
"""

from __future__ import annotations

import time
from typing import Any

import torch


def _to_host(value: Any) -> Any:
    """`value` (an optimizer state_dict) with every tensor copied to host memory."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_host(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_host(v) for v in value)
    return value


class WeightSnapshot:
    """Host copies of `model`'s trained parameters and `optimizer`'s state, taken by `take`."""

    def __init__(self, model: torch.nn.Module, optimizer: Any) -> None:
        self._params = [p for p in model.parameters() if p.requires_grad]
        if not self._params:
            raise ValueError("nothing trains: there is nothing to snapshot")
        pin = self._params[0].device.type == "cuda"
        self._buffers = [torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=pin) for p in self._params]
        self._optimizer = optimizer
        self._optimizer_state: dict[str, Any] | None = None
        self.taken = False
        self.last_seconds: float | None = None

    @property
    def nbytes(self) -> int:
        """Host memory held: the parameter buffers (allocated once) and the optimizer state's copy."""
        weights = sum(b.numel() * b.element_size() for b in self._buffers)
        return weights + _tensor_bytes(self._optimizer_state)

    @torch.no_grad()
    def take(self) -> None:
        started = time.perf_counter()
        for buffer, p in zip(self._buffers, self._params):
            buffer.copy_(p, non_blocking=True)
        self._optimizer_state = _to_host(self._optimizer.state_dict())
        if self._params[0].device.type == "cuda":
            torch.cuda.synchronize(self._params[0].device)
        self.taken = True
        self.last_seconds = time.perf_counter() - started

    @torch.no_grad()
    def restore(self) -> float:
        """Write the snapshot back into the live parameters and the optimizer; returns the seconds taken."""
        if not self.taken:
            raise RuntimeError("no snapshot was taken")
        started = time.perf_counter()
        for buffer, p in zip(self._buffers, self._params):
            p.copy_(buffer, non_blocking=True)
        # A copy: loading aliases CPU tensors, and training would then write into the snapshot.
        self._optimizer.load_state_dict(_to_host(self._optimizer_state))
        if self._params[0].device.type == "cuda":
            torch.cuda.synchronize(self._params[0].device)
        return time.perf_counter() - started


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0
