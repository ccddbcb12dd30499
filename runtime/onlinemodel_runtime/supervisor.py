"""Starts the trainer process, restarts it if it dies, and keeps vLLM's prefix cache in step with it.

Lives in the vLLM API server process (created by the endpoint plugin). Everything here is async and
short: training runs in the trainer process, so vLLM's event loop never waits on it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import sys
from typing import Any

from onlinemodel_runtime.config import RuntimeConfig
from onlinemodel_runtime.trainer_client import TrainerClient, TrainerRequestError, TrainerUnavailable
from onlinemodel_runtime.worker_plugin import EXPORT_METHOD

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5


class TrainerSupervisor:
    def __init__(self, cfg: RuntimeConfig, engine_client: Any):
        self.cfg = cfg
        self.engine = engine_client
        self.client = TrainerClient(cfg.trainer_endpoint)
        self.state = "starting"
        self.last_error: str | None = None
        self.restarts = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._ready = False
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=20)
        self._cache_version: int | None = None
        self._task: asyncio.Task | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
        await self.engine.collective_rpc(EXPORT_METHOD, args=(str(self.cfg.state_dir),))
        self._task = asyncio.create_task(self._supervise())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(Exception):
                await self.client.request("shutdown", timeout=2)
            with contextlib.suppress(ProcessLookupError):
                self._proc.terminate()

    async def _spawn(self) -> None:
        self._ready = False
        self.client.reset()
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "onlinemodel_runtime.trainer",
            "--config", self.cfg.model_dump_json(), "--parent-pid", str(os.getpid()),
            stderr=asyncio.subprocess.PIPE,
        )
        asyncio.create_task(self._forward_stderr(self._proc))
        log.info("onlinemodel: trainer started (pid %d)", self._proc.pid)

    async def _forward_stderr(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            self._stderr_tail.append(line)
            print(line, file=sys.stderr, flush=True)

    async def _supervise(self) -> None:
        backoff = 1.0
        await self._spawn()
        while True:
            await asyncio.sleep(POLL_SECONDS)
            assert self._proc is not None
            if self._proc.returncode is not None:
                self._ready = False
                self.last_error = (f"trainer exited with code {self._proc.returncode}: "
                                   + " | ".join(list(self._stderr_tail)[-3:]))
                if self.restarts >= self.cfg.trainer_restart_limit:
                    self.state = "error"
                    log.error("onlinemodel: %s; not restarting (limit %d)", self.last_error, self.restarts)
                    return
                self.restarts += 1
                self.state = "starting"
                log.warning("onlinemodel: %s; restarting in %.0fs", self.last_error, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                await self._spawn()
                continue
            try:
                status = await self.client.request("status", timeout=5)
            except (TrainerUnavailable, TrainerRequestError):
                continue  # still starting, or busy: try again
            if not self._ready:
                self._ready = True
                self.state = "running"
                backoff = 1.0
                log.info("onlinemodel: trainer ready")
            await self._sync_prefix_cache(status)

    # -- prefix cache --------------------------------------------------------------------------
    async def _sync_prefix_cache(self, status: dict[str, Any]) -> None:
        """Drop KV computed with older weights once the weights changed.

        vLLM refuses the reset while requests hold cache blocks; we retry on the next poll, so
        answers computed from stale KV last at most until the first idle moment.
        """
        version = status.get("weight_version")
        if version == self._cache_version:
            return
        if self._cache_version is None and version == 0:
            self._cache_version = version
            return
        if await self.engine.reset_prefix_cache():
            self._cache_version = version

    # -- requests from the HTTP routes -----------------------------------------------------------
    def _check_ready(self) -> None:
        if self.state == "error":
            raise TrainerUnavailable(f"trainer is not running: {self.last_error}")
        if not self._ready:
            raise TrainerUnavailable("trainer is starting")

    async def status(self) -> dict[str, Any]:
        if not self._ready:
            return {"state": "error" if self.state == "error" else "starting", "steps": 0,
                    "tokens_trained": 0, "last_loss": None, "weight_version": 0, "last_step_time": None,
                    "last_step_seconds": None, "skipped_steps": 0, "jobs": [], "last_error": self.last_error,
                    "checkpoint": None, "optimizer": None, "trainer_restarts": self.restarts}
        status = await self.client.request("status", timeout=10)
        # Jobs reported finished here must already be served from fresh KV.
        await self._sync_prefix_cache(status)
        status["trainer_restarts"] = self.restarts
        if self.last_error and not status.get("last_error"):
            status["last_error"] = self.last_error
        return status

    async def submit(self, examples: list[dict[str, Any]], epochs: int | None,
                     learning_rate: float | None) -> dict[str, Any]:
        self._check_ready()
        return await self.client.request("train", examples=examples, epochs=epochs,
                                         learning_rate=learning_rate, timeout=30)

    async def checkpoint(self, timeout: float = 600.0) -> dict[str, Any]:
        self._check_ready()
        return await self.client.request("checkpoint", timeout=timeout)
