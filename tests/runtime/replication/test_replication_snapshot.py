"""A published version on disk: the stream format round trip, resuming at a frame, bounded files."""

import io

import pytest
import torch

from onlinemodel_runtime.replication import snapshot as snapshots


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(3, 5, generator=g).to(torch.bfloat16),
            "b.weight": torch.randn(7, generator=g),
            "c.empty": torch.empty(0, 4, dtype=torch.float16)}


def _publish(directory, version, tensors):
    writer = snapshots.SnapshotWriter(directory, version, tensors)
    writer.copy(tensors)
    return writer.commit()


def test_round_trip_every_tensor_and_header(tmp_path):
    tensors = _tensors()
    snap = _publish(tmp_path, 7, tensors)
    assert snap.weight_version == 7 and [t.name for t in snap.tensors] == list(tensors)
    assert snapshots.read_manifest(tmp_path) == snap
    with snapshots.open_stream(tmp_path, snap, 0) as f:
        frames = list(snapshots.read_frames(f))
    assert [h.index for h, _ in frames] == [0, 1, 2]
    for (header, got), (name, want) in zip(frames, tensors.items()):
        assert header.name == name and got.dtype == want.dtype
        assert torch.equal(got, want)


def test_resume_at_a_frame(tmp_path):
    tensors = _tensors()
    snap = _publish(tmp_path, 1, tensors)
    with snapshots.open_stream(tmp_path, snap, 1) as f:
        assert [h.name for h, _ in snapshots.read_frames(f)] == ["b.weight", "c.empty"]
    with snapshots.open_stream(tmp_path, snap, 3) as f:
        assert list(snapshots.read_frames(f)) == []
    with pytest.raises(IndexError):
        snapshots.open_stream(tmp_path, snap, 4)


def test_values_are_those_copied_under_the_lock_not_later(tmp_path):
    tensors = _tensors()
    writer = snapshots.SnapshotWriter(tmp_path, 2, tensors)
    writer.copy(tensors)
    copied = tensors["b.weight"].clone()
    tensors["b.weight"].add_(1.0)  # a training step after the lock was released
    snap = writer.commit()
    with snapshots.open_stream(tmp_path, snap, 1) as f:
        _, got = next(snapshots.read_frames(f))
    assert torch.equal(got, copied) and not torch.equal(got, tensors["b.weight"])


def test_a_new_version_replaces_the_old_one_readers_keep_theirs(tmp_path):
    tensors = _tensors()
    old = _publish(tmp_path, 1, tensors)
    reader = snapshots.open_stream(tmp_path, old, 0)
    new = _publish(tmp_path, 2, {k: v + 1 for k, v in tensors.items()})
    assert snapshots.read_manifest(tmp_path).weight_version == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", snapshots.stream_path(tmp_path, 2).name]
    with reader:  # unlinked, still readable to the end
        assert len(list(snapshots.read_frames(reader))) == 3
    with pytest.raises(FileNotFoundError):
        snapshots.open_stream(tmp_path, old, 0)
    assert new.total_bytes == old.total_bytes


def test_abort_leaves_nothing_and_a_dead_writer_s_file_goes_with_the_next(tmp_path):
    writer = snapshots.SnapshotWriter(tmp_path, 3, _tensors())
    writer.abort()
    assert list(tmp_path.iterdir()) == []
    snapshots.SnapshotWriter(tmp_path, 4, _tensors())  # left behind, as by a killed trainer
    _publish(tmp_path, 5, _tensors())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", snapshots.stream_path(tmp_path, 5).name]


@pytest.mark.parametrize("cut", [3, 8 + 10, -5])
def test_a_broken_stream_is_an_eof_error(tmp_path, cut):
    snap = _publish(tmp_path, 1, _tensors())
    data = snapshots.stream_path(tmp_path, 1).read_bytes()
    with pytest.raises(EOFError):
        list(snapshots.read_frames(io.BytesIO(data[:cut])))
    assert snap.total_bytes == len(data)


def test_garbage_is_a_frame_error():
    with pytest.raises(snapshots.FrameError):
        list(snapshots.read_frames(io.BytesIO((10**9).to_bytes(8, "little") + b"x" * 20)))
    header = b'{"index": 0, "name": "x", "dtype": "float32", "shape": [2], "nbytes": 4}'
    with pytest.raises(snapshots.FrameError, match="4 bytes for shape"):
        list(snapshots.read_frames(io.BytesIO(len(header).to_bytes(8, "little") + header + b"\0" * 4)))
