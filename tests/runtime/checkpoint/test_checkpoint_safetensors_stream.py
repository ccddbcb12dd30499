"""The streaming safetensors writer against the reference reader (safetensors.torch)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from onlinemodel_runtime.checkpoint import (CheckpointError, SafetensorsStreamWriter, TensorSpec, read_header,
                                            specs_of, write_safetensors)


def _mixed_tensors() -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 10, generator=gen)
    return [
        ("a.bf16", torch.randn(7, 3, generator=gen).to(torch.bfloat16)),  # odd byte count: 42
        ("b.f32", torch.randn(5, generator=gen)),
        ("c.i64", torch.arange(9)),
        ("d.bool", torch.tensor([True, False, True])),
        ("e.scalar", torch.tensor(3.5, dtype=torch.float16)),
        ("f.empty", torch.empty(0, 4)),
        ("g.noncontig", base.t()),  # transposed view
        ("h.rows", base[2:5]),  # a row slice view (how packed qkv weights are un-merged)
    ]


def test_single_file_round_trip_and_hash(tmp_path: Path) -> None:
    pairs = _mixed_tensors()
    result = write_safetensors(tmp_path, pairs, chunk_bytes=16)  # tiny chunks: many writes per tensor
    assert [f.name for f in result.files] == ["model.safetensors"] and result.index is None
    loaded = load_file(tmp_path / "model.safetensors")
    assert set(loaded) == {n for n, _ in pairs}
    for name, tensor in pairs:
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    data = (tmp_path / "model.safetensors").read_bytes()
    assert result.files[0].sha256 == hashlib.sha256(data).hexdigest()
    assert result.files[0].size == len(data)
    header, size = read_header(tmp_path / "model.safetensors")
    assert header["__metadata__"] == {"format": "pt"} and size == len(data)
    assert int.from_bytes(data[:8], "little") % 8 == 0  # header padded to 8 bytes


def test_shards_and_index(tmp_path: Path) -> None:
    pairs = [(f"t{i}", torch.full((100,), float(i))) for i in range(7)]  # 400 bytes each
    result = write_safetensors(tmp_path, pairs, max_shard_bytes=1000)
    names = [f.name for f in result.files]
    assert names == [f"model-0000{k}-of-00004.safetensors" for k in range(1, 5)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 7 * 400
    assert index["weight_map"]["t0"] == names[0] and index["weight_map"]["t6"] == names[3]
    for name, tensor in pairs:
        assert torch.equal(load_file(tmp_path / index["weight_map"][name])[name], tensor)
    # A tensor bigger than the shard size gets a shard of its own.
    (tmp_path / "big").mkdir()
    big = write_safetensors(tmp_path / "big", [("x", torch.zeros(10)), ("y", torch.zeros(1000))],
                            max_shard_bytes=100)
    assert len(big.files) == 2


def test_streams_one_tensor_at_a_time(tmp_path: Path) -> None:
    """Each tensor's bytes are on disk before the next tensor is even requested."""
    pairs = [(f"t{i}", torch.full((1000,), float(i))) for i in range(5)]
    specs = specs_of(pairs)
    path = tmp_path / "model.safetensors"

    def lazy():
        for i, pair in enumerate(pairs):
            if i:
                header_len = 8 + int.from_bytes(path.read_bytes()[:8], "little")
                assert path.stat().st_size == header_len + i * 4000
            yield pair

    write_safetensors(tmp_path, lazy(), specs)
    assert torch.equal(load_file(path)["t4"], pairs[4][1])


def test_bad_streams_are_rejected(tmp_path: Path) -> None:
    pairs = [("a", torch.zeros(2)), ("b", torch.zeros(3))]
    specs = specs_of(pairs)
    for sub in "123":
        (tmp_path / sub).mkdir()
    with pytest.raises(CheckpointError, match="spec order"):
        write_safetensors(tmp_path / "1", reversed(pairs), specs)
    with pytest.raises(CheckpointError, match="spec says"):
        write_safetensors(tmp_path / "2", [("a", torch.zeros(2)), ("b", torch.zeros(4))], specs)
    with pytest.raises(CheckpointError, match="never arrived"):
        write_safetensors(tmp_path / "3", pairs[:1], specs)
    with pytest.raises(CheckpointError, match="duplicate"):
        SafetensorsStreamWriter(tmp_path, [TensorSpec("a", torch.float32, (1,))] * 2)
    with pytest.raises(CheckpointError, match="no tensors"):
        SafetensorsStreamWriter(tmp_path, [])


def test_read_header_detects_truncation(tmp_path: Path) -> None:
    write_safetensors(tmp_path, [("a", torch.zeros(100))])
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-1])
    with pytest.raises(CheckpointError, match="header describes"):
        read_header(path)
    path.write_bytes(data[:20])
    with pytest.raises(CheckpointError):
        read_header(path)
    path.write_bytes(b"\x10" + b"\x00" * 7 + b"not json" + b" " * 8)
    with pytest.raises(CheckpointError, match="JSON"):
        read_header(path)
