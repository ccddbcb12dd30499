"""CheckpointStore: atomic, pruned, self-validating checkpoints under one root directory.

The commit protocol - write, verify, promote ``latest``, prune, set aside - is what makes a crash at any
point safe, and it is checked by reading it whole, so it stays in one class; what the files hold (format.py,
contents.py), the file system (fsutil.py) and health (health.py) are their own modules.

    ROOT/
        step-00000010/  step-00000012/      complete checkpoints (see format.py)
        latest                              "step-00000012\\n": the commit point, replaced last
        unhealthy-step-00000014/            the newest checkpoint refused as unhealthy (at most one)
        previous-20261201T152000Z/          checkpoints of an earlier model, set aside (`set_aside`)
        .lock                               flock held while a save runs
        .tmp-*  .trash-*                    in-flight or abandoned work, removed on the next save/open

A save writes into `.tmp-...`, fsyncs every file and directory, renames the directory to its
`step-...` name, fsyncs ROOT, then replaces `latest` (temp file + os.replace + fsync). A process
killed at any moment therefore leaves `latest` naming a complete checkpoint. A save whose weights are
not all finite, or whose caller says the loss is unhealthy, is renamed `unhealthy-step-...` instead and
`latest` is left alone: only healthy checkpoints are ever promoted, and pruning (which counts only those)
never removes the newest of them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import logging
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch

from onlinemodel_protocol.api import utc_timestamp

from .base_weights import BaseWeights
from .contents import (base_model_of, copy_base_files, load_training_state, trainer_state_json, write_bytes,
                       write_optimizer_state)
from .errors import CheckpointBusy, CheckpointError, describe_os_error
from .fsutil import NEW_FILE, atomic_write_text, fsync_path, fsync_tree
from .format import (FORMAT, FORMAT_VERSION, META_DIR, META_FILE, OPTIMIZER_FILE, STEP_DIR_RE,
                     TRAINER_STATE_FILE, UNHEALTHY_PREFIX, CheckpointInfo, sort_key, step_dir_name,
                     validate_checkpoint)
from .health import FiniteScan
from .model_tensors import CheckpointNames
from .safetensors_stream import (DEFAULT_CHUNK_BYTES, DEFAULT_MAX_SHARD_BYTES, SafetensorsStreamWriter,
                                 TensorSpec, specs_of)

log = logging.getLogger(__name__)

LATEST_FILE = "latest"
LOCK_FILE = ".lock"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"


class CheckpointStore:
    """Checkpoints of one model under `root`, keeping the newest `keep_last`.

    `names` says how the saved tensors' names become the base checkpoint's and which base tensors
    are carried over (default: names as given, nothing carried). `max_shard_bytes` splits the
    weights into HF shards; `chunk_bytes` bounds the host buffer used to copy each tensor out.
    """

    def __init__(self, root: Path, keep_last: int = 3, *, names: CheckpointNames = CheckpointNames(),
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        if not isinstance(keep_last, int) or isinstance(keep_last, bool) or keep_last < 1:
            raise ValueError(f"keep_last must be an integer >= 1, got {keep_last!r}")
        if max_shard_bytes <= 0 or chunk_bytes <= 0:
            raise ValueError("max_shard_bytes and chunk_bytes must be positive")
        self.root = Path(root)
        self.keep_last = keep_last
        self.names = names
        self.max_shard_bytes = int(max_shard_bytes)
        self.chunk_bytes = int(chunk_bytes)
        self._thread_lock = threading.Lock()
        # Test seam: called with a phase name at each step of a save (lets tests kill mid-save).
        self._on_phase: Callable[[str], None] | None = None
        self._clean_leftovers_if_idle()

    # -- public API --------------------------------------------------------------------------

    @property
    def saving(self) -> bool:
        """True while a save runs in this process."""
        return self._thread_lock.locked()

    def check_writable(self) -> None:
        """Raise CheckpointError now if checkpoints cannot be written under root."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f"{TMP_PREFIX}probe-{uuid.uuid4().hex[:8]}"
            fd = os.open(probe, NEW_FILE, 0o644)
            os.close(fd)
            probe.unlink(missing_ok=True)
        except OSError as exc:
            raise CheckpointError(f"cannot write checkpoints under {self.root}: {describe_os_error(exc)}") from exc

    def save(self, tensors: Iterable[tuple[str, torch.Tensor]], specs: Sequence[TensorSpec] | None = None, *,
             base_model_dir: Path, trainer_state: Mapping[str, Any],
             optimizer_state: Mapping[str, Any] | None = None,
             extra_metadata: Mapping[str, Any] | None = None, base_model: str | None = None,
             on_snapshot: Callable[[], None] | None = None, unhealthy_reason: str | None = None) -> CheckpointInfo:
        """Write a checkpoint and make it `latest`, prune old ones; return its info once durable.

        tensors: (hf_name, tensor) pairs, or a name -> tensor mapping, in the order of `specs`
          (views of live weights, on any device; each is copied out in bounded chunks as it
          arrives). Without `specs`, tensors must be a collection (e.g. a list of views), not a
          one-shot iterator, and the specs are read from it. Written under the names `names`
          gives them, followed by the base model's tensors that `names` carries.
        trainer_state: JSON-serializable, needs an int `step`; `weight_version` (default: step)
          and `tokens_trained` (default 0) are recorded in the metadata.
        optimizer_state: tensors/numbers/containers, saved with torch.save; must load with
          torch.load(weights_only=True) (checked before the checkpoint is committed).
        base_model_dir: model directory whose non-weight files (config, tokenizer, chat template,
          generation config, ...) are copied, and whose safetensors hold the carried tensors; if it
          is itself a checkpoint, its recorded base model is kept, and that directory is never
          pruned by this save. `base_model` overrides the recorded name (e.g. a Hugging Face id).
        on_snapshot: called once every tensor and the optimizer state have been written (not yet
          fsynced): the caller may resume training from then on.
        unhealthy_reason: the caller's verdict that the weights are not healthy (e.g. a diverging
          loss). With it, or if a tensor holds NaN/inf (checked as it streams), the checkpoint is
          kept as `unhealthy-step-...` (replacing the previous unhealthy one), `latest` is left
          alone and the info returned has `healthy=False`.

        Raises CheckpointBusy if a save is running, CheckpointError otherwise; nothing partial is
        left behind and the previous checkpoint stays `latest`.
        """
        started = time.monotonic()
        step, weight_version, tokens = self._check_trainer_state(trainer_state)
        base_dir = Path(base_model_dir)
        if not (base_dir / "config.json").is_file():
            raise CheckpointError(f"base model directory {base_dir} has no config.json to copy")
        trainer_json = trainer_state_json(trainer_state, "trainer_state")
        trainer_state_json(extra_metadata or {}, "extra_metadata")
        if isinstance(tensors, Mapping):
            tensors = list(tensors.items())
        if specs is None:
            tensors = list(tensors)  # (name, view) pairs: metadata only, no tensor data copied
            specs = specs_of(tensors)
        tensors, specs = self._checkpoint_tensors(tensors, specs, base_dir)
        recorded_base = base_model or base_model_of(base_dir)

        with self._exclusive():
            self._remove_leftovers()
            tmp = self.root / f"{TMP_PREFIX}{step_dir_name(step)}-{uuid.uuid4().hex[:8]}"
            try:
                os.mkdir(tmp, 0o755)
                os.mkdir(tmp / META_DIR, 0o755)
                files = copy_base_files(base_dir, tmp)
                self._phase("base_files")
                if optimizer_state is not None:
                    files[f"{META_DIR}/{OPTIMIZER_FILE}"] = write_optimizer_state(optimizer_state, tmp)
                files[f"{META_DIR}/{TRAINER_STATE_FILE}"] = write_bytes(
                    tmp / META_DIR / TRAINER_STATE_FILE, trainer_json.encode())
                self._phase("optimizer")
                scan = FiniteScan(tensors)
                with SafetensorsStreamWriter(tmp, specs, max_shard_bytes=self.max_shard_bytes,
                                             chunk_bytes=self.chunk_bytes) as writer:
                    weights = writer.write_all(scan)
                reasons = [r for r in (unhealthy_reason, scan.reason()) if r]
                self._phase("weights")
                if on_snapshot is not None:
                    on_snapshot()
                for f in weights.files + ((weights.index,) if weights.index else ()):
                    files[f.name] = (f.size, f.sha256)
                size_bytes = sum(size for size, _ in files.values())
                meta = {
                    "format": FORMAT, "version": FORMAT_VERSION, "step": step,
                    "weight_version": weight_version, "tokens_trained": tokens, "base_model": recorded_base,
                    "time": utc_timestamp("milliseconds"), "seconds": round(time.monotonic() - started, 3),
                    "content_hash": weights.content_hash, "size_bytes": size_bytes,
                    "weights": {"files": [f.name for f in weights.files],
                                "index": weights.index.name if weights.index else None,
                                "tensor_bytes": weights.tensor_bytes, "num_tensors": weights.num_tensors},
                    "files": {rel: {"size": size, "sha256": sha} for rel, (size, sha) in sorted(files.items())},
                    "extra": dict(extra_metadata or {}),
                    "health": {"healthy": not reasons, "reasons": reasons},
                }
                write_bytes(tmp / META_DIR / META_FILE, json.dumps(meta, indent=2).encode())
                fsync_tree(tmp)
                self._phase("synced")
                final = self._free_name(step) if not reasons else self._unhealthy_name(step)
                os.rename(tmp, final)
                fsync_path(self.root)
                self._phase("renamed")
            except BaseException as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: as they are
                    raise
                raise self._failure(step, exc) from exc
            info = CheckpointInfo(path=final, step=step, weight_version=weight_version, time=meta["time"],
                                  size_bytes=size_bytes, seconds=time.monotonic() - started,
                                  content_hash=weights.content_hash, tokens_trained=tokens,
                                  base_model=recorded_base, healthy=not reasons,
                                  unhealthy_reason="; ".join(reasons) or None)
            if reasons:
                log.warning("checkpoint of step %d is unhealthy (%s): kept as %s, not promoted", step,
                            info.unhealthy_reason, final)
                for older in self._unhealthy_dirs():
                    if older != final:
                        self._discard(older)
                return info

            try:
                atomic_write_text(self.root / LATEST_FILE, final.name + "\n")
            except BaseException as exc:
                # Not committed: drop the new directory so it can't shadow the previous latest.
                self._discard(final)
                if not isinstance(exc, Exception):
                    raise
                raise self._failure(step, exc) from exc
            self._phase("committed")
            self._prune(final, base_dir)
        return info

    def latest(self, *, verify_hash: bool = False) -> CheckpointInfo | None:
        """The checkpoint `latest` names, validated; if it is corrupt or partial, warn and return
        the newest other valid checkpoint; None if there is none."""
        target, problem = self._read_pointer()
        if target is not None:
            try:
                return validate_checkpoint(target, verify_hash=verify_hash)
            except CheckpointError as exc:
                problem = f"latest checkpoint {target.name} is unusable: {exc}"
        others = [p for p in self._step_dirs() if target is None or p.name != target.name]
        for candidate in reversed(others):
            try:
                info = validate_checkpoint(candidate, verify_hash=verify_hash)
            except CheckpointError as exc:
                log.warning("skipping checkpoint %s: %s", candidate, exc)
                continue
            if problem:
                log.warning("%s; falling back to %s", problem, candidate)
            return info
        if problem:
            log.warning("%s; no other valid checkpoint under %s", problem, self.root)
        return None

    def checkpoints(self, *, verify_hash: bool = False) -> list[CheckpointInfo]:
        """Every valid checkpoint under root, oldest first (invalid ones are skipped silently)."""
        out = []
        for path in self._step_dirs():
            with contextlib.suppress(CheckpointError):
                out.append(validate_checkpoint(path, verify_hash=verify_hash))
        return out

    def validate(self, path: Path, *, verify_hash: bool = False) -> CheckpointInfo:
        return validate_checkpoint(Path(path), verify_hash=verify_hash)

    load_training_state = staticmethod(load_training_state)

    def set_aside(self, name: str) -> Path | None:
        """Move every checkpoint, `latest` and any unhealthy one into ROOT/`name`/ (nothing is deleted);
        the store is empty afterwards. Returns that directory, or None if there was nothing to move."""
        with self._exclusive():
            self._remove_leftovers()
            entries = [p for p in self.root.iterdir()
                       if p.name == LATEST_FILE or STEP_DIR_RE.match(p.name) or p.name.startswith(UNHEALTHY_PREFIX)]
            if not entries:
                return None
            dest = self.root / name
            try:
                os.mkdir(dest, 0o755)
                # `latest` first: interrupted half way, the store still resumes only from what is left.
                for entry in sorted(entries, key=lambda p: p.name != LATEST_FILE):
                    os.rename(entry, dest / entry.name)
                fsync_path(dest)
                fsync_path(self.root)
            except OSError as exc:
                raise CheckpointError(f"cannot move the checkpoints under {self.root} into {dest}: "
                                      f"{describe_os_error(exc)}") from exc
            return dest

    # -- saving internals --------------------------------------------------------------------

    def _phase(self, name: str) -> None:
        if self._on_phase is not None:
            self._on_phase(name)

    @staticmethod
    def _check_trainer_state(state: Mapping[str, Any]) -> tuple[int, int, int]:
        if not isinstance(state, Mapping):
            raise CheckpointError(f"trainer_state must be a mapping, got {type(state).__name__}")
        values = []
        for key, default in (("step", None), ("weight_version", state.get("step")), ("tokens_trained", 0)):
            value = state.get(key, default)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise CheckpointError(f"trainer_state[{key!r}] must be an integer >= 0, got {value!r}")
            values.append(value)
        return values[0], values[1], values[2]

    def _checkpoint_tensors(self, tensors: Iterable[tuple[str, torch.Tensor]], specs: Sequence[TensorSpec],
                            base_dir: Path) -> tuple[Iterator[tuple[str, torch.Tensor]], list[TensorSpec]]:
        """The given tensors under the checkpoint's names, then the base tensors `names` carries."""
        specs = self.names.specs(specs)
        if not self.names.carried:
            return self.names.tensors(tensors), specs
        base = BaseWeights.of(base_dir)
        carried = base.specs(self.names.carried, exclude={s.name for s in specs})
        if not base.names():
            log.warning("%s has no safetensors weights: the checkpoint holds the trained model only, none of "
                        "the tensors under %s", base_dir, ", ".join(self.names.carried))
        return itertools.chain(self.names.tensors(tensors), base.tensors(carried)), specs + carried

    def _unhealthy_name(self, step: int) -> Path:
        path = self.root / f"{UNHEALTHY_PREFIX}{step_dir_name(step)}"
        if os.path.lexists(path):  # the same step refused again: the new one replaces it
            self._discard(path)
        return path

    def _free_name(self, step: int) -> Path:
        suffix = 0
        while os.path.lexists(self.root / step_dir_name(step, suffix)):
            suffix += 1
        return self.root / step_dir_name(step, suffix)

    def _failure(self, step: int, exc: Exception) -> CheckpointError:
        if isinstance(exc, OSError):
            reason = describe_os_error(exc)
        elif isinstance(exc, CheckpointError):
            reason = str(exc)
        else:
            reason = f"{type(exc).__name__}: {exc}"
        target, _ = self._read_pointer()
        kept = f"; {target.name} is still the latest checkpoint" if target else ""
        return CheckpointError(f"checkpoint of step {step} under {self.root} failed: {reason}{kept}")

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        if not self._thread_lock.acquire(blocking=False):
            raise CheckpointBusy(f"a checkpoint is already being written to {self.root}")
        fd = -1
        try:
            try:
                if not self.root.is_dir():
                    self.root.mkdir(parents=True, exist_ok=True)
                    fsync_path(self.root.parent)  # the new root's own name must survive a crash too
                fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as exc:
                raise CheckpointError(f"cannot write checkpoints under {self.root}: {describe_os_error(exc)}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise CheckpointBusy(f"another process is writing a checkpoint to {self.root}") from None
                raise CheckpointError(f"cannot lock {self.root / LOCK_FILE}: {describe_os_error(exc)}") from exc
            yield
        finally:
            if fd >= 0:
                os.close(fd)  # releases the flock
            self._thread_lock.release()

    # -- directory maintenance ---------------------------------------------------------------

    def _step_dirs(self) -> list[Path]:
        """Checkpoint directories (complete or not), oldest first."""
        try:
            entries = [p for p in self.root.iterdir() if STEP_DIR_RE.match(p.name) and p.is_dir()]
        except OSError:
            return []
        return sorted(entries, key=sort_key)

    def _unhealthy_dirs(self) -> list[Path]:
        try:
            return [p for p in self.root.iterdir() if p.name.startswith(UNHEALTHY_PREFIX) and p.is_dir()]
        except OSError:
            return []

    def _read_pointer(self) -> tuple[Path | None, str]:
        """(directory `latest` names, or None; why there is none when one was expected)."""
        try:
            name = (self.root / LATEST_FILE).read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None, ("no 'latest' pointer" if self._step_dirs() else "")
        except (OSError, UnicodeDecodeError) as exc:
            return None, f"unreadable 'latest' pointer: {exc}"
        if not STEP_DIR_RE.match(name):
            return None, f"'latest' pointer holds {name[:80]!r}, not a checkpoint name"
        return self.root / name, ""

    def _remove_leftovers(self) -> None:
        """Delete temp and trash entries of interrupted saves (caller holds the lock)."""
        try:
            entries = list(self.root.iterdir())
        except OSError:
            return
        for entry in entries:
            if entry.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
                log.info("removing leftover %s from an interrupted checkpoint", entry)
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        entry.unlink()

    def _clean_leftovers_if_idle(self) -> None:
        """On open: clean leftovers unless a save is running elsewhere (never fails)."""
        if not self.root.is_dir() or not os.access(self.root, os.W_OK):
            return
        with contextlib.suppress(CheckpointError):
            with self._exclusive():
                self._remove_leftovers()

    def _discard(self, path: Path) -> None:
        """Remove a checkpoint directory: rename first, so a half-deleted one never looks like
        a (corrupt) checkpoint."""
        trash = self.root / f"{TRASH_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, trash)
        except OSError as exc:
            log.warning("could not remove checkpoint %s: %s", path, describe_os_error(exc))
            return
        shutil.rmtree(trash, ignore_errors=True)

    def _prune(self, latest: Path, base_dir: Path) -> None:
        """Keep the newest keep_last, `latest`, and the base dir of this save: a server resumed
        from a checkpoint serves that directory and copies its config into every later save."""
        dirs = self._step_dirs()
        keep = {p.name for p in dirs[-self.keep_last:]} | {latest.name}
        with contextlib.suppress(OSError):
            if base_dir.resolve().parent == self.root.resolve():
                keep.add(base_dir.resolve().name)
        for path in dirs:
            if path.name not in keep:
                log.info("pruning old checkpoint %s (keep_last=%d)", path, self.keep_last)
                self._discard(path)
        with contextlib.suppress(OSError):
            fsync_path(self.root)


__all__ = ["CheckpointStore", "CheckpointInfo", "CheckpointError", "CheckpointBusy"]
