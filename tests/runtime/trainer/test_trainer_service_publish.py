"""TrainerService.publish: a weight version for followers, copied under the weights lock."""

from __future__ import annotations

import torch

from onlinemodel_runtime.replication import snapshot as snapshots

from test_trainer_service import build, job, run_all, training_back_to_back
from test_trainer_service import tiny_dir  # noqa: F401  (the fixture)


def published_tensors(directory, snap):
    with snapshots.open_stream(directory, snap, 0) as f:
        return {header.name: tensor for header, tensor in snapshots.read_frames(f)}


def test_publish_writes_exactly_the_trainable_tensors_of_the_current_version(tiny_dir, tmp_path):
    service = build(tiny_dir, tmp_path)
    service.submit(job(epochs=2))
    run_all(service)
    snap = service.publish(str(tmp_path / "replication"))
    assert snap.weight_version == service.weight_version == 2
    trainable = {n: p for n, p in service.model.named_parameters() if p.requires_grad}
    frozen = [n for n, p in service.model.named_parameters() if not p.requires_grad]
    assert frozen, "the default policy freezes the embeddings and norms"
    got = published_tensors(tmp_path / "replication", snap)
    assert list(got) == list(trainable)
    assert all(torch.equal(got[n], trainable[n].detach()) for n in trainable)
    assert snap.total_bytes > sum(t.numel() * t.element_size() for t in trainable.values())


def test_publish_copies_under_the_weights_lock_and_is_not_starved(tiny_dir, tmp_path, monkeypatch):
    service = build(tiny_dir, tmp_path)
    seen = []
    copy = snapshots.SnapshotWriter.copy

    def checked_copy(writer, tensors):
        version = service.weight_version
        seen.append((service._weights_lock.locked(), writer.version == version))
        copy(writer, tensors)
        assert service.weight_version == version  # no step ran during the copy

    monkeypatch.setattr(snapshots.SnapshotWriter, "copy", checked_copy)
    with training_back_to_back(service):
        before = service.steps
        snap = service.publish(str(tmp_path / "replication"))
        assert seen == [(True, True)]
        assert snap.weight_version - before <= 2 and snap.lock_seconds >= 0
