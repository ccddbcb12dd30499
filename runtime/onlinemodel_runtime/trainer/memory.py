"""The trainer's memory beyond the weights it shares with vLLM, and how long an example may be.

``MemoryMonitor`` measures each step: on a GPU, torch's allocator in this process (vLLM owns the weights'
memory: attached over CUDA IPC, they are not counted here), so its peak is everything training adds
(activations, one layer's gradients, optimizer state and work buffers); on CPU, resident memory.

``largest_example_tokens`` answers the sizing question of docs/serving-first.md: vLLM takes
``--gpu-memory-utilization`` of the card for its weights, activations and KV cache; the trainer lives in
the rest. A step's peak grows linearly with the example's tokens, ``fixed + per_token x tokens`` (with
per-layer recomputation and the chunked loss, activations are the only part that grows), so two measured
peaks (``fit_peak_line``) give the line.
"""

from __future__ import annotations

import os
import resource
from typing import Sequence

import torch

from onlinemodel_protocol.api import MemoryStatus


class MemoryMonitor:
    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.peak_allocated_bytes = 0  # since the trainer started (largest step peak)
        self.last_step_peak_bytes: int | None = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def begin_step(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def end_step(self) -> None:
        if self.cuda:
            self.last_step_peak_bytes = torch.cuda.max_memory_allocated(self.device)
            self.peak_allocated_bytes = max(self.peak_allocated_bytes, self.last_step_peak_bytes)

    def status(self) -> MemoryStatus:
        if not self.cuda:
            return MemoryStatus(device=str(self.device), rss_bytes=_rss_bytes(),
                                peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        free, total = torch.cuda.mem_get_info(self.device)
        allocated = torch.cuda.memory_allocated(self.device)
        return MemoryStatus(device=str(self.device), allocated_bytes=allocated,
                            reserved_bytes=torch.cuda.memory_reserved(self.device),
                            peak_allocated_bytes=max(self.peak_allocated_bytes, allocated),
                            last_step_peak_bytes=self.last_step_peak_bytes,
                            device_free_bytes=free, device_total_bytes=total)


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def fit_peak_line(points: Sequence[tuple[int, int]]) -> tuple[float, float]:
    """(fixed bytes, bytes per token) of the line through (tokens, step peak bytes) measurements
    (least squares; at least two different token counts)."""
    if len({t for t, _ in points}) < 2:
        raise ValueError("need step peaks at two or more different example lengths")
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_b = sum(b for _, b in points) / n
    slope = (sum((t - mean_t) * (b - mean_b) for t, b in points)
             / sum((t - mean_t) ** 2 for t, _ in points))
    return mean_b - slope * mean_t, slope


def largest_example_tokens(*, device_total_bytes: int, gpu_memory_utilization: float, fixed_bytes: float,
                           bytes_per_token: float, trainer_overhead_bytes: int) -> int:
    """The most tokens one training example may have beside vLLM at `gpu_memory_utilization`.

    The trainer has ``(1 - gpu_memory_utilization) x device_total_bytes``, minus what it holds outside
    torch's allocator (`trainer_overhead_bytes`: its CUDA context and library workspaces, plus a margin
    for allocator fragmentation), for a step peak of ``fixed_bytes + bytes_per_token x tokens``.
    0 if not even an empty step fits.
    """
    if not 0 < gpu_memory_utilization < 1:
        raise ValueError(f"gpu_memory_utilization {gpu_memory_utilization} is not in (0, 1)")
    if bytes_per_token <= 0:
        raise ValueError(f"bytes_per_token {bytes_per_token} must be positive")
    room = (1 - gpu_memory_utilization) * device_total_bytes - trainer_overhead_bytes - fixed_bytes
    return max(0, int(room // bytes_per_token))
