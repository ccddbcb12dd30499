"""Starts the trainer process, restarts it if it dies, and keeps vLLM's prefix cache in step with it.

Under tensor parallelism it starts one trainer process per vLLM rank (trainer/tp_group.py) and supervises
them as one unit: whichever exits, all are stopped and restarted together (half a group cannot train).

Lives in the vLLM API server process (created by the endpoint plugin). Everything here is async and
short: training runs in the trainer process, so vLLM's event loop never waits on it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import sys
import uuid
from typing import Any

from onlinemodel_protocol.api import CheckpointRecord, Job, RollbackRecord, TrainAccepted, TrainStatus
from onlinemodel_protocol.config import ENV_VLLM_API_KEY, RuntimeConfig
from onlinemodel_protocol.replication import Snapshot
from onlinemodel_protocol.rpc import (EXIT_PERMANENT, EXPORT_WEIGHTS_METHOD, Counters, TrainerOp, TrainJob,
                                      WorkerShard, exported_tp_size)
from onlinemodel_runtime.server.state_dir import ensure_private_dir
from onlinemodel_runtime.server.trainer_client import TrainerClient, TrainerRequestError, TrainerUnavailable

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
TP_INIT_PREFIX = "tp-init-"  # in state_dir: the trainer group's rendezvous file


class _GiveUp(Exception):
    """The trainer cannot be (re)started: stop supervising, status says why."""


class TrainerSupervisor:
    # The process it runs: the trainer, or a follower's (replication/follower.py), which answers the same
    # status requests.
    module = "onlinemodel_runtime.trainer"
    tensor_parallel = True  # whether `module` runs one process per tensor-parallel rank

    def __init__(self, cfg: RuntimeConfig, engine_client: Any, metrics: Any = None, serving_key: str | None = None):
        self.cfg = cfg
        self.metrics = metrics  # server/metrics.py's TrainingMetrics, fed with every status read
        self.engine = engine_client
        # vLLM's /v1 key, for the trainer's probe requests: in its environment, never on its command line.
        self._env = {**os.environ, **({ENV_VLLM_API_KEY: serving_key} if serving_key else {})}
        self.client = TrainerClient(cfg.trainer_endpoint)
        self.state = "starting"
        self.last_error: str | None = None
        self.restarts = 0
        self.tp_size = 1  # vLLM's tensor parallel size, from the workers' export answers
        self._procs: list[asyncio.subprocess.Process] = []  # rank 0 first
        self._ready = False
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=20)
        self._stderr_tasks: list[asyncio.Task] = []
        # Weight version whose KV vLLM's prefix cache may hold; None: unknown, reset at the next chance.
        self._cache_version: int | None = 0
        self._last_status: TrainStatus | None = None
        self._task: asyncio.Task | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        ensure_private_dir(self.cfg.state_dir)  # the trainer trusts what it finds there
        answers = await self.engine.collective_rpc(EXPORT_WEIGHTS_METHOD, args=(str(self.cfg.state_dir),))
        self.tp_size = exported_tp_size(answers)  # every rank exported its shard, or the trainer cannot start
        if self.tp_size > 1 and not self.tensor_parallel:
            raise RuntimeError(f"{self.module} runs at tensor parallel size 1 only; vLLM runs {self.tp_size}")
        self._task = asyncio.create_task(self._supervise())

    async def _spawn(self) -> None:
        self._ready = False
        self.client.reset()
        # A restarted trainer resumes counters from the last checkpoint, but the live weights carry every
        # step since: hand it the counters we last saw (it keeps the larger) and reset the cache once.
        counters = ["--counters", Counters.model_validate(self._last_status.model_dump()).model_dump_json()] \
            if self._last_status else []
        self._cache_version = None if self._last_status else 0
        command = [sys.executable, "-m", self.module, "--config", self.cfg.model_dump_json(),
                   "--parent-pid", str(os.getpid()), *counters]
        tp_init = self._fresh_tp_init() if self.tp_size > 1 else None
        self._procs = []
        for rank in range(self.tp_size):
            shard = ["--shard", WorkerShard(tp_rank=rank, tp_size=self.tp_size).model_dump_json(),
                     "--tp-init", tp_init] if tp_init else []
            proc = await asyncio.create_subprocess_exec(*command, *shard, stderr=asyncio.subprocess.PIPE,
                                                        env=self._env)
            self._procs.append(proc)
            log.info("onlinemodel: trainer started (pid %d, tensor-parallel rank %d of %d)", proc.pid, rank,
                     self.tp_size)
        self._stderr_tasks = [asyncio.create_task(self._forward_stderr(p)) for p in self._procs]

    def _fresh_tp_init(self) -> str:
        """A new rendezvous file for the group (torch's FileStore must not find an old one), old ones removed."""
        for old in self.cfg.state_dir.glob(f"{TP_INIT_PREFIX}*"):
            old.unlink(missing_ok=True)
        return f"file://{self.cfg.state_dir / f'{TP_INIT_PREFIX}{uuid.uuid4().hex[:12]}'}"

    async def _forward_stderr(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            self._stderr_tail.append(line)
            print(line, file=sys.stderr, flush=True)

    async def _stop_group(self) -> int:
        """Once one of the processes exited: stop the others, and return the exit status that says most
        (a permanent failure anywhere, else the first non-zero one)."""
        for proc in self._procs:
            if proc.returncode is None:
                proc.terminate()
        await asyncio.wait([asyncio.create_task(p.wait()) for p in self._procs], timeout=10)
        for proc in self._procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        if self._stderr_tasks:  # their last words say why they exited
            await asyncio.wait(self._stderr_tasks, timeout=2)
        codes = [p.returncode for p in self._procs]
        return EXIT_PERMANENT if EXIT_PERMANENT in codes else next((c for c in codes if c), codes[0])

    async def _supervise(self) -> None:
        try:
            await self._spawn()
            backoff = 1.0
            while True:
                await asyncio.sleep(POLL_SECONDS)
                try:
                    backoff = await self._tick(backoff)
                except asyncio.CancelledError:
                    raise
                except _GiveUp:
                    return
                except Exception as exc:  # keep supervising whatever one poll ran into
                    log.exception("onlinemodel: supervisor poll failed")
                    self.last_error = f"supervisor: {type(exc).__name__}: {exc}"
        except Exception as exc:
            self.state = "error"
            self.last_error = f"cannot start the trainer: {type(exc).__name__}: {exc}"
            log.exception("onlinemodel: %s", self.last_error)

    async def _tick(self, backoff: float) -> float:
        assert self._procs
        if any(p.returncode is not None for p in self._procs):
            self._ready = False
            code = await self._stop_group()
            self.last_error = f"trainer exited with code {code}: " + " | ".join(list(self._stderr_tail)[-3:])
            if code == EXIT_PERMANENT or self.restarts >= self.cfg.trainer_restart_limit:
                self.state = "error"
                log.error("onlinemodel: %s; not restarting", self.last_error)
                self._observe_down()
                raise _GiveUp
            self.restarts += 1
            self.state = "starting"
            self._observe_down()
            log.warning("onlinemodel: %s; restarting in %.0fs", self.last_error, backoff)
            await asyncio.sleep(backoff)
            await self._spawn()
            return min(backoff * 2, 30.0)
        try:
            status = await self.client.request(TrainerOp.STATUS, timeout=5)
        except (TrainerUnavailable, TrainerRequestError):
            return backoff  # still starting, or busy: try again
        if not self._ready:
            self._ready = True
            self.state = "running"
            log.info("onlinemodel: trainer ready")
        self._remember(status)
        await self._sync_prefix_cache(status)
        return 1.0

    # -- prefix cache --------------------------------------------------------------------------
    async def _sync_prefix_cache(self, status: TrainStatus) -> None:
        """Drop KV computed with older weights once the weights changed.

        vLLM refuses the reset while requests hold cache blocks; we retry on the next poll, so
        answers computed from stale KV last at most until the first idle moment.
        """
        version = status.weight_version
        if version == self._cache_version:
            return
        if await self.engine.reset_prefix_cache():
            self._cache_version = version
        elif status.state in ("idle", "following") and not status.queued_jobs:
            # Training is over and a request still holds stale blocks: preempt it (vLLM recomputes it
            # with the new weights), so a finished job is always followed by fresh answers.
            try:
                await self.engine.reset_prefix_cache(reset_running_requests=True)
                self._cache_version = version
            except RuntimeError as exc:  # e.g. requests waiting on remote KV: retry next poll
                log.warning("onlinemodel: could not reset vLLM's prefix cache: %s", exc)

    def _remember(self, status: TrainStatus) -> None:
        self._last_status = status
        if self.metrics is not None:
            self.metrics.observe(status, self.restarts)

    def _observe_down(self) -> None:
        """Metrics while no trainer answers: its last counters, the restarts, the state."""
        if self.metrics is not None:
            self.metrics.observe(self._placeholder_status(), self.restarts)

    @property
    def answering(self) -> bool:
        """Whether the trainer answers requests now (not starting, restarting or failed)."""
        return self._ready and self.state != "error"

    @property
    def last_status(self) -> TrainStatus | None:
        """The status the trainer answered last (every POLL_SECONDS while it runs)."""
        return self._last_status if self._ready else None

    @property
    def training(self) -> bool:
        """Whether the trainer said it was training when last asked (every POLL_SECONDS)."""
        return self._ready and self._last_status is not None and self._last_status.state == "training"

    # -- requests from the HTTP routes -----------------------------------------------------------
    def _check_ready(self) -> None:
        if self.state == "error":
            raise TrainerUnavailable(f"trainer is not running: {self.last_error}")
        if not self._ready:
            raise TrainerUnavailable("trainer is starting")

    def _placeholder_status(self) -> TrainStatus:
        """What GET /train/status says while no trainer answers."""
        return TrainStatus.placeholder("error" if self.state == "error" else "starting", self._last_status,
                                       self.last_error, self.restarts)

    async def status(self) -> TrainStatus:
        if not self._ready:
            return self._placeholder_status()
        try:
            status = await self.client.request(TrainerOp.STATUS, timeout=10)
        except (TrainerUnavailable, TrainerRequestError):
            return self._placeholder_status()
        self._remember(status)
        # Jobs reported finished here must already be served from fresh KV.
        await self._sync_prefix_cache(status)
        return status.model_copy(update={"trainer_restarts": self.restarts,
                                         "last_error": status.last_error or self.last_error})

    async def submit(self, job: TrainJob) -> TrainAccepted:
        """Queue `job` in the trainer process, whose ``TrainerService.submit`` (trainer/service.py) answers."""
        self._check_ready()
        return await self.client.request(TrainerOp.TRAIN, timeout=30, **job.model_dump())

    async def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job (``TrainerService.cancel``)."""
        self._check_ready()
        return await self.client.request(TrainerOp.CANCEL, timeout=30, job_id=job_id)

    async def checkpoint(self, timeout: float = 600.0) -> CheckpointRecord:
        self._check_ready()
        return await self.client.request(TrainerOp.CHECKPOINT, timeout=timeout)

    async def rollback(self, to: int | str, timeout: float = 600.0) -> RollbackRecord:
        """Restore a checkpoint in place (``TrainerService.rollback_to``); answered once vLLM's prefix cache
        holds nothing computed with the weights it replaced."""
        self._check_ready()
        record = await self.client.request(TrainerOp.ROLLBACK, timeout=timeout, to=to)
        await self.status()
        return record

    async def publish(self, directory: str, timeout: float = 600.0) -> Snapshot:
        """Publish the trainable tensors for followers (``TrainerService.publish``)."""
        self._check_ready()
        return await self.client.request(TrainerOp.PUBLISH, timeout=timeout, directory=directory)
