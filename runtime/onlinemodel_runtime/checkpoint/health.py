"""Every weight finite: checked while a checkpoint streams the tensors out, one tensor at a time.

The check runs where the tensor lives (on the GPU: one reduction per slice, no copy to the host) just
before the writer copies it out, inside the same weights snapshot, in slices so its scratch memory stays
bounded whatever the tensor's size.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

SCAN_ELEMENTS = 1 << 24  # elements per slice: 16 MiB of scratch booleans


def all_finite(tensor: torch.Tensor) -> bool:
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return True
    flat = tensor.detach().reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + SCAN_ELEMENTS]).all())
               for i in range(0, flat.numel(), SCAN_ELEMENTS))


class FiniteScan:
    """Passes (name, tensor) pairs through unchanged, noting the names of tensors holding NaN or inf."""

    def __init__(self, tensors: Iterable[tuple[str, torch.Tensor]]):
        self._tensors = tensors
        self.non_finite: list[str] = []

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self._tensors:
            if not all_finite(tensor):
                self.non_finite.append(name)
            yield name, tensor

    def reason(self) -> str | None:
        if not self.non_finite:
            return None
        shown = ", ".join(self.non_finite[:3]) + (", ..." if len(self.non_finite) > 3 else "")
        return f"{len(self.non_finite)} weight tensor(s) hold NaN or infinity ({shown})"
