"""A follower pulling from the learner's real routes over HTTP (uvicorn on loopback), with the real
Publisher; only the trainer behind it stands in (it snapshots plain tensors with the real writer)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import uvicorn
from fastapi import FastAPI

from onlinemodel_protocol.api import TrainStatus
from onlinemodel_runtime.devtools.launcher import free_port
from onlinemodel_runtime.replication import routes
from onlinemodel_runtime.replication.follower import Follower, Mismatch
from onlinemodel_runtime.replication.publisher import Publisher
from onlinemodel_runtime.replication.snapshot import SnapshotWriter
from onlinemodel_runtime.replication.transport import (FollowerReport, HttpWeightTransport, LearnerRefused,
                                                       TransportError, VersionGone)

from onlinemodel_protocol.config import RuntimeConfig
from onlinemodel_runtime.vllm_plugins import endpoint

TOKEN = "tok-1"


class StubTrainer:
    """Stands in for the supervisor + trainer: `weights` are the learner's trainable tensors."""

    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.weights = {f"layers.{i}.weight": torch.randn(64, 32, generator=g).to(torch.bfloat16) for i in range(6)}
        self.version = 1

    @property
    def last_status(self):
        return TrainStatus(state="idle", weight_version=self.version)

    async def publish(self, directory):
        writer = SnapshotWriter(Path(directory), self.version, self.weights)
        writer.copy(self.weights)
        return writer.commit()

    def train(self):
        for t in self.weights.values():
            t.add_(1.0)
        self.version += 1


@pytest.fixture
def learner(tmp_path) -> Iterator[tuple[str, StubTrainer, Publisher]]:
    trainer = StubTrainer()
    app = FastAPI()
    endpoint.OnlineModelEndpoints().attach_router(app)
    cfg = RuntimeConfig(model="/m", base_model="/m", state_dir=tmp_path)
    setattr(app.state, endpoint.STATE_KEY, endpoint._Runtime(cfg, None, 256, trainer, (TOKEN,)))
    publisher = Publisher(cfg, trainer)
    setattr(app.state, routes.PUBLISHER_KEY, publisher)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}", trainer, publisher
    server.should_exit = True
    thread.join(10)


def publish(publisher: Publisher) -> None:
    asyncio.run(publisher.publish())


def replica_of(trainer: StubTrainer) -> dict[str, torch.Tensor]:
    return {name: torch.zeros_like(t) for name, t in trainer.weights.items()}


class Flaky:
    """The HTTP transport, with the connection broken after `every` frames of each stream."""

    def __init__(self, inner: HttpWeightTransport, every: int):
        self.inner, self.every, self.starts = inner, every, []

    def latest(self, report):
        return self.inner.latest(report)

    def frames(self, snapshot, start):
        self.starts.append(start)
        for n, frame in enumerate(self.inner.frames(snapshot, start)):
            if n == self.every:
                raise TransportError("connection reset (test)")
            yield frame


def test_follower_applies_a_version_and_is_listed_with_its_lag(learner) -> None:
    url, trainer, publisher = learner
    transport = HttpWeightTransport(url, TOKEN)
    targets = replica_of(trainer)
    follower = Follower(transport, targets, "follower-a", retry_seconds=0)
    assert follower.sync_once() is False  # nothing published yet: asking registers the follower
    assert publisher.registry.active()
    publish(publisher)
    assert follower.sync_once() is True and follower.weight_version == 1 and follower.synced
    assert all(torch.equal(targets[n], trainer.weights[n]) for n in targets)
    assert follower.sync_once() is False  # nothing new
    trainer.train()
    publisher.registry.observe_version(1)
    publisher.registry.observe_version(2)
    status = publisher.status(trainer.last_status)
    assert [(f.name, f.weight_version, f.lag_versions) for f in status.followers] == [("follower-a", 1, 1)]
    assert status.followers[0].lag_seconds >= 0 and status.published.weight_version == 1
    publish(publisher)
    assert follower.sync_once() is True and follower.weight_version == 2
    assert all(torch.equal(targets[n], trainer.weights[n]) for n in targets)
    assert follower.last_sync_bytes == sum(t.numel() * 2 for t in targets.values())


def test_a_broken_stream_resumes_at_the_tensor_it_was_at(learner) -> None:
    url, trainer, publisher = learner
    publish(publisher)
    flaky = Flaky(HttpWeightTransport(url, TOKEN), every=2)
    targets = replica_of(trainer)
    follower = Follower(flaky, targets, "follower-b", retry_seconds=0)
    assert follower.sync_once() is True
    assert flaky.starts == [0, 2, 4]
    assert follower.resumed_transfers == 2
    assert all(torch.equal(targets[n], trainer.weights[n]) for n in targets)


def test_a_version_replaced_mid_transfer_is_dropped_for_the_new_one(learner) -> None:
    url, trainer, publisher = learner
    publish(publisher)
    transport = HttpWeightTransport(url, TOKEN)
    old = transport.latest(FollowerReport(follower="f", version=0))
    trainer.train()
    publish(publisher)
    with pytest.raises(VersionGone):
        list(transport.frames(old, 0))
    targets = replica_of(trainer)
    follower = Follower(transport, targets, "follower-c", retry_seconds=0)
    assert follower.apply(old) is False and not follower.synced
    assert follower.sync_once() is True and follower.weight_version == 2


def test_refusals_token_and_mismatch(learner) -> None:
    url, trainer, publisher = learner
    publish(publisher)
    with pytest.raises(LearnerRefused, match="401"):
        Follower(HttpWeightTransport(url, "wrong"), replica_of(trainer), "f").sync_once()
    wrong_shape = {n: torch.zeros(3, dtype=torch.bfloat16) for n in trainer.weights}
    with pytest.raises(Mismatch, match="layers.0.weight"):
        Follower(HttpWeightTransport(url, TOKEN), wrong_shape, "f").sync_once()
    with pytest.raises(Mismatch, match="does not have"):
        Follower(HttpWeightTransport(url, TOKEN), {}, "f").sync_once()
    assert not torch.any(wrong_shape["layers.0.weight"])  # nothing written before the check


@pytest.mark.parametrize("query", ["?version=-1", "?version=x", "?version=1&start=-2", "?start=1"])
def test_bad_tensor_queries_are_400(learner, query) -> None:
    import urllib.error
    import urllib.request

    url, _, publisher = learner
    publish(publisher)
    req = urllib.request.Request(f"{url}/replication/tensors{query}", headers={"Authorization": f"Bearer {TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 400
