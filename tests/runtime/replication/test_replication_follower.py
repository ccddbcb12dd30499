"""A follower pulling from the learner's real routes over HTTP (uvicorn on loopback), with the real
Publisher and snapshot writer; only the trainer behind them stands in (devtools/replication_loopback.py)."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
import torch

from onlinemodel_runtime.devtools.replication_loopback import LoopbackLearner, TensorTrainer
from onlinemodel_runtime.replication.follower import Follower, Mismatch
from onlinemodel_runtime.replication.transport import (FollowerReport, HttpWeightTransport, LearnerRefused,
                                                       TransportError, VersionGone)

TOKEN = "tok-1"


@pytest.fixture
def learner(tmp_path) -> Iterator[LoopbackLearner]:
    g = torch.Generator().manual_seed(1)
    weights = {f"layers.{i}.weight": torch.randn(64, 32, generator=g).to(torch.bfloat16) for i in range(6)}
    with LoopbackLearner(weights, tmp_path, TOKEN) as learner:
        yield learner


def replica_of(trainer: TensorTrainer) -> dict[str, torch.Tensor]:
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
    url, trainer, publisher = learner.url, learner.trainer, learner.publisher
    transport = HttpWeightTransport(url, TOKEN)
    targets = replica_of(trainer)
    follower = Follower(transport, targets, "follower-a", retry_seconds=0)
    assert follower.sync_once() is False  # nothing published yet: asking registers the follower
    assert publisher.registry.active()
    learner.publish()
    assert follower.sync_once() is True and follower.weight_version == 1 and follower.synced
    assert all(torch.equal(targets[n], trainer.weights[n]) for n in targets)
    assert follower.sync_once() is False  # nothing new
    trainer.step()
    publisher.registry.observe_version(1)
    publisher.registry.observe_version(2)
    status = publisher.status(trainer.last_status)
    assert [(f.name, f.weight_version, f.lag_versions) for f in status.followers] == [("follower-a", 1, 1)]
    assert status.followers[0].lag_seconds >= 0 and status.published.weight_version == 1
    learner.publish()
    assert follower.sync_once() is True and follower.weight_version == 2
    assert all(torch.equal(targets[n], trainer.weights[n]) for n in targets)
    assert follower.last_sync_bytes == sum(t.numel() * 2 for t in targets.values())


def test_a_broken_stream_resumes_at_the_tensor_it_was_at(learner) -> None:
    url, trainer = learner.url, learner.trainer
    learner.publish()
    flaky = Flaky(HttpWeightTransport(url, TOKEN), every=2)
    targets = replica_of(trainer)
    follower = Follower(flaky, targets, "follower-b", retry_seconds=0)
    assert follower.sync_once() is True
    assert flaky.starts == [0, 2, 4]
    assert follower.resumed_transfers == 2
    assert all(torch.equal(targets[n], trainer.weights[n]) for n in targets)


def test_a_version_replaced_mid_transfer_is_dropped_for_the_new_one(learner) -> None:
    url, trainer = learner.url, learner.trainer
    learner.publish()
    transport = HttpWeightTransport(url, TOKEN)
    old = transport.latest(FollowerReport(follower="f", version=0))
    trainer.step()
    learner.publish()
    with pytest.raises(VersionGone):
        list(transport.frames(old, 0))
    targets = replica_of(trainer)
    follower = Follower(transport, targets, "follower-c", retry_seconds=0)
    assert follower.apply(old) is False and not follower.synced
    assert follower.sync_once() is True and follower.weight_version == 2


def test_refusals_token_and_mismatch(learner) -> None:
    url, trainer = learner.url, learner.trainer
    learner.publish()
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
    url = learner.url
    learner.publish()
    req = urllib.request.Request(f"{url}/replication/tensors{query}", headers={"Authorization": f"Bearer {TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 400
