"""Rollbacks, the part of ``TrainerService`` (``service.py``) that undoes weights: the guard's verdict on a
job and its rollback, and ``POST /rollback``'s restore of a checkpoint (docs/guard.md).

A mixin of the service's own class: these methods change its counters, locks and components exactly as its
other methods do, and live here only to keep each file about one thing.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from onlinemodel_protocol.api import Job, RollbackRecord, utc_timestamp
from onlinemodel_runtime.optim.hyperparams import load_keeping_rounding
from onlinemodel_runtime.trainer.errors import JobRolledBack, TrainerError
from onlinemodel_runtime.trainer.served_answers import ServedAnswerError

log = logging.getLogger(__name__)


class Rollbacks:
    """Needs the service's ``cfg``, ``guard``, ``store``, ``model``, ``optimizer``, ``loss_health``,
    ``weight_version``, ``_weights_lock``, ``_job_lock``, ``_checkpoint_version`` and ``periodic_checkpoint``."""

    def _optimizer_misfit(self, optimizer_state: dict[str, Any] | None) -> str | None:
        if optimizer_state is None:
            return None
        saved = [g.get("rank") for g in optimizer_state.get("param_groups", [])]
        ranks = [g["rank"] for g in self.optimizer.param_groups]
        if None not in saved and saved != ranks:
            return f"the checkpoint's optimizer state has ranks {saved}, the configured ones are {ranks}"
        return None

    def _guard_check(self, job: Job, health_before: dict[str, Any], checkpoint_before: int) -> None:
        """Evaluate the guard on the weights now; if the job made anything regress, undo it and raise
        JobRolledBack. The restored weights are a new weight_version (vLLM's prefix cache follows)."""
        with self._weights_lock:
            try:
                verdict = self.guard.check(self.weight_version)
            except ServedAnswerError as exc:  # unjudged weights are not kept
                regressed, reason = [], f"the guard could not evaluate the weights after {job.steps} steps: {exc}"
            else:
                job.guard = verdict
                if verdict.passed:
                    return
                regressed = verdict.regressed
                reason = f"the guard found regressions after {job.steps} steps: {', '.join(regressed)}"
            seconds = self.guard.undo(self.weight_version + 1)
            self.weight_version += 1
            self.loss_health.load_state_dict(health_before)
            self.guard.record(RollbackRecord(time=utc_timestamp(), source="guard", weight_version=self.weight_version,
                                             job_id=job.id, regressed=regressed, reason=reason,
                                             seconds=round(seconds, 4)))
            job.error = reason
        log.warning("job %s rolled back: %s", job.id, reason)
        if self._checkpoint_version != checkpoint_before:
            # A checkpoint taken during the job holds what was undone: a restart must not resume from it.
            self.periodic_checkpoint()
        raise JobRolledBack

    def rollback_to(self, to: int | str) -> RollbackRecord:
        """Restore a checkpoint's weights and optimizer state into the live model (``POST /rollback``), then
        checkpoint them so that a restart resumes from them. 409 while a job runs."""
        from onlinemodel_runtime.checkpoint import (CheckpointError, CheckpointNotFound, CheckpointUnusable,
                                                    find_checkpoint, load_weights_into)

        self._single_rank_only("rolling back")
        if self.store is None:
            raise TrainerError("no checkpoint directory configured (--checkpoint-dir): nothing to roll back to",
                               code=409)
        try:
            info = find_checkpoint(self.store, to)
        except CheckpointNotFound as exc:
            raise TrainerError(str(exc), code=404) from None
        except CheckpointError as exc:  # CheckpointUnusable, or unreadable
            raise TrainerError(str(exc), code=422) from None
        device = next(self.model.parameters()).device
        try:
            optimizer_state, trainer_state = self.store.load_training_state(info, map_location=device)
        except CheckpointError as exc:
            raise TrainerError(str(exc), code=422) from None
        problem = self._optimizer_misfit(optimizer_state)
        if problem:
            raise TrainerError(f"cannot restore {info.path.name}: {problem}", code=422)
        if not self._job_lock.acquire(blocking=False):
            raise TrainerError("a training job is running: cancel it (DELETE /train/jobs/{id}) and retry", code=409)
        try:
            with self._weights_lock:
                started = time.perf_counter()
                try:
                    load_weights_into(self.model, info.path, self.store.names)
                except CheckpointUnusable as exc:
                    raise TrainerError(str(exc), code=422) from None
                except CheckpointError as exc:  # names and shapes are checked before anything is written
                    raise TrainerError(f"{info.path.name} does not fit the served model: {exc}", code=422) from None
                except Exception:
                    self.weight_version += 1  # part of it may be written: caches and checkpoints must follow
                    raise
                self.weight_version += 1
                if optimizer_state is not None:
                    load_keeping_rounding(self.optimizer, optimizer_state)
                self.loss_health.load_state_dict(trainer_state.get("loss_health", {}))
                record = RollbackRecord(time=utc_timestamp(), source="request", weight_version=self.weight_version,
                                        checkpoint=info.path.name, step=info.step,
                                        reason=f"POST /rollback to {to!r}",
                                        seconds=round(time.perf_counter() - started, 4))
                self.guard.record(record)
        finally:
            self._job_lock.release()
        log.warning("rolled back to checkpoint %s (step %d) in %.2fs", info.path, info.step, record.seconds)
        self.periodic_checkpoint()
        return record

