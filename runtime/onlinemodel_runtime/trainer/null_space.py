"""Keep each update out of the directions general inputs use: gradient projection (GPM, Saha et al. 2021).

A linear layer's update dW changes its output on an input x by dW x. Before the first job, the inputs every
trained matrix sees on the anchor conversations (general questions and their answers, trainer/anchor.py) are
gathered; per input space, the top eigenvectors U of sum x x^T that hold `energy` of its trace are kept. Every
gradient of that matrix is then projected off them, G <- G - (G U) U^T, before the optimizer sees it (a tensor
hook, which runs before the optimizer's post-accumulate hooks), so a step changes what the layer computes on
those inputs as little as the basis allows, and the example is learned in the directions they leave free.
APOLLO's channel scale, applied after the projection, lets a little of the update back into U for the matrices
it scales by column (docs/learning.md, "Updates out of the general directions").

Measured (bench/continual_sweep.py, H200, SmolLM2, K = 32): energy 0.9 kept 77 of 78 controls where the same
settings without it kept 74, held-out loss -0.03% instead of +0.64%, every fact learned and kept.

Memory: the inputs' second moments (in_features^2 float32 per input space, q/k/v and gate/up sharing theirs)
while gathering, then the bases (in_features x k). A model whose second moments would exceed `max_bytes`
trains without the projection (a warning, and `reason` in the status): a scalable gathering for large models is
future work.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Sequence

import torch

from onlinemodel_protocol.rpc import EncodedExample

log = logging.getLogger(__name__)


def _trained_linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    return [(f"{name}.weight", m) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m.weight.requires_grad and m.weight.dim() == 2]


def moment_bytes(model: torch.nn.Module) -> int:
    """At most the float32 second moments gathering keeps: one per trained matrix (matrices that read the same
    tensor share one, so fewer are kept: 400 MB of this 522 MB bound for SmolLM2)."""
    return sum(4 * m.in_features ** 2 for _, m in _trained_linears(model))


def _top_directions(moment: torch.Tensor, energy: float) -> torch.Tensor:
    """The orthonormal eigenvectors (columns, float32) of a PSD `moment` holding `energy` of its trace."""
    vals, vecs = torch.linalg.eigh(moment)
    vals, vecs = vals.flip(0).clamp(min=0), vecs.flip(1)
    total = float(vals.sum())
    if total <= 0:
        return vecs[:, :0].contiguous()
    k = int((vals.cumsum(0) / total < energy).sum()) + 1
    return vecs[:, :min(k, vecs.shape[1])].contiguous()


class _Gathering:
    """While installed: every forward of the model's body adds each trained nn.Linear's inputs to that matrix's
    second moment (float32, on its device). Matrices fed the same tensor in one forward (q/k/v, gate/up) share
    the first one's moment."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.moments: dict[str, torch.Tensor] = {}
        self.shared: dict[str, str] = {}  # weight name -> the name whose moment holds its input
        # id of an input tensor -> (the first weight that read it, the tensor: held so that its id is not reused)
        self._first_reader: dict[int, tuple[str, torch.Tensor]] = {}
        self.forwards = 0
        self._handles = [model.base_model.register_forward_pre_hook(self._new_forward)]
        self._handles += [m.register_forward_pre_hook(self._hook(name)) for name, m in _trained_linears(model)]

    def _new_forward(self, _module, _args) -> None:
        self._first_reader.clear()
        self.forwards += 1

    def _hook(self, name: str):
        @torch.no_grad()
        def gather(_module, args):
            x = args[0]
            owner = self._first_reader.setdefault(id(x), (name, x))[0]
            if owner != name:
                self.shared[name] = owner
                return
            flat = x.reshape(-1, x.shape[-1]).float()
            if name in self.moments:
                self.moments[name].addmm_(flat.T, flat)
            else:
                self.moments[name] = flat.T @ flat
        return gather

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._first_reader.clear()

    def bases(self, energy: float) -> dict[str, torch.Tensor]:
        bases = {name: _top_directions(moment, energy) for name, moment in self.moments.items()}
        self.moments.clear()
        bases.update({name: bases[owner] for name, owner in self.shared.items()})
        return bases


@torch.no_grad()
def input_bases(model: torch.nn.Module, examples: Sequence[EncodedExample], energy: float
                ) -> dict[str, torch.Tensor]:
    """{weight name: U (in_features, k), float32, on the weight's device}: for every trained nn.Linear, the top
    eigenvectors of its inputs' second moment over every token of `examples` holding `energy` (0-1) of its
    trace. Matrices fed the same tensor (q/k/v, gate/up) share one basis."""
    if not 0 < energy < 1:
        raise ValueError(f"energy must be in (0, 1), got {energy!r}")
    device = next(model.parameters()).device
    gathering = _Gathering(model)
    try:
        for ex in examples:
            # The body only, as the loss runs it (trainer/loss.py): the LM head is never trained
            model.base_model(input_ids=torch.tensor([ex.input_ids], device=device), use_cache=False)
    finally:
        gathering.remove()
    return gathering.bases(energy)


class NullSpace:
    """The projection of every trained matrix's gradient off its inputs' general directions: built once, from
    the weights at the first job (the untouched model, or a checkpoint's weights after a restart), on the
    anchor conversations."""

    def __init__(self, examples: Sequence[EncodedExample], energy: float, max_bytes: int) -> None:
        if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 <= energy < 1:
            raise ValueError(f"energy must be a number in [0, 1), got {energy!r}")
        if energy and not examples:
            raise ValueError("the null-space projection needs at least one conversation")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an integer >= 0, got {max_bytes!r}")
        self.examples = list(examples)
        self.energy = float(energy)
        self.max_bytes = max_bytes
        self.reason: str | None = None if energy else "off (energy 0)"
        self._bases: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    @property
    def enabled(self) -> bool:
        return self.energy > 0 and self.reason is None

    @property
    def ready(self) -> bool:
        return bool(self._handles)

    def _fits(self, model: torch.nn.Module) -> bool:
        need = moment_bytes(model)
        if need > self.max_bytes:
            self.reason = (f"the inputs' second moments would take {need / 2**30:.1f} GiB, more than the "
                           f"{self.max_bytes / 2**30:.1f} GiB allowed")
            log.warning("null-space projection off: %s", self.reason)
        return self.reason is None

    @contextlib.contextmanager
    def gathering(self, model: torch.nn.Module) -> Iterator[None]:
        """While open, the body's forwards gather the bases' moments: the anchor term's record, which runs the same
        conversations through the same weights, so that the first job runs them once. Used only if exactly
        `examples` were run (a record restored from a checkpoint runs none of them): else build() runs its own."""
        if not self.enabled or self.ready or not self._fits(model):
            yield
            return
        gathering = _Gathering(model)
        try:
            yield
        finally:
            gathering.remove()
        if gathering.forwards == len(self.examples):
            self._attach(model, gathering.bases(self.energy))

    def build(self, model: torch.nn.Module) -> None:
        """Gather the bases from the model's current weights (a forward of every conversation) and hook every
        trained matrix's gradient, unless gathering() did; or turn the projection off, with the reason, if
        gathering would take more than `max_bytes`."""
        if not self.enabled or self.ready or not self._fits(model):
            return
        self._attach(model, input_bases(model, self.examples, self.energy))

    def _attach(self, model: torch.nn.Module, bases: dict[str, torch.Tensor]) -> None:
        self._bases = bases
        for name, p in model.named_parameters():
            if name in self._bases:
                self._handles.append(p.register_hook(_projector(self._bases[name].to(p.device))))
        log.info("null-space projection on %d matrices (energy %g): %d directions kept out of updates, %.1f MB",
                 len(self._handles), self.energy, self.directions, self.basis_bytes / 1e6)

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @property
    def directions(self) -> int:
        return sum(u.shape[1] for u in self._unique())

    @property
    def basis_bytes(self) -> int:
        return sum(u.numel() * u.element_size() for u in self._unique())

    def _unique(self) -> list[torch.Tensor]:
        return list({id(u): u for u in self._bases.values()}.values())

    def summary(self) -> dict[str, Any]:
        return {"energy": self.energy, "enabled": self.enabled, "matrices": len(self._handles),
                "directions": self.directions, "basis_bytes": self.basis_bytes, "reason": self.reason}


def _projector(u: torch.Tensor):
    def project(grad: torch.Tensor) -> torch.Tensor:
        g = grad.float()
        return (g - (g @ u) @ u.T).to(grad.dtype)
    return project
