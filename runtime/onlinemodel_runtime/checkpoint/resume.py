"""Which checkpoint a server starts from, and what happens when the model it is asked to serve changed.

Every checkpoint records the base model it was trained from (``base_model``: the ``--model`` the server
was started with). A server asked to serve another model must not silently serve the old checkpoint,
nor train on and record the wrong base: it refuses (``ModelChanged``), unless told to start over, which
moves the old checkpoints aside (``CheckpointStore.set_aside``: nothing is deleted) and starts from the
new model. Starting over acts only on a change: with the same model it resumes as usual, so a
deployment can keep the flag set.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

from .errors import CheckpointError
from .format import CheckpointInfo
from .store import CheckpointStore

log = logging.getLogger(__name__)

SET_ASIDE_PREFIX = "previous-"


class ModelChanged(CheckpointError):
    """The checkpoint directory holds checkpoints of another base model."""


def same_model(recorded: str, requested: str) -> bool:
    """The same model: the same name, or two paths of one directory."""
    if recorded == requested:
        return True
    a, b = Path(recorded), Path(requested)
    return a.exists() and b.exists() and a.resolve() == b.resolve()


def resume_point(store: CheckpointStore, model: str, *, start_over: bool = False) -> CheckpointInfo | None:
    """The checkpoint to serve and train on (None: start from `model` itself).

    Raises ModelChanged if the latest checkpoint was trained from another base model and `start_over`
    is false; with `start_over`, those checkpoints are moved into ``previous-<UTC time>/`` first.
    """
    latest = store.latest()
    if latest is None or not latest.base_model or same_model(latest.base_model, model):
        return latest
    if not start_over:
        raise ModelChanged(
            f"the checkpoints in {store.root} were trained from {latest.base_model!r}, not from --model {model!r}; "
            "serving them would ignore the new model and training would record the wrong base. Pass "
            "--start-over to move them aside (nothing is deleted) and start from the new model, or set "
            f"--model back to {latest.base_model!r}")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    name, n = SET_ASIDE_PREFIX + stamp, 1
    while (store.root / name).exists():
        n += 1
        name = f"{SET_ASIDE_PREFIX}{stamp}-{n}"
    moved = store.set_aside(name)
    log.warning("--start-over: the checkpoints of %s were moved to %s; starting from %s",
                latest.base_model, moved, model)
    return None
