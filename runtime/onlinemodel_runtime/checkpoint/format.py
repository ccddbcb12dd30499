"""The on-disk format of one checkpoint directory, and its validation.

    step-00000012/
        config.json, tokenizer*, *.jinja, generation_config.json, ...   (copied from the base model)
        model.safetensors | model-0000k-of-0000n.safetensors + model.safetensors.index.json
        onlinemodel/optimizer.pt          torch.save, loadable with weights_only=True
        onlinemodel/trainer_state.json    step, tokens_trained, weight_version, ...
        onlinemodel/checkpoint.json       metadata + file manifest; written last = complete marker

A checkpoint whose weights were not healthy (``health.py``, the trainer's loss check) is written all the
same, under ``unhealthy-step-...``: its record says so, and ``validate_checkpoint`` refuses it, so it can
never become (or be mistaken for) a checkpoint to resume from.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import CheckpointError
from .fsutil import sha256_file
from .safetensors_stream import INDEX_FILE, read_header

META_DIR = "onlinemodel"
META_FILE = "checkpoint.json"
OPTIMIZER_FILE = "optimizer.pt"
TRAINER_STATE_FILE = "trainer_state.json"
FORMAT = "onlinemodel-checkpoint"
FORMAT_VERSION = 1
STEP_DIR_RE = re.compile(r"^step-(\d{8,})(?:-(\d+))?$")
UNHEALTHY_PREFIX = "unhealthy-"

# Base-model files that are weights (never copied: the checkpoint writes its own).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack",
                    ".onnx", ".npz", ".pkl", ".index.json")


def is_weight_file(name: str) -> bool:
    return name.endswith(_WEIGHT_SUFFIXES)


def step_dir_name(step: int, suffix: int = 0) -> str:
    return f"step-{step:08d}" + (f"-{suffix}" if suffix else "")


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint. `time` is UTC ISO-8601 (when its metadata was written).

    `seconds` is how long the save took: from `save()`, until it returned (durable and committed);
    read back from disk (`latest()`), until the metadata was written (before the final fsyncs).
    """

    path: Path
    step: int
    weight_version: int
    time: str
    size_bytes: int
    seconds: float
    content_hash: str
    tokens_trained: int = 0
    base_model: str = ""
    healthy: bool = True
    unhealthy_reason: str | None = None


def read_metadata(path: Path) -> dict[str, Any]:
    meta_path = Path(path) / META_DIR / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is incomplete: {META_DIR}/{META_FILE} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable {META_DIR}/{META_FILE}: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: {META_DIR}/{META_FILE} is not an onlinemodel checkpoint record")
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {meta.get('version')!r} is not "
                              f"supported (expected {FORMAT_VERSION})")
    return meta


def _manifest_path(root: Path, rel: str) -> Path:
    parts = PurePosixPath(rel).parts
    if not parts or rel.startswith("/") or ".." in parts:
        raise CheckpointError(f"{root}: manifest entry {rel!r} is not a relative path inside it")
    return root.joinpath(*parts)


def validate_checkpoint(path: Path, *, verify_hash: bool = False) -> CheckpointInfo:
    """Return the CheckpointInfo of `path`, or raise CheckpointError saying what is wrong.

    Checks the metadata record, that every recorded file exists with its recorded size and that
    every safetensors header parses and matches its file size. `verify_hash` also re-reads every
    file and compares sha256 (slow: reads the whole checkpoint).
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory")
    meta = read_metadata(path)
    try:
        files: dict[str, dict[str, Any]] = meta["files"]
        weight_files: list[str] = meta["weights"]["files"]
        info = CheckpointInfo(path=path, step=int(meta["step"]), weight_version=int(meta["weight_version"]),
                              time=str(meta["time"]), size_bytes=int(meta["size_bytes"]),
                              seconds=float(meta["seconds"]), content_hash=str(meta["content_hash"]),
                              tokens_trained=int(meta.get("tokens_trained", 0)),
                              base_model=str(meta.get("base_model", "")))
        sizes = {rel: int(rec["size"]) for rel, rec in files.items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: checkpoint record lacks or mangles a field: {exc!r}") from exc
    health = meta.get("health") or {}
    if health.get("healthy") is False:
        raise CheckpointError(f"{path} is marked unhealthy: {'; '.join(map(str, health.get('reasons', [])))}")
    if not weight_files or any(w not in files for w in weight_files):
        raise CheckpointError(f"{path}: checkpoint record lists no weights or unknown weight files")
    for rel, size in sizes.items():
        target = _manifest_path(path, rel)
        try:
            actual = target.stat().st_size
        except OSError:
            raise CheckpointError(f"{path}: file {rel} is missing") from None
        if actual != size:
            raise CheckpointError(f"{path}: file {rel} is {actual} bytes, recorded {size} (truncated or changed)")
    tensor_names: set[str] = set()
    for rel in weight_files:
        header, _ = read_header(_manifest_path(path, rel))
        tensor_names.update(k for k in header if k != "__metadata__")
    if INDEX_FILE in files:
        try:
            weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: bad {INDEX_FILE}: {exc!r}") from exc
        if set(weight_map) != tensor_names or not set(weight_map.values()) <= set(weight_files):
            raise CheckpointError(f"{path}: {INDEX_FILE} does not match the shard headers")
    if verify_hash:
        for rel, rec in files.items():
            if sha256_file(_manifest_path(path, rel)) != rec.get("sha256"):
                raise CheckpointError(f"{path}: sha256 of {rel} does not match the record (corrupt)")
    return info


def sort_key(path: Path) -> tuple[float, int, int]:
    """Newest-last ordering: the recorded save time, else the directory's mtime; then the name."""
    match = STEP_DIR_RE.match(path.name)
    step, suffix = (int(match.group(1)), int(match.group(2) or 0)) if match else (0, 0)
    try:
        stamp = datetime.fromisoformat(read_metadata(path)["time"].replace("Z", "+00:00")).timestamp()
    except (CheckpointError, KeyError, ValueError, AttributeError):
        try:
            stamp = path.stat().st_mtime
        except OSError:
            stamp = 0.0
    return stamp, step, suffix
