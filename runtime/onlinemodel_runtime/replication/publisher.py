"""The learner's side of scaling out, in vLLM's API server: when to publish, and who follows how closely.

Publishing policy (``should_publish``, a pure function): only while a follower asked within
``FOLLOWER_ACTIVE_SECONDS`` (a single replica never pays for it), only when the weights moved since the
last published version, and then as soon as the trainer is not training (a job ended, or the learner
just started) or, while a job runs, at most every ``sync_interval`` seconds. The trainer takes the
snapshot (``TrainerService.publish``: the tensor bytes are copied under its weights lock, so every tensor
of a version is from that version). Followers report their applied version each time they ask for the
manifest; lag in seconds is measured from the moment the learner first had a version the follower lacks.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from pathlib import Path

from onlinemodel_protocol.api import TrainStatus, utc_timestamp
from onlinemodel_protocol.config import RuntimeConfig
from onlinemodel_protocol.limits import FOLLOWER_ACTIVE_SECONDS, REPLICAS_MAX
from onlinemodel_protocol.replication import FollowerState, ReplicationStatus, Snapshot
from onlinemodel_runtime.replication import snapshot as snapshots

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
SNAPSHOT_DIR = "replication"  # in the state directory
_VERSION_HISTORY = 4096


def should_publish(*, followers_active: bool, weight_version: int, published_version: int | None,
                   training: bool, seconds_since_publish: float, sync_interval: float) -> bool:
    if not followers_active or weight_version == published_version:
        return False
    return not training or seconds_since_publish >= sync_interval


class _Follower:
    __slots__ = ("version", "seen", "seen_at", "sync_seconds", "sync_bytes")

    def __init__(self, version: int, seen: float, sync_seconds: float | None, sync_bytes: int | None):
        self.version, self.seen, self.seen_at = version, seen, utc_timestamp()
        self.sync_seconds, self.sync_bytes = sync_seconds, sync_bytes


class FollowerRegistry:
    """The followers that reported, and when the learner first had each weight version (for lag)."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._followers: dict[str, _Follower] = {}
        self._first_seen: collections.OrderedDict[int, float] = collections.OrderedDict()

    def observe_version(self, version: int) -> None:
        if version not in self._first_seen:
            self._first_seen[version] = self.clock()
            while len(self._first_seen) > _VERSION_HISTORY:
                self._first_seen.popitem(last=False)

    def report(self, name: str, version: int, sync_seconds: float | None = None,
               sync_bytes: int | None = None) -> None:
        known = self._followers.get(name)
        if known is not None and known.version == version and sync_seconds is None:
            sync_seconds, sync_bytes = known.sync_seconds, known.sync_bytes
        self._followers[name] = _Follower(version, self.clock(), sync_seconds, sync_bytes)
        forget = self.clock() - 10 * FOLLOWER_ACTIVE_SECONDS
        for stale in [n for n, f in self._followers.items() if f.seen < forget]:
            del self._followers[stale]
        while len(self._followers) > 10 * REPLICAS_MAX:  # the oldest report goes first
            del self._followers[min(self._followers, key=lambda n: self._followers[n].seen)]

    def active(self) -> bool:
        now = self.clock()
        return any(now - f.seen <= FOLLOWER_ACTIVE_SECONDS for f in self._followers.values())

    def lag_seconds(self, follower_version: int, learner_version: int) -> float:
        if follower_version >= learner_version:
            return 0.0
        newer = [t for v, t in self._first_seen.items() if follower_version < v <= learner_version]
        return round(max(self.clock() - min(newer), 0.0), 3) if newer else 0.0

    def states(self, learner_version: int) -> list[FollowerState]:
        return [FollowerState(name=name, weight_version=f.version,
                              lag_versions=max(learner_version - f.version, 0),
                              lag_seconds=self.lag_seconds(f.version, learner_version), last_seen=f.seen_at,
                              last_sync_seconds=f.sync_seconds, last_sync_bytes=f.sync_bytes)
                for name, f in sorted(self._followers.items())]


class Publisher:
    """Runs the policy against the trainer's last status (every POLL_SECONDS) and serves the result."""

    def __init__(self, cfg: RuntimeConfig, supervisor, clock=time.monotonic):
        self.cfg = cfg
        self.supervisor = supervisor  # server/supervisor.py TrainerSupervisor
        self.directory: Path = cfg.state_dir / SNAPSHOT_DIR
        self.registry = FollowerRegistry(clock)
        self.clock = clock
        self.published: Snapshot | None = None
        self.last_error: str | None = None
        self._published_at = float("-inf")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            status = self.supervisor.last_status
            if status is None:
                continue
            self.registry.observe_version(status.weight_version)
            if should_publish(followers_active=self.registry.active(), weight_version=status.weight_version,
                              published_version=self.published.weight_version if self.published else None,
                              training=status.state == "training",
                              seconds_since_publish=self.clock() - self._published_at,
                              sync_interval=self.cfg.sync_interval):
                await self.publish()

    async def publish(self) -> None:
        from onlinemodel_runtime.server.trainer_client import TrainerRequestError, TrainerUnavailable

        self._published_at = self.clock()  # also after a failure: retry after an interval, not at once
        try:
            self.published = await self.supervisor.publish(str(self.directory))
            self.last_error = None
            log.info("onlinemodel: published weight version %d (%.1f MB; training paused %.3fs)",
                     self.published.weight_version, self.published.total_bytes / 1e6, self.published.lock_seconds)
        except (TrainerUnavailable, TrainerRequestError) as exc:
            self.last_error = f"publishing failed: {exc}"
            log.warning("onlinemodel: %s", self.last_error)

    def manifest(self) -> Snapshot | None:
        # Read back from disk: the file, not this process's memory, is what the stream serves.
        return snapshots.read_manifest(self.directory) if self.published is not None else None

    def status(self, learner: TrainStatus) -> ReplicationStatus:
        summary = self.published.model_copy(update={"tensors": []}) if self.published else None
        return ReplicationStatus(role="learner", published=summary, last_error=self.last_error,
                                 followers=self.registry.states(learner.weight_version))
