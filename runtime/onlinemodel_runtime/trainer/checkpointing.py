"""Checkpoints, the part of ``TrainerService`` (``service.py``) that writes and resumes them: at start the
latest checkpoint's optimizer state and counters, periodic checkpoints by steps or time, ``POST
/checkpoint``'s consistent snapshot (``_weights_lock`` held only while the weights are copied out), and
the refusal to promote unhealthy weights (``loss_health.py``, ``checkpoint/health.py``).

A mixin of the service's own class, as ``rollbacks.py``: these methods change its counters, locks and
components exactly as its other methods do, and live here only to keep each file about one thing.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from onlinemodel_protocol.api import CheckpointRecord
from onlinemodel_protocol.rpc import Counters
from onlinemodel_runtime.optim.hyperparams import load_keeping_rounding
from onlinemodel_runtime.trainer.errors import TrainerError

log = logging.getLogger(__name__)


def checkpoint_record(info) -> CheckpointRecord:
    """The API's view of a checkpoint.CheckpointInfo."""
    return CheckpointRecord(path=str(info.path), step=info.step, weight_version=info.weight_version,
                            time=info.time, size_bytes=info.size_bytes, seconds=round(info.seconds, 3),
                            content_hash=info.content_hash, healthy=info.healthy,
                            unhealthy_reason=info.unhealthy_reason)


class Checkpointing:
    """Needs the service's ``cfg``, ``store``, ``model``, ``optimizer``, ``tp``, ``loss_health``, counters
    (``state_dict`` / ``load_state_dict``, ``steps``, ``weight_version``), ``_weights_lock``,
    ``_checkpoint_lock``, ``_hold_weights`` and ``_optimizer_misfit`` (rollbacks.py)."""

    def restore(self, counters: Counters | None = None) -> None:
        """At start: optimizer state and counters from the store's latest checkpoint if vLLM serves its
        weights; then `counters` (the supervisor's, after a restart) if the live weights are ahead of it;
        then whether checkpoints can be written at all."""
        from onlinemodel_runtime.checkpoint import CheckpointError

        if self.store is not None:
            self._restore_checkpoint()
        if counters is not None and counters.weight_version > self.weight_version:
            # The live weights carry steps that the last checkpoint does not.
            self.load_state_dict({**counters.model_dump(), "step": counters.steps})
            self._checkpoint_version = -1
        if self.store is not None:
            try:
                self.store.check_writable()
            except CheckpointError as exc:
                # Serving and training go on; every checkpoint attempt reports this until it is fixed.
                log.error("%s", exc)
                self.checkpoint_state = "failed"
                self.checkpoint_error = str(exc)

    def _restore_checkpoint(self) -> None:
        from onlinemodel_runtime.checkpoint import CheckpointError

        info = self.store.latest()
        if info is None:
            return
        if Path(self.cfg.model).resolve() != info.path.resolve():
            log.warning("checkpoint %s exists but vLLM serves %s: not restoring optimizer state",
                        info.path, self.cfg.model)
            return
        device = next(self.model.parameters()).device
        try:
            optimizer_state, trainer_state = self.store.load_training_state(info, map_location=device)
        except CheckpointError as exc:
            log.warning("cannot read training state of %s (%s): starting with fresh optimizer state", info.path, exc)
            return
        problem = self._optimizer_misfit(optimizer_state)
        if problem:
            log.warning("%s: starting the optimizer state fresh", problem)
        elif optimizer_state is not None:
            try:
                if self.tp is not None:  # each rank takes its part of the TP=1 form
                    self.tp.load_optimizer_state(info.path)
                else:
                    load_keeping_rounding(self.optimizer, optimizer_state)
            except (ValueError, KeyError, RuntimeError) as exc:
                log.warning("optimizer state of %s does not fit this model (%s): starting it fresh", info.path, exc)
        self.load_state_dict(trainer_state)
        self.last_checkpoint = checkpoint_record(info)
        log.info("resumed from %s: step %d, weight version %d", info.path, self.steps, self.weight_version)

    def _maybe_periodic_checkpoint(self) -> None:
        by_steps = self.cfg.checkpoint_every_steps and self.steps % self.cfg.checkpoint_every_steps == 0
        if by_steps or self.checkpoint_due_by_time():
            self.periodic_checkpoint()

    def checkpoint_due_by_time(self) -> bool:
        return bool(self.cfg.checkpoint_every_seconds
                    and time.monotonic() - self._last_checkpoint_monotonic >= self.cfg.checkpoint_every_seconds)

    def _unhealthy_again(self) -> bool:
        """The weights are those of the last checkpoint refused as unhealthy."""
        return self.last_unhealthy is not None and self.weight_version == self.last_unhealthy.weight_version

    def periodic_checkpoint(self) -> None:
        """A checkpoint if the weights changed since the last one; failures are logged, not raised."""
        if self.store is None or self.weight_version == self._checkpoint_version or self._unhealthy_again():
            return
        try:
            self.checkpoint()
        except TrainerError as exc:
            log.error("periodic checkpoint failed: %s", exc)
            # Retry after a full interval, not at once: a full disk stays full.
            self._last_checkpoint_monotonic = time.monotonic()

    def checkpoint(self) -> CheckpointRecord:
        """Write a checkpoint now (blocking). Training pauses only while the weights are copied out."""
        from onlinemodel_runtime.checkpoint import CheckpointBusy, CheckpointError, hf_weight_tensors

        if self.store is None:
            raise TrainerError("no checkpoint directory configured (--checkpoint-dir)", code=409)
        if self._unhealthy_again():
            raise self._unhealthy_error(self.last_unhealthy)
        if self.last_checkpoint is not None and self.weight_version == self._checkpoint_version:
            return self.last_checkpoint  # nothing changed since: the last one is the answer
        if not self._checkpoint_lock.acquire(blocking=False):
            raise TrainerError("a checkpoint is already being written", code=409)
        self.checkpoint_state = "running"
        released = threading.Event()

        def resume_training() -> None:
            if not released.is_set():
                released.set()
                self._weights_lock.release()

        try:
            self._hold_weights()
            counters = self.state_dict()
            save = dict(base_model_dir=Path(self.cfg.model), base_model=self.cfg.base_model, trainer_state=counters,
                        on_snapshot=resume_training, unhealthy_reason=self.loss_health.verdict())
            if self.tp is not None:  # every rank's shard gathered into the one HF directory
                info = self.tp.save_checkpoint(self.store, **save)
            else:
                info = self.store.save(hf_weight_tensors(self.model), optimizer_state=self.optimizer.state_dict(),
                                       **save)
        except CheckpointBusy as exc:
            self.checkpoint_state = "idle"
            raise TrainerError(str(exc), code=409) from exc
        except Exception as exc:  # CheckpointError, OSError, or anything the snapshot raised
            self.checkpoint_state = "failed"
            self.checkpoint_error = str(exc) if isinstance(exc, (CheckpointError, OSError)) else \
                f"{type(exc).__name__}: {exc}"
            raise TrainerError(f"checkpoint failed: {self.checkpoint_error}", code=500) from exc
        finally:
            resume_training()
            self._checkpoint_lock.release()
        self.checkpoint_state = "idle"
        self.checkpoint_error = None
        self._last_checkpoint_monotonic = time.monotonic()
        if not info.healthy:
            self.last_unhealthy = checkpoint_record(info)
            log.error("checkpoint %s is unhealthy (%s): not promoted to latest", info.path, info.unhealthy_reason)
            raise self._unhealthy_error(self.last_unhealthy)
        self.last_checkpoint = checkpoint_record(info)
        self._checkpoint_version = counters["weight_version"]
        log.info("checkpoint %s at step %d (%.2fs)", info.path, info.step, info.seconds)
        return self.last_checkpoint

    def _unhealthy_error(self, record: CheckpointRecord) -> TrainerError:
        kept = f"; latest is still {self.last_checkpoint.path}" if self.last_checkpoint else ""
        return TrainerError(f"the weights at step {record.step} are unhealthy ({record.unhealthy_reason}): "
                            f"checkpoint kept aside as {record.path}, not promoted{kept}", code=422)
