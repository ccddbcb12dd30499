"""The trainer's state machine: a job queue, counters, and consistent checkpoints.

One training thread consumes jobs; the ZMQ server answers status and checkpoint requests from the event
loop meanwhile. ``_weights_lock`` is held for each optimizer step and while a checkpoint snapshots the
weights, so a checkpoint never sees half a step.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from onlinemodel_runtime.config import RuntimeConfig
from onlinemodel_runtime.trainer.loop import train_step

log = logging.getLogger(__name__)

RECENT_JOBS = 20


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class TrainerError(RuntimeError):
    def __init__(self, message: str, code: int = 500):
        super().__init__(message)
        self.code = code


class TrainerService:
    def __init__(self, cfg: RuntimeConfig, model, optimizer, store=None):
        self.cfg = cfg
        self.model = model
        self.optimizer = optimizer
        self.store = store
        self.state = "idle"
        self.steps = 0
        self.tokens_trained = 0
        self.weight_version = 0
        self.last_loss: float | None = None
        self.last_step_time: str | None = None
        self.last_step_seconds: float | None = None
        self.skipped_steps = 0
        self.last_error: str | None = None
        self.jobs: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self.checkpoint_state = "idle"
        self.last_checkpoint: dict[str, Any] | None = None
        self.checkpoint_error: str | None = None
        self._checkpoint_version = 0
        self._last_checkpoint_monotonic = time.monotonic()
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._weights_lock = threading.Lock()
        self._checkpoint_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # -- counters that survive restarts ------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.steps,
            "tokens_trained": self.tokens_trained,
            "weight_version": self.weight_version,
            "skipped_steps": self.skipped_steps,
            "last_loss": self.last_loss,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state.get("step", 0))
        self.tokens_trained = int(state.get("tokens_trained", 0))
        self.weight_version = int(state.get("weight_version", self.steps))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.last_loss = state.get("last_loss")
        self._checkpoint_version = self.weight_version

    def adopt_counters(self, counters: dict[str, Any]) -> None:
        """After a trainer restart: the live weights carry steps that the last checkpoint does not."""
        self.load_state_dict({**counters, "step": counters.get("steps", 0)})
        self._checkpoint_version = -1  # those steps are in no checkpoint yet

    # -- requests ----------------------------------------------------------------------------
    def submit(self, request: dict[str, Any]) -> dict[str, Any]:
        examples = request["examples"]
        if not self.cfg.training_enabled:
            raise TrainerError("training is disabled for this model", code=409)
        if self._queue.qsize() >= self.cfg.max_queued_jobs:
            raise TrainerError(f"{self._queue.qsize()} jobs are already queued (limit {self.cfg.max_queued_jobs}); "
                               "retry when some have finished", code=429)
        job = {
            "id": f"job-{uuid.uuid4().hex[:12]}",
            "state": "queued",
            "examples": len(examples),
            "epochs": int(request.get("epochs") or self.cfg.default_epochs),
            "learning_rate": float(request.get("learning_rate") or self.cfg.learning_rate),
            "steps": 0,
            "last_loss": None,
            "error": None,
            "created_at": utc_now(),
            "finished_at": None,
        }
        self.jobs[job["id"]] = job
        while len(self.jobs) > RECENT_JOBS:
            oldest = next(iter(self.jobs))
            if self.jobs[oldest]["state"] in ("queued", "running"):
                break
            self.jobs.popitem(last=False)
        self._queue.put({"job": job, "examples": examples})
        return {"job_id": job["id"], "state": "queued", "examples": job["examples"]}

    def status(self) -> dict[str, Any]:
        # Jobs first: a job is marked finished after its last step is counted, so a snapshot that
        # shows it finished also shows the weight version it produced.
        jobs = [dict(j) for j in list(self.jobs.values())]
        return {
            "jobs": jobs,
            "state": self.state,
            "steps": self.steps,
            "tokens_trained": self.tokens_trained,
            "last_loss": self.last_loss,
            "weight_version": self.weight_version,
            "last_step_time": self.last_step_time,
            "last_step_seconds": self.last_step_seconds,
            "skipped_steps": self.skipped_steps,
            "queued_jobs": self._queue.qsize(),
            "last_error": self.last_error,
            "checkpoint": {
                "state": self.checkpoint_state,
                "last": self.last_checkpoint,
                "last_error": self.checkpoint_error,
                "dir": str(self.cfg.checkpoint_dir) if self.cfg.checkpoint_dir else None,
            },
            "optimizer": self.optimizer.summary(),
        }

    # -- training thread ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="onlinemodel-train", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            self._run_job(item["job"], item["examples"])

    def _run_job(self, job: dict[str, Any], examples: list[dict[str, Any]]) -> None:
        job["state"] = "running"
        self.state = "training"
        try:
            for _ in range(job["epochs"]):
                for ex in examples:
                    with self._weights_lock:
                        try:
                            result = train_step(self.model, self.optimizer, ex["input_ids"], ex["labels"],
                                                learning_rate=job["learning_rate"])
                        except Exception:
                            # Backward may have written some parameters before it failed (e.g. out of
                            # memory): treat the weights as changed so caches and checkpoints follow.
                            self.weight_version += 1
                            raise
                        # Counted under the lock: a checkpoint never pairs new weights with old counters.
                        self._record_step(job, result)
                    self._maybe_periodic_checkpoint()
            job["state"] = "succeeded"
        except Exception as exc:  # a failed job must not kill the trainer
            log.exception("training job %s failed", job["id"])
            job["state"] = "failed"
            job["error"] = f"{type(exc).__name__}: {exc}"
            self.last_error = job["error"]
        finally:
            job["finished_at"] = utc_now()
            self.state = "training" if self._queue.qsize() else "idle"

    def _record_step(self, job: dict[str, Any], result) -> None:
        job["steps"] += 1
        job["last_loss"] = result.loss
        self.last_loss = result.loss
        self.last_step_seconds = round(result.seconds, 4)
        self.last_step_time = utc_now()
        if result.applied:
            self.steps += 1
            self.tokens_trained += result.tokens
        else:
            self.skipped_steps += 1
            log.warning("step skipped: %s", result.skipped_reason)
        if result.applied or result.params_updated:
            self.weight_version += 1

    def debug_scale(self, name: str, factor: float) -> dict[str, Any]:
        """Scale one HF parameter in place (tests: proves the views are vLLM's memory)."""
        from onlinemodel_runtime.trainer.debug import scale_parameter

        with self._weights_lock:
            scale_parameter(self.model, name, factor)
            self.weight_version += 1
        return {"weight_version": self.weight_version}

    # -- checkpoints -------------------------------------------------------------------------
    def _maybe_periodic_checkpoint(self) -> None:
        by_steps = self.cfg.checkpoint_every_steps and self.steps % self.cfg.checkpoint_every_steps == 0
        if by_steps or self.checkpoint_due_by_time():
            self.periodic_checkpoint()

    def checkpoint_due_by_time(self) -> bool:
        return bool(self.cfg.checkpoint_every_seconds
                    and time.monotonic() - self._last_checkpoint_monotonic >= self.cfg.checkpoint_every_seconds)

    def periodic_checkpoint(self) -> None:
        """A checkpoint if the weights changed since the last one; failures are logged, not raised."""
        if self.store is None or self.weight_version == self._checkpoint_version:
            return
        try:
            self.checkpoint()
        except TrainerError as exc:
            log.error("periodic checkpoint failed: %s", exc)
            # Retry after a full interval, not at once: a full disk stays full.
            self._last_checkpoint_monotonic = time.monotonic()

    def checkpoint(self) -> dict[str, Any]:
        """Write a checkpoint now (blocking). Training pauses only while the weights are copied out."""
        from onlinemodel_runtime.checkpoint import CheckpointBusy, CheckpointError, hf_weight_tensors

        if self.store is None:
            raise TrainerError("no checkpoint directory configured (--checkpoint-dir)", code=409)
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
            self._weights_lock.acquire()
            counters = self.state_dict()
            info = self.store.save(
                hf_weight_tensors(self.model),
                base_model_dir=Path(self.cfg.model),
                base_model=self.cfg.base_model,
                trainer_state=counters,
                optimizer_state=self.optimizer.state_dict(),
                on_snapshot=resume_training,
            )
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
        self.last_checkpoint = info.to_status()
        self._checkpoint_version = counters["weight_version"]
        self._last_checkpoint_monotonic = time.monotonic()
        log.info("checkpoint %s at step %d (%.2fs)", info.path, info.step, info.seconds)
        return self.last_checkpoint
