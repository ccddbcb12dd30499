"""What a checkpoint directory holds besides its weights, written and read back: the base model's non-weight
files, the trainer state (JSON), the optimizer state (torch.save, checked to load with weights_only=True: no
pickle of arbitrary objects), and the base model a checkpoint records. CheckpointStore (store.py) calls these
in its commit sequence."""

from __future__ import annotations

import contextlib
import json
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch

from .errors import CheckpointError
from .format import META_DIR, META_FILE, OPTIMIZER_FILE, TRAINER_STATE_FILE, CheckpointInfo, is_weight_file
from .fsutil import HashingFile, copy_file_hashed


def trainer_state_json(value: Any, what: str) -> str:
    try:
        # NaN allowed: a skipped step's loss may be NaN; Python's json reads it back.
        return json.dumps(value, indent=2, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{what} is not JSON-serializable: {exc}") from exc


def base_model_of(base_dir: Path) -> str:
    """The original base model: a checkpoint used as base (resume) passes its own on."""
    meta_path = base_dir / META_DIR / META_FILE
    if meta_path.is_file():
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            recorded = json.loads(meta_path.read_text())["base_model"]
            if isinstance(recorded, str) and recorded:
                return recorded
    return str(base_dir.resolve())


def copy_base_files(base_dir: Path, dest: Path) -> dict[str, tuple[int, str]]:
    """Copy the base dir's top-level non-weight files (config, tokenizer, templates, ...)."""
    files = {}
    for src in sorted(base_dir.iterdir()):
        if src.name.startswith(".") or not src.is_file() or is_weight_file(src.name):
            continue
        files[src.name] = copy_file_hashed(src, dest / src.name)
    return files


def write_bytes(path: Path, data: bytes) -> tuple[int, str]:
    with HashingFile(path) as f:
        f.write(data)
    return f.size, f.sha256


def write_optimizer_state(state: Mapping[str, Any], tmp: Path) -> tuple[int, str]:
    path = tmp / META_DIR / OPTIMIZER_FILE
    with HashingFile(path) as f:
        try:
            torch.save(dict(state), f)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"optimizer_state cannot be saved with torch.save: {exc}") from exc
    try:
        # mmap: checks what weights_only accepts without reading the tensor data back.
        torch.load(path, weights_only=True, mmap=True, map_location="cpu")
    except Exception as exc:
        raise CheckpointError("optimizer_state cannot be loaded with torch.load(weights_only=True); "
                              f"keep it to tensors, numbers, strings and containers: {exc}") from exc
    return f.size, f.sha256


def load_training_state(info: CheckpointInfo | Path, map_location: Any = "cpu"
                        ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(optimizer_state or None if none was saved, trainer_state) of a checkpoint."""
    path = info.path if isinstance(info, CheckpointInfo) else Path(info)
    meta_dir = path / META_DIR
    try:
        trainer_state = json.loads((meta_dir / TRAINER_STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read {META_DIR}/{TRAINER_STATE_FILE}: {exc}") from exc
    opt_path = meta_dir / OPTIMIZER_FILE
    if not opt_path.exists():
        return None, trainer_state
    try:
        optimizer_state = torch.load(opt_path, weights_only=True, map_location=map_location)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot load {META_DIR}/{OPTIMIZER_FILE}: {exc}") from exc
    return optimizer_state, trainer_state
