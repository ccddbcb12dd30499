"""A checkpoint's weights written into a live model in place: ``POST /rollback`` (docs/guard.md).

The reverse of a save with the same pieces: ``model_tensors.CheckpointNames`` maps the live model's
tensors to the checkpoint's names (views, so experts and renamed prefixes land where they belong), and
``base_weights.BaseWeights`` reads the checkpoint's safetensors tensor by tensor from a private mapping.
Everything is checked (names, shapes) before the first byte is written, so a checkpoint that does not fit
this model leaves the live weights untouched. Tensors the checkpoint carries for others (a vision tower)
are not the trainer's and are skipped.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .base_weights import BaseWeights
from .errors import CheckpointError, CheckpointNotFound, CheckpointUnusable
from .format import STEP_DIR_RE, UNHEALTHY_PREFIX, CheckpointInfo, step_dir_name, validate_checkpoint
from .model_tensors import CheckpointNames, hf_weight_tensors
from .store import CheckpointStore

LATEST = "latest"


def find_checkpoint(store: CheckpointStore, to: int | str) -> CheckpointInfo:
    """The checkpoint `to` names: LATEST, a step (the newest checkpoint of that step), or a directory name
    (``step-00000012``, or its absolute path) of `store`. Nothing outside the store is ever read.

    Raises CheckpointNotFound, or CheckpointUnusable for an unhealthy or damaged one.
    """
    if to == LATEST:
        info = store.latest()
        if info is None:
            raise CheckpointNotFound(f"there is no checkpoint under {store.root} yet")
        return info
    if isinstance(to, int):
        matches = [m for m in map(STEP_DIR_RE.match, _names(store.root)) if m and int(m.group(1)) == to]
        candidates = [m.string for m in sorted(matches, key=lambda m: int(m.group(2) or 0))]
        unhealthy = store.root / f"{UNHEALTHY_PREFIX}{step_dir_name(to)}"
    else:
        name = Path(to).name
        in_store = name == to or (Path(to).is_absolute() and Path(to).parent.resolve() == store.root.resolve())
        if not in_store or not (STEP_DIR_RE.match(name) or name.startswith(UNHEALTHY_PREFIX)):
            raise CheckpointNotFound(f"{to!r} names no checkpoint of {store.root}: give a step, a checkpoint "
                                     f"name such as {step_dir_name(0)!r}, or {LATEST!r}")
        found = STEP_DIR_RE.match(name) and (store.root / name).is_dir()
        candidates, unhealthy = ([name] if found else []), store.root / name
    for name in reversed(candidates):
        try:
            return validate_checkpoint(store.root / name)
        except CheckpointError as exc:
            raise CheckpointUnusable(str(exc)) from None
    if unhealthy.is_dir():
        raise CheckpointUnusable(f"{unhealthy.name} was kept aside as unhealthy and cannot be restored")
    raise CheckpointNotFound(f"no checkpoint {to!r} under {store.root}")


def _names(root: Path) -> list[str]:
    try:
        return [p.name for p in root.iterdir()]
    except OSError:
        return []


@torch.no_grad()
def load_weights_into(model: torch.nn.Module, path: Path, names: CheckpointNames = CheckpointNames()) -> int:
    """Copy the weights of the checkpoint at `path` into `model`'s tensors; returns the bytes written.

    Raises CheckpointError, before writing anything, if a tensor of the model is missing from the
    checkpoint or has another shape there.
    """
    files = BaseWeights.of(Path(path))
    stored = {spec.name: spec for spec in files.specs(("",), exclude=set())}
    targets = list(names.tensors(hf_weight_tensors(model)))
    for name, view in targets:
        spec = stored.get(name)
        if spec is None:
            raise CheckpointError(f"{path}: has no tensor {name!r}; it is not a checkpoint of this model")
        if tuple(spec.shape) != tuple(view.shape):
            raise CheckpointError(f"{path}: tensor {name!r} has shape {list(spec.shape)}, the live model's is "
                                  f"{list(view.shape)}")
    written = 0
    for (_, view), (_, source) in zip(targets, files.tensors([stored[name] for name, _ in targets])):
        view.copy_(source, non_blocking=True)
        written += view.numel() * view.element_size()
    if targets and targets[0][1].device.type == "cuda":
        torch.cuda.synchronize(targets[0][1].device)
    return written
