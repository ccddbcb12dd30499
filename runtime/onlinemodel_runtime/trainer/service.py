"""The trainer's state machine: a job queue, counters, and consistent checkpoints.

(This class holds the weights lock and the job's state; checkpoints (checkpointing.py) and rollbacks
(rollbacks.py) are mixins of it, in their own files; guard.py, snapshot.py, early_stop.py, replay.py,
anchor.py, pacing.py and memory.py are components it owns.)

One training thread consumes jobs (``TrainJob`` of ``onlinemodel_protocol.rpc``, complete: the API server
resolved every default) and runs ``loop.train_step`` once per example and epoch; the ZMQ server
(``server.py``) answers status, cancel and checkpoint requests from the event loop meanwhile.
``_weights_lock`` is held for each optimizer step and while a checkpoint snapshots the weights, so a
checkpoint never sees half a step. A checkpoint is promoted to ``latest`` only when the weights are healthy
(``loss_health.py``, ``checkpoint/health.py``). With a guard file, every job is checked and undone if it
made a probe regress (``guard.py``); ``rollback_to`` restores a checkpoint in place. ``_job_lock`` is held
for a whole job, so a rollback never lands in the middle of one. Every answer is a model of
``onlinemodel_protocol.api``.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from onlinemodel_protocol.api import (FINISHED_JOB_STATES, AnchorStatus, CheckpointRecord, CheckpointStatus, Job,
                                      JobCounts, NullSpaceStatus, ReplayStatus, TrainAccepted, TrainStatus,
                                      job_eta_seconds, utc_timestamp)
from onlinemodel_protocol.config import RuntimeConfig
from onlinemodel_protocol.limits import (ANCHOR_PER_STEP, ANCHOR_TOP_K, NULL_SPACE_MAX_BYTES, RECENT_JOBS,
                                         REPLAY_RESERVOIR_MAX_TOKENS)
from onlinemodel_protocol.replication import Snapshot
from onlinemodel_protocol.rpc import EncodedExample, TrainJob
from onlinemodel_runtime.trainer.anchor import AnchorTerm
from onlinemodel_runtime.trainer.null_space import NullSpace
from onlinemodel_runtime.trainer.early_stop import answer_predicted, job_schedule
from onlinemodel_runtime.trainer.errors import JobRolledBack, TrainerError
from onlinemodel_runtime.trainer.guard import Guard, ProbeSet
from onlinemodel_runtime.trainer.job_queue import JobQueue
from onlinemodel_runtime.trainer.loop import StepResult, train_step
from onlinemodel_runtime.trainer.loss_health import LossHealth
from onlinemodel_runtime.trainer.memory import MemoryMonitor
from onlinemodel_runtime.trainer.replay import ReplayReservoir
from onlinemodel_runtime.trainer.checkpointing import Checkpointing
from onlinemodel_runtime.trainer.rollbacks import Rollbacks

log = logging.getLogger(__name__)


class _Cancelled(Exception):
    """Raised in the training thread between steps of a job whose cancel was requested."""


class TrainerService(Checkpointing, Rollbacks):
    def __init__(self, cfg: RuntimeConfig, model, optimizer, store=None, pacer=None, probes: ProbeSet | None = None,
                 tp=None, anchors: list[EncodedExample] | None = None):
        self.cfg = cfg
        self.model = model
        self.optimizer = optimizer
        # trainer/tp_group.py's group when this is rank 0 of several: each step runs on every rank.
        self.tp = tp
        self.store = store
        self.pacer = pacer  # trainer/pacing.py, or None when there is no load signal
        self.memory = MemoryMonitor(next(model.parameters()).device)
        self.state = "idle"
        self.steps = 0
        self.tokens_trained = 0
        self.weight_version = 0
        self.last_loss: float | None = None
        self.last_step_time: str | None = None
        self.last_step_seconds: float | None = None
        self.skipped_steps = 0
        self.last_error: str | None = None
        self.jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self.job_counts = JobCounts()
        self.checkpoint_state = "idle"
        self.last_checkpoint: CheckpointRecord | None = None
        self.last_unhealthy: CheckpointRecord | None = None
        self.checkpoint_error: str | None = None
        # The whole vocabulary: a tensor-parallel rank's model config holds its rows only.
        vocab = tp.layout.layout.sizes["vocab"] if tp is not None else \
            getattr(model.config.get_text_config(), "vocab_size", None)
        self.loss_health = LossHealth(vocab)
        self.guard = Guard(probes, model, optimizer)
        self.replay = ReplayReservoir(cfg.replay_reservoir, REPLAY_RESERVOIR_MAX_TOKENS)
        # `anchors`: the encoded conversations (trainer/anchor.py, encode_anchors); needed when the weight is not 0.
        # Its record and KL read the whole vocabulary's logits, which no tensor-parallel rank holds: off
        # under TP (weight 0 in the status; docs/tensor-parallel.md).
        if tp is not None and cfg.anchor_weight:
            log.warning("the anchor term is off under tensor parallelism (--anchor-weight %g ignored)",
                        cfg.anchor_weight)
        anchors = anchors or []
        from_file = min(len(cfg.anchor_file.conversations), len(anchors)) if cfg.anchor_file is not None else 0
        self.anchor = AnchorTerm(anchors, cfg.anchor_weight if tp is None else 0.0, ANCHOR_PER_STEP, ANCHOR_TOP_K,
                                 from_file=from_file)
        # Its bases are built on the same conversations, at the first job; off under tensor parallelism too (a
        # rank holds a shard of each matrix's inputs).
        if tp is not None and cfg.null_space_energy:
            log.warning("the null-space projection is off under tensor parallelism (--null-space-energy %g ignored)",
                        cfg.null_space_energy)
        self.null_space = NullSpace(anchors, cfg.null_space_energy if tp is None else 0.0, NULL_SPACE_MAX_BYTES,
                                    optimizer=optimizer)
        self._checkpoint_version = 0
        self._last_checkpoint_monotonic = time.monotonic()
        self._queue = JobQueue()
        self._cancel_requested: set[str] = set()
        self._job_started: dict[str, float] = {}  # running job id -> time.monotonic() at its start (ETA)
        self._weights_lock = threading.Lock()
        self._job_lock = threading.Lock()
        # Set while a checkpoint or a publication waits for _weights_lock: the training thread, which would
        # otherwise take it back right after every step (locks are not fair), lets the snapshot go first.
        self._snapshot_waiting = threading.Event()
        self._checkpoint_lock = threading.Lock()
        self._publish_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # -- counters that survive restarts ------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.steps,
            "tokens_trained": self.tokens_trained,
            "weight_version": self.weight_version,
            "skipped_steps": self.skipped_steps,
            "last_loss": self.last_loss,
            "job_counts": self.job_counts.model_dump(),
            "loss_health": self.loss_health.state_dict(),
            "guard": self.guard.state_dict(),
            "replay": self.replay.state_dict(),
            "anchor": self.anchor.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state.get("step", 0))
        self.tokens_trained = int(state.get("tokens_trained", 0))
        self.weight_version = int(state.get("weight_version", self.steps))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.last_loss = state.get("last_loss")
        counts = JobCounts.model_validate(state.get("job_counts", {}))
        # Jobs submitted but never finished were queued or running in a process that is gone.
        lost = counts.submitted - counts.succeeded - counts.failed - counts.cancelled - counts.rolled_back
        self.job_counts = counts.model_copy(update={"failed": counts.failed + max(lost, 0)})
        if "loss_health" in state:
            self.loss_health.load_state_dict(state["loss_health"])
        self.guard.load_state_dict(state.get("guard", {}))
        if "replay" in state:
            self.replay.load_state_dict(state["replay"])
        if "anchor" in state:
            self.anchor.load_state_dict(state["anchor"])
        self._checkpoint_version = self.weight_version

    # -- requests ----------------------------------------------------------------------------
    def submit(self, request: TrainJob) -> TrainAccepted:
        if self._queue.qsize() >= self.cfg.max_queued_jobs:
            raise TrainerError(f"{self._queue.qsize()} jobs are already queued (limit {self.cfg.max_queued_jobs}); "
                               "retry when some have finished", code=429)
        if not request.guard and self.guard.enabled and not self.guard.probes.guard.allow_job_opt_out:
            raise TrainerError("this server's guard does not let a job opt out of it (allow_job_opt_out is false)",
                               code=403)
        job = Job(id=f"job-{uuid.uuid4().hex[:12]}", state="queued", examples=len(request.examples),
                  epochs=request.epochs, learning_rate=request.learning_rate, created_at=utc_timestamp(),
                  steps_total=len(request.examples) * request.epochs,
                  guarded=self.guard.enabled and request.guard)
        self.jobs[job.id] = job
        while len(self.jobs) > RECENT_JOBS:
            oldest = next(iter(self.jobs.values()))
            if oldest.state not in FINISHED_JOB_STATES:
                break
            self.jobs.popitem(last=False)
        self.job_counts.submitted += 1
        self._queue.put((job, request.examples))
        return TrainAccepted(job_id=job.id, state="queued", examples=job.examples,
                             tokens=sum(ex.num_tokens for ex in request.examples))

    def cancel(self, job_id: str) -> Job:
        """Cancel a job: a queued one leaves the queue now, a running one stops after its current step
        (the steps it took stay in the weights)."""
        job = self.jobs.get(job_id)
        if job is None:
            raise TrainerError(f"no job {job_id!r} (unknown, or older than the {RECENT_JOBS} most recent)", code=404)
        if job.state in FINISHED_JOB_STATES:
            raise TrainerError(f"job {job_id} already {job.state}", code=409)
        if self._queue.remove(job_id):
            self._finish(job, "cancelled")
        else:  # running, or just taken by the training thread: it checks before every step
            self._cancel_requested.add(job_id)
        return job.model_copy()

    def _finish(self, job: Job, state: str) -> None:
        job.state = state
        job.finished_at = utc_timestamp()
        self._cancel_requested.discard(job.id)
        self._job_started.pop(job.id, None)
        setattr(self.job_counts, state, getattr(self.job_counts, state) + 1)

    def status(self) -> TrainStatus:
        # Jobs first: a job is marked finished after its last step is counted, so a snapshot that
        # shows it finished also shows the weight version it produced.
        now = time.monotonic()
        jobs = [job.model_copy(update={"eta_seconds": job_eta_seconds(job, now - self._job_started.get(job.id, now))})
                for job in list(self.jobs.values())]
        return TrainStatus(
            jobs=jobs,
            state=self.state,
            steps=self.steps,
            tokens_trained=self.tokens_trained,
            last_loss=self.last_loss,
            weight_version=self.weight_version,
            last_step_time=self.last_step_time,
            last_step_seconds=self.last_step_seconds,
            skipped_steps=self.skipped_steps,
            queued_jobs=self._queue.qsize(),
            job_counts=self.job_counts.model_copy(),
            last_error=self.last_error,
            checkpoint=CheckpointStatus(
                state=self.checkpoint_state,
                last=self.last_checkpoint,
                last_unhealthy=self.last_unhealthy,
                last_error=self.checkpoint_error,
                dir=str(self.cfg.checkpoint_dir) if self.cfg.checkpoint_dir else None,
            ),
            optimizer=self.optimizer.summary(),
            scheduler=self.pacer.status() if self.pacer is not None else None,
            memory=self.memory.status(),
            guard=self.guard.status(),
            replay=ReplayStatus(**self.replay.summary()),
            anchor=AnchorStatus(**self.anchor.summary()),
            null_space=NullSpaceStatus(**self.null_space.summary()),
        )

    # -- training thread ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="onlinemodel-train", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        if self.tp is not None:
            self.tp.stop()  # after the step that may be running: the other ranks exit

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            self._run_job(*item)

    def _run_job(self, job: Job, examples: list[EncodedExample]) -> None:
        with self._job_lock:
            self._run_job_locked(job, examples)

    def _run_job_locked(self, job: Job, examples: list[EncodedExample]) -> None:
        job.state = "running"
        job.started_at = utc_timestamp()
        self._job_started[job.id] = time.monotonic()
        self.state = "training"
        outcome = "succeeded"
        health_before = self.loss_health.state_dict()
        checkpoint_before = self._checkpoint_version
        # docs/learning.md: earlier examples replayed, each example until learned (at most `epochs` passes).
        learned = self._learned if self.cfg.early_stop else None
        try:
            if job.guarded:
                with self._weights_lock:
                    self.guard.before_job(self.weight_version)
            if (self.anchor.enabled and not self.anchor.recorded) or (self.null_space.enabled
                                                                     and not self.null_space.ready):
                # Before the first step: the untouched weights. Restored from a checkpoint, only conversations
                # it has no record of (an edited anchor file): the trained weights as they are now. The
                # null-space bases come from the same forwards when the record runs them all, else their own.
                with self._weights_lock:
                    with self.null_space.gathering(self.model):
                        if self.anchor.enabled and not self.anchor.recorded:
                            self.anchor.record(self.model,
                                               untouched=self.steps == 0 and self.cfg.model == self.cfg.base_model)
                    self.null_space.build(self.model)
            replayed = self.replay.sample(self.cfg.replay_examples)
            # The most steps the job can take (early stop ends it sooner): progress and ETA count these.
            job.steps_total = (len(examples) + len(replayed)) * job.epochs
            for ex, is_replay in job_schedule(examples, replayed, job.epochs, learned):
                if job.id in self._cancel_requested:
                    raise _Cancelled
                while self._snapshot_waiting.is_set():
                    time.sleep(0.001)
                with self._weights_lock:
                    try:
                        if self.tp is not None:  # the anchor term is off under tensor parallelism
                            result = self.tp.train_step(ex.input_ids, ex.labels, learning_rate=job.learning_rate,
                                                        pacer=self.pacer, memory=self.memory)
                        else:
                            result = train_step(self.model, self.optimizer, ex.input_ids, ex.labels,
                                                learning_rate=job.learning_rate, pacer=self.pacer,
                                                memory=self.memory, anchor=self.anchor)
                    except Exception:
                        # Backward may have written some parameters before it failed (e.g. out of
                        # memory): treat the weights as changed so caches and checkpoints follow.
                        self.weight_version += 1
                        raise
                    # Counted under the lock: a checkpoint never pairs new weights with old counters.
                    self._record_step(job, result)
                    job.replay_steps += is_replay
                if job.guarded and self.guard.every_steps and job.steps % self.guard.every_steps == 0:
                    self._guard_check(job, health_before, checkpoint_before)
                self._maybe_periodic_checkpoint()
            if job.guarded:
                self._guard_check(job, health_before, checkpoint_before)
            for ex in examples:  # only a finished job the guard kept counts as taught
                self.replay.add(ex)
        except JobRolledBack:
            outcome = "rolled_back"
        except _Cancelled:
            outcome = "cancelled"
            log.info("training job %s cancelled after %d steps", job.id, job.steps)
            if job.guarded:  # the steps it took are served: they must not have regressed either
                try:
                    self._guard_check(job, health_before, checkpoint_before)
                except JobRolledBack:
                    outcome = "rolled_back"
        except Exception as exc:  # a failed job must not kill the trainer
            log.exception("training job %s failed", job.id)
            outcome = "failed"
            job.error = f"{type(exc).__name__}: {exc}"
            self.last_error = job.error
        finally:
            self._finish(job, outcome)
            self.state = "training" if self._queue.qsize() else "idle"

    def _learned(self, ex: EncodedExample) -> bool:
        if self.tp is not None:
            return self.tp.answer_predicted(ex.input_ids, ex.labels, self.cfg.early_stop_margin)
        return answer_predicted(self.model, ex.input_ids, ex.labels, self.cfg.early_stop_margin)

    def _single_rank_only(self, what: str) -> None:
        """Refuse what rank 0 cannot do alone on its shard yet (docs/tensor-parallel.md, "What is left")."""
        if self.tp is not None:
            raise TrainerError(f"{what} is not supported under tensor parallelism yet "
                               f"(tensor parallel size {self.tp.shard.tp_size})", code=409)

    def _record_step(self, job: Job, result: StepResult) -> None:
        job.steps += 1
        job.last_loss = result.loss
        self.last_loss = result.loss
        self.loss_health.observe(result.loss)
        self.last_step_seconds = round(result.seconds, 4)
        self.last_step_time = utc_timestamp()
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

        self._single_rank_only("scaling a parameter")
        with self._weights_lock:
            scale_parameter(self.model, name, factor)
            self.weight_version += 1
        return {"weight_version": self.weight_version}

    def _hold_weights(self) -> None:
        """Take the weights lock between two steps, ahead of the training thread (which would otherwise take
        it back right after every step: locks are not fair). The caller releases it."""
        self._snapshot_waiting.set()
        try:
            self._weights_lock.acquire()
        finally:
            self._snapshot_waiting.clear()

    # -- replicas ----------------------------------------------------------------------------
    def publish(self, directory: str) -> Snapshot:
        """Publish the trainable tensors as one weight version for followers (replication/snapshot.py).
        Training pauses only while their bytes are copied out."""
        from onlinemodel_runtime.replication.snapshot import SnapshotWriter

        self._single_rank_only("publishing weights to followers")
        with self._publish_lock:
            trainable = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
            writer = SnapshotWriter(Path(directory), self.weight_version, trainable)
            try:
                self._hold_weights()
                try:
                    writer.version = self.weight_version  # a step may have ended while the file was laid out
                    writer.copy(trainable)
                finally:
                    self._weights_lock.release()
                return writer.commit()
            except BaseException:
                writer.abort()
                raise
