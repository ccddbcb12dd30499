"""The learner's weight routes on loopback without vLLM: the real routes, Publisher, snapshot writer and
HTTP server (uvicorn), with plain tensors standing in for the trainer's trainable parameters.

Used by the replication tests and ``bench/replication_sync.py`` (sync time per GB).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from onlinemodel_protocol.api import TrainStatus
from onlinemodel_protocol.config import RuntimeConfig
from onlinemodel_protocol.replication import Snapshot
from onlinemodel_runtime.devtools.launcher import free_port
from onlinemodel_runtime.replication.publisher import Publisher
from onlinemodel_runtime.replication.routes import PUBLISHER_KEY
from onlinemodel_runtime.replication.snapshot import SnapshotWriter


class TensorTrainer:
    """Stands in for the supervisor and the trainer behind it: `weights` train by `step()`."""

    def __init__(self, weights: Mapping[str, torch.Tensor]):
        self.weights = dict(weights)
        self.version = 1

    @property
    def last_status(self) -> TrainStatus:
        return TrainStatus(state="idle", weight_version=self.version)

    async def publish(self, directory: str) -> Snapshot:
        return await asyncio.to_thread(self._publish, Path(directory))

    def _publish(self, directory: Path) -> Snapshot:
        writer = SnapshotWriter(directory, self.version, self.weights)
        writer.copy(self.weights)
        return writer.commit()

    def step(self, delta: float = 1.0) -> None:
        for t in self.weights.values():
            t.add_(delta)
        self.version += 1


class LoopbackLearner:
    """``with LoopbackLearner(weights, state_dir, token) as learner:`` serves on ``learner.url``."""

    def __init__(self, weights: Mapping[str, torch.Tensor], state_dir: Path, token: str):
        import uvicorn
        from fastapi import FastAPI

        from onlinemodel_runtime.vllm_plugins import endpoint

        self.trainer = TensorTrainer(weights)
        app = FastAPI()
        endpoint.OnlineModelEndpoints().attach_router(app)
        cfg = RuntimeConfig(model="/loopback", base_model="/loopback", state_dir=state_dir)
        setattr(app.state, endpoint.STATE_KEY, endpoint._Runtime(cfg, None, 0, self.trainer, (token,)))
        self.publisher = Publisher(cfg, self.trainer)
        setattr(app.state, PUBLISHER_KEY, self.publisher)
        self.url = f"http://127.0.0.1:{free_port()}"
        port = int(self.url.rsplit(":", 1)[1])
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> LoopbackLearner:
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:  # e.g. the port was taken meanwhile
                raise RuntimeError(f"the loopback learner did not start on {self.url}")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(10)

    def publish(self) -> Snapshot:
        asyncio.run(self.publisher.publish())
        return self.publisher.published
