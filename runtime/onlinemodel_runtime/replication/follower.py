"""``python -m onlinemodel_runtime.replication.follower --config JSON``: a follower's weight writer.

Decided (docs/operator.md "Scaling out"): a small process of its own, started and supervised like the
trainer (``FollowerSupervisor``), rather than the trainer in a follow mode or the vLLM worker. It attaches
to the weights the vLLM worker exported, exactly as the trainer does (no copy), builds the Hugging Face
model on them so the learner's parameter names address the same views, and never builds an optimizer or
activations. It answers the trainer's status request over the same ZMQ socket, so the supervisor's
prefix-cache reset follows its ``weight_version`` unchanged.

Sync (``Follower.sync_once``): ask the learner for its latest version (reporting ours); if it is new,
check every name, shape and dtype against the live weights, then write the tensors in place one by one as
they arrive (``copy_`` into vLLM's own memory, as training does: requests decoding meanwhile see a mix of
the two versions for the duration of the transfer), resuming at the frame it was at after a broken
connection. The version counts as applied only when its last tensor is written.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Mapping

import torch

from onlinemodel_protocol.api import TrainStatus, utc_timestamp
from onlinemodel_protocol.config import ENV_API_TOKEN, RuntimeConfig
from onlinemodel_protocol.limits import FOLLOW_POLL_SECONDS
from onlinemodel_protocol.replication import FOLLOWER_NAME, ReplicationStatus, Snapshot
from onlinemodel_runtime.replication.transport import (FollowerReport, LearnerRefused, TransportError,
                                                       VersionGone, WeightTransport)
from onlinemodel_runtime.server.supervisor import TrainerSupervisor
from onlinemodel_runtime.trainer.service import TrainerError

log = logging.getLogger("onlinemodel.follower")

MAX_RESUMES = 20  # per version: then the sync fails and starts over at the next poll


class Mismatch(RuntimeError):
    """The learner's tensors do not fit this replica's model: following cannot work."""


class FollowerSupervisor(TrainerSupervisor):
    module = "onlinemodel_runtime.replication.follower"
    tensor_parallel = False  # a follower writes the learner's whole tensors: one rank


def follower_name(cfg: RuntimeConfig) -> str:
    """The name the learner lists this follower under: configured, else the host (pod) name."""
    if cfg.follower_name:
        return cfg.follower_name
    name = re.sub(r"[^a-z0-9.-]+", "-", socket.gethostname().lower()).strip("-.")[:253] or "follower"
    return name if FOLLOWER_NAME.match(name) else "follower"


class Follower:
    """Applies the learner's versions to `targets` (name -> live tensor) through `transport`."""

    def __init__(self, transport: WeightTransport, targets: Mapping[str, torch.Tensor], name: str,
                 weight_version: int = 0, retry_seconds: float = 1.0):
        self.transport = transport
        self.targets = dict(targets)
        self.name = name
        self.weight_version = weight_version
        self.retry_seconds = retry_seconds
        self.synced = False
        self.learner_version: int | None = None
        self.last_sync_seconds: float | None = None
        self.last_sync_bytes: int | None = None
        self.last_sync_time: str | None = None
        self.resumed_transfers = 0

    def check(self, snapshot: Snapshot) -> None:
        for t in snapshot.tensors:
            target = self.targets.get(t.name)
            if target is None:
                raise Mismatch(f"the learner publishes {t.name}, which this model does not have")
            if list(target.shape) != t.shape or str(target.dtype).removeprefix("torch.") != t.dtype:
                raise Mismatch(f"{t.name}: the learner's is {t.dtype}{t.shape}, "
                               f"this replica's {target.dtype}{list(target.shape)}")

    def sync_once(self) -> bool:
        """One poll: True if a new version was applied."""
        snapshot = self.transport.latest(FollowerReport(follower=self.name, version=self.weight_version,
                                                        sync_seconds=self.last_sync_seconds,
                                                        sync_bytes=self.last_sync_bytes))
        if snapshot is None:
            return False
        self.learner_version = snapshot.weight_version
        if self.synced and snapshot.weight_version == self.weight_version:
            return False
        self.check(snapshot)
        return self.apply(snapshot)

    def apply(self, snapshot: Snapshot) -> bool:
        """Write every tensor of `snapshot`; False if the learner replaced it meanwhile (VersionGone)."""
        started, written, nxt, resumes = time.perf_counter(), 0, 0, 0
        total = len(snapshot.tensors)
        while nxt < total:
            try:
                for header, tensor in self.transport.frames(snapshot, nxt):
                    if header.index != nxt or header.name != snapshot.tensors[nxt].name:
                        raise TransportError(f"expected frame {nxt}, got {header.index} ({header.name})")
                    self.targets[header.name].copy_(tensor)
                    written += header.nbytes
                    nxt += 1
                if nxt < total:
                    raise TransportError(f"the stream ended after {nxt} of {total} tensors")
            except VersionGone:
                return False
            except TransportError as exc:
                resumes += 1
                if resumes > MAX_RESUMES:
                    raise
                self.resumed_transfers += 1
                log.warning("%s; resuming at tensor %d of %d", exc, nxt, total)
                time.sleep(self.retry_seconds)
        if self.targets and next(iter(self.targets.values())).is_cuda:
            torch.cuda.synchronize()
        self.weight_version = snapshot.weight_version
        self.synced = True
        self.last_sync_seconds = round(time.perf_counter() - started, 4)
        self.last_sync_bytes = written
        self.last_sync_time = utc_timestamp()
        log.info("applied weight version %d: %.1f MB in %.2fs", self.weight_version, written / 1e6,
                 self.last_sync_seconds)
        return True


class FollowerService:
    """The follower process's state, answering the trainer's RPC server (status; every operation that
    would change the model answers 409: the endpoint refuses those before they get here)."""

    def __init__(self, cfg: RuntimeConfig, follower: Follower, model=None):
        self.cfg = cfg
        self.follower = follower
        self.model = model  # the HF model on the live views (INTROSPECT, tests)
        self.state = "starting"
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def status(self) -> TrainStatus:
        f = self.follower
        return TrainStatus(
            state=self.state, weight_version=f.weight_version, last_error=self.last_error,
            replication=ReplicationStatus(
                role="follower", learner=self.cfg.follow_url, learner_version=f.learner_version, synced=f.synced,
                last_sync_seconds=f.last_sync_seconds, last_sync_bytes=f.last_sync_bytes,
                last_sync_time=f.last_sync_time, resumed_transfers=f.resumed_transfers, last_error=self.last_error))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="onlinemodel-follow", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        self.state = "following"
        while not self._stop.is_set():
            try:
                self.follower.sync_once()
                self.last_error = None
            except Mismatch as exc:
                self.state, self.last_error = "error", f"cannot follow the learner: {exc}"
                log.error("%s", self.last_error)
                return
            except (TransportError, VersionGone, LearnerRefused) as exc:
                self.last_error = str(exc)
                log.warning("sync failed: %s", exc)
            self._stop.wait(FOLLOW_POLL_SECONDS)

    # The RPC server's other questions.
    def checkpoint_due_by_time(self) -> bool:
        return False

    def _refuse(self, *_args, **_kwargs):
        raise TrainerError(f"this replica follows {self.cfg.follow_url}: it does not train", code=409)

    submit = cancel = checkpoint = publish = periodic_checkpoint = debug_scale = _refuse


def build_service(cfg: RuntimeConfig, counters=None) -> FollowerService:
    """Attach to the exported weights and follow `cfg.follow_url`. After a restart (`counters`: the last
    status the supervisor saw) the live weights still hold the version applied before; it is pulled again
    once."""
    from onlinemodel_runtime.replication.transport import HttpWeightTransport
    from onlinemodel_runtime.weights import shared
    from onlinemodel_runtime.weights.hf_model import build_hf_model

    manifest = shared.wait_for_manifest(cfg.state_dir, cfg.trainer_start_timeout)
    manifest, tensors = shared.attach_weights(cfg.state_dir, manifest)
    model = build_hf_model(cfg.model, tensors, expected_dtype=shared.dtype_from_name(manifest.dtype))
    log.info("attached %d tensors (%s) of %s; following %s", len(tensors), manifest.transport, manifest.model,
             cfg.follow_url)
    token = os.environ.get(ENV_API_TOKEN, "").strip() or None
    transport = HttpWeightTransport(cfg.follow_url, token)
    targets = {name: p.data for name, p in model.named_parameters()}
    version = counters.weight_version if counters is not None else 0
    return FollowerService(cfg, Follower(transport, targets, follower_name(cfg), version), model)


def main(argv: list[str] | None = None) -> int:
    from onlinemodel_runtime.trainer.server import run_process

    return run_process("follower", build_service, argv)


if __name__ == "__main__":
    sys.exit(main())
