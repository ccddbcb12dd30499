"""Keep each update out of the directions general inputs use: gradient projection (GPM, Saha et al. 2021).

A linear layer's update dW changes its output on an input x by dW x. Before the first job, the inputs every
trained matrix sees on the anchor conversations (general questions and their answers, trainer/anchor.py) are
gathered; per input space, the top eigenvectors U of sum x x^T that hold `energy` of its trace are kept. Every
gradient of that matrix is then projected off them, G <- G - (G U) U^T, before the optimizer sees it (a tensor
hook, which runs before the optimizer's post-accumulate hooks), so a step changes what the layer computes on
those inputs as little as the basis allows, and the example is learned in the directions they leave free.
For the matrices whose optimizer scales the update per input column (APOLLO's channel scale of q, k, v, o and
down_proj, projected on the left; AdamW's per element), a projected gradient does not give a projected update
(8-17% of SmolLM2's update norm lands back in U, median over those matrices): the optimizer projects their whole
update off U too (Apollo.keep_out), so that dW U = 0 for every matrix in float32 weights (docs/learning.md,
"Updates out of the general directions").

Measured (bench/continual_sweep.py, H200, SmolLM2, K = 32, seed 0): energy 0.9 kept 77 of 78 controls where the
same settings without it kept 74, held-out loss -0.03% instead of +0.64%, every fact learned and kept
(docs/learning.md for the other seeds and the served run).

Memory: gathering holds float32 second moments (in_features^2 per input space, q/k/v and gate/up sharing theirs)
of at most `max_bytes` at once: the input spaces are gathered in as many passes over the anchor conversations as
that takes (one for SmolLM2; measured for larger shapes by bench/null_space_build.py), each pass's moments
turned into bases and freed before the next. Then the bases (in_features x k) stay on the weights' device, in their
dtype (in bf16 0.4% of a gradient is left in the kept directions on a tiny model, against 48% unprojected). An
input space whose own moment exceeds `max_bytes` is left unprojected (`skipped` in the status).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from onlinemodel_protocol.rpc import EncodedExample
from onlinemodel_runtime.optim.functional import project_off

if TYPE_CHECKING:
    from onlinemodel_runtime.optim import Apollo

log = logging.getLogger(__name__)


def _trained_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {f"{name}.weight": m for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m.weight.requires_grad and m.weight.dim() == 2}


def _body_forward(model: torch.nn.Module, ids: Sequence[int], device: torch.device) -> None:
    # The body only, as the loss runs it (trainer/loss.py): the LM head is never trained
    model.base_model(input_ids=torch.tensor([list(ids)], device=device), use_cache=False)


@torch.no_grad()
def input_spaces(model: torch.nn.Module, ids: Sequence[int]) -> list[list[str]]:
    """The trained matrices grouped by the tensor they read, in forward order, the first reader first: one forward
    of `ids` (q/k/v read one tensor, gate/up another). A matrix the forward does not run is in no group."""
    linears = _trained_linears(model)
    first_reader: dict[int, tuple[str, torch.Tensor]] = {}  # the tensor is held so that its id is not reused
    spaces: dict[str, list[str]] = {}

    def hook(name: str):
        def record(_module, args) -> None:
            owner = first_reader.setdefault(id(args[0]), (name, args[0]))[0]
            spaces.setdefault(owner, []).append(name)
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in linears.items()]
    try:
        _body_forward(model, ids, next(model.parameters()).device)
    finally:
        for h in handles:
            h.remove()
    return [list(dict.fromkeys(readers)) for readers in spaces.values()]


def _moment_bytes(linear: torch.nn.Linear) -> int:
    return 4 * linear.in_features ** 2


def moment_bytes(model: torch.nn.Module, space: Sequence[str]) -> int:
    """The float32 second moment of one input space's inputs."""
    return _moment_bytes(_trained_linears(model)[space[0]])


def plan_passes(model: torch.nn.Module, spaces: list[list[str]], max_bytes: int
                ) -> tuple[list[list[list[str]]], list[list[str]]]:
    """(passes, skipped): consecutive input spaces packed into passes whose moments hold at most `max_bytes`
    together; the spaces whose own moment exceeds it, skipped."""
    passes: list[list[list[str]]] = []
    skipped: list[list[str]] = []
    current: list[list[str]] = []
    used = 0
    linears = _trained_linears(model)  # once: a walk of every module
    for space in spaces:
        need = _moment_bytes(linears[space[0]])
        if need > max_bytes:
            skipped.append(space)
            continue
        if current and used + need > max_bytes:
            passes.append(current)
            current, used = [], 0
        current.append(space)
        used += need
    if current:
        passes.append(current)
    return passes, skipped


def _top_directions(moment: torch.Tensor, energy: float) -> torch.Tensor:
    """The orthonormal eigenvectors (columns, the moment's dtype) of a PSD `moment` holding `energy` of its trace."""
    vals, vecs = torch.linalg.eigh(moment)
    vals, vecs = vals.flip(0).clamp(min=0), vecs.flip(1)
    total = float(vals.sum())
    if total <= 0:
        return vecs[:, :0].contiguous()
    k = int((vals.cumsum(0) / total < energy).sum()) + 1
    return vecs[:, :min(k, vecs.shape[1])].contiguous()


class _Gathering:
    """While installed: every forward of the model's body adds the inputs of each of `spaces`' first matrix to
    that space's second moment (float32, on its device)."""

    def __init__(self, model: torch.nn.Module, spaces: list[list[str]]) -> None:
        self.spaces = spaces
        self.moments: dict[str, torch.Tensor] = {}
        self.forwards = 0
        linears = _trained_linears(model)
        self.dtypes = {space[0]: linears[space[0]].weight.dtype for space in spaces}
        self._handles = [model.base_model.register_forward_pre_hook(self._new_forward)]
        self._handles += [linears[space[0]].register_forward_pre_hook(self._hook(space[0])) for space in spaces]

    def _new_forward(self, _module, _args) -> None:
        self.forwards += 1

    def _hook(self, name: str):
        @torch.no_grad()
        def gather(_module, args):
            x = args[0]
            flat = x.reshape(-1, x.shape[-1]).float()
            if name in self.moments:
                self.moments[name].addmm_(flat.T, flat)
            else:
                self.moments[name] = flat.T @ flat
        return gather

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def bases(self, energy: float) -> dict[str, torch.Tensor]:
        """{weight name: basis} for every matrix of the spaces, one tensor per space; frees the moments."""
        bases: dict[str, torch.Tensor] = {}
        for space in self.spaces:
            moment = self.moments.pop(space[0], None)
            if moment is not None:
                # Kept and applied in the weights' dtype: a bf16 model's projection in float32 made a step of the
                # 8B shape 7x slower on an H200 (1.8x in bf16; docs/benchmarks.md).
                u = _top_directions(moment, energy).to(self.dtypes[space[0]])
                del moment
                bases.update({name: u for name in space})
        return bases


def _gather(model: torch.nn.Module, examples: Sequence[EncodedExample], spaces: list[list[str]], energy: float
            ) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    gathering = _Gathering(model, spaces)
    try:
        for ex in examples:
            _body_forward(model, ex.input_ids, device)
    finally:
        gathering.remove()
    return gathering.bases(energy)


@torch.no_grad()
def input_bases(model: torch.nn.Module, examples: Sequence[EncodedExample], energy: float
                ) -> dict[str, torch.Tensor]:
    """{weight name: U (in_features, k), in the weight's dtype and on its device}: for every trained nn.Linear, the top
    eigenvectors of its inputs' second moment over every token of `examples` holding `energy` (0-1) of its
    trace, in one pass. Matrices fed the same tensor (q/k/v, gate/up) share one basis."""
    if not 0 < energy < 1:
        raise ValueError(f"energy must be in (0, 1), got {energy!r}")
    return _gather(model, examples, input_spaces(model, examples[0].input_ids), energy)


class NullSpace:
    """The projection of every trained matrix's gradient off its inputs' general directions: built once, from
    the weights at the first job (the untouched model, or a checkpoint's weights after a restart), on the
    anchor conversations, in as many passes over them as `max_bytes` of moments at once allows."""

    def __init__(self, examples: Sequence[EncodedExample], energy: float, max_bytes: int,
                 optimizer: Apollo | None = None) -> None:
        if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 <= energy < 1:
            raise ValueError(f"energy must be a number in [0, 1), got {energy!r}")
        if energy and not examples:
            raise ValueError("the null-space projection needs at least one conversation")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an integer >= 0, got {max_bytes!r}")
        self.examples = list(examples)
        # The Apollo whose updates of the matrices it scales per input column are projected too (None: the
        # gradients only, e.g. the null-space build benchmark's).
        self.optimizer = optimizer
        self._kept_out = 0
        self.energy = float(energy)
        self.max_bytes = max_bytes
        self.reason: str | None = None if energy else "off (energy 0)"
        self._passes: list[list[list[str]]] | None = None  # planned at the first gathering
        self._skipped = 0  # matrices whose input space alone exceeds max_bytes
        self._gathered: dict[str, torch.Tensor] = {}  # bases of the passes done so far
        self._passes_done = 0
        self._build_seconds = 0.0
        self._bases: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    @property
    def enabled(self) -> bool:
        return self.energy > 0 and self.reason is None

    @property
    def ready(self) -> bool:
        return bool(self._handles)

    def _plan(self, model: torch.nn.Module) -> list[list[list[str]]]:
        if self._passes is None:
            spaces = input_spaces(model, self.examples[0].input_ids)
            self._passes, skipped = plan_passes(model, spaces, self.max_bytes)
            self._skipped = sum(len(space) for space in skipped)
            if skipped:
                log.warning("null-space projection: %d matrices left unprojected, their inputs' second moment "
                            "alone exceeds %.2f GiB", self._skipped, self.max_bytes / 2**30)
            if not self._passes:
                self.reason = (f"no input space's second moment fits the {self.max_bytes / 2**30:.2f} GiB "
                               f"allowed at once")
                log.warning("null-space projection off: %s", self.reason)
        return self._passes

    @contextlib.contextmanager
    def gathering(self, model: torch.nn.Module) -> Iterator[None]:
        """While open, the body's forwards gather the first pass's moments: the anchor term's record, which runs
        the same conversations through the same weights, so that the first pass costs no forwards of its own. Used
        only if exactly `examples` were run (a record restored from a checkpoint runs none of them); build()
        runs the passes left."""
        if not self.enabled or self.ready or self._passes_done or not self._plan(model):
            yield
            return
        gathering = _Gathering(model, self._passes[0])
        try:
            yield
        finally:
            gathering.remove()
        if gathering.forwards == len(self.examples):
            # The record's forwards count as the record's time: only the eigendecompositions as this pass's.
            started = time.perf_counter()
            self._gathered.update(gathering.bases(self.energy))
            self._passes_done = 1
            self._build_seconds += time.perf_counter() - started
            if len(self._passes) == 1:
                self._attach(model)

    @torch.no_grad()
    def build(self, model: torch.nn.Module) -> None:
        """Gather the bases of the passes gathering() did not (a forward of every conversation each) from the
        model's current weights and hook every trained matrix's gradient; or turn the projection off, with the
        reason, if no input space fits `max_bytes`."""
        if not self.enabled or self.ready or not self._plan(model):
            return
        started = time.perf_counter()
        for spaces in self._passes[self._passes_done:]:
            self._gathered.update(_gather(model, self.examples, spaces, self.energy))
            self._passes_done += 1
        self._build_seconds += time.perf_counter() - started
        self._attach(model)

    def _attach(self, model: torch.nn.Module) -> None:
        params = dict(model.named_parameters())
        self._bases, self._gathered = self._gathered, {}
        if self.optimizer is not None:  # first: if it refuses, no gradient is projected either (and ready stays False)
            kept = {params[name]: u for name, u in self._bases.items()
                    if self.optimizer.scales_input_columns(params[name])}
            self.optimizer.keep_out(kept)
            self._kept_out = len(kept)
        for name, u in self._bases.items():
            self._handles.append(params[name].register_hook(_projector(u)))
        held = self.optimizer.kept_out_bytes if self.optimizer is not None else 0
        log.info("null-space projection on %d matrices (energy %g; the whole update of %d): %d directions kept "
                 "out of updates, %.1f MB (the optimizer holds %.1f MB for the whole updates'), %d pass(es) over "
                 "%d conversations, %.1f s", len(self._handles), self.energy, self._kept_out, self.directions,
                 self.basis_bytes / 1e6, held / 1e6, self._passes_done, len(self.examples), self._build_seconds)

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.optimizer is not None and self._kept_out:
            self.optimizer.keep_out({})
            self._kept_out = 0

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
                "updates_projected": self._kept_out, "directions": self.directions, "basis_bytes": self.basis_bytes,
                "passes": self._passes_done, "skipped": self._skipped, "reason": self.reason}


def _projector(u: torch.Tensor):
    def project(grad: torch.Tensor) -> torch.Tensor:
        return project_off(grad, u)
    return project
