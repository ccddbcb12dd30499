"""A published weight version on the learner's disk, in the stream's own format.

The file *is* the HTTP stream (``onlinemodel_protocol.replication``): frames of [8-byte header length,
JSON header, raw tensor bytes], so the learner serves any tensor onwards with one seek and a follower
that lost its connection resumes at a frame. The frame headers do not depend on the values, so they are
written before the trainer pauses; under the weights lock only the tensor bytes are copied, straight into
the file's mapping (one copy, no second buffer in host memory). A version becomes visible when its
manifest (``latest.json``) is renamed into place; older versions are unlinked then (a reader that has one
open keeps reading it). At most one published version and one being written exist: the learner's extra
disk (or memory, for a tmpfs) is bounded by twice the trainable tensors' size.
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import torch

from onlinemodel_protocol.api import utc_timestamp
from onlinemodel_protocol.limits import FRAME_HEADER_MAX_BYTES
from onlinemodel_protocol.replication import FRAME_LENGTH_BYTES, FrameHeader, Snapshot, SnapshotTensor
from onlinemodel_runtime.checkpoint.fsutil import atomic_write_bytes
from onlinemodel_runtime.weights.shared import dtype_from_name, dtype_name

MANIFEST = "latest.json"


class FrameError(ValueError):
    """A stream that is not a sequence of well-formed frames."""


def stream_path(directory: Path, version: int) -> Path:
    return directory / f"v{version:012d}.frames"


def _encode_header(header: FrameHeader) -> bytes:
    raw = header.model_dump_json().encode()
    return len(raw).to_bytes(FRAME_LENGTH_BYTES, "little") + raw


class SnapshotWriter:
    """Writes one version: ``open`` (frame headers), ``copy`` (under the weights lock), ``commit``."""

    def __init__(self, directory: Path, version: int, tensors: Mapping[str, torch.Tensor]):
        self.directory = directory
        self.version = version
        self.started = time.perf_counter()
        self.entries: list[SnapshotTensor] = []
        headers: list[bytes] = []
        offset = 0
        for index, (name, t) in enumerate(tensors.items()):
            header = FrameHeader(index=index, name=name, dtype=dtype_name(t.dtype), shape=list(t.shape),
                                 nbytes=t.numel() * t.element_size())
            self.entries.append(SnapshotTensor(offset=offset, **header.model_dump()))
            headers.append(_encode_header(header))
            offset += len(headers[-1]) + header.nbytes
        self.total_bytes = offset
        self._data_offsets = [e.offset + len(h) for e, h in zip(self.entries, headers)]
        directory.mkdir(mode=0o700, exist_ok=True)
        for stale in directory.glob("*.partial"):  # a trainer that died mid-publication (one writer at a time)
            stale.unlink(missing_ok=True)
        self.path = stream_path(directory, version).with_suffix(".partial")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, max(self.total_bytes, 1))
            self._map = mmap.mmap(fd, max(self.total_bytes, 1))
        finally:
            os.close(fd)
        # Touch every page now, while training goes on: the copy under the lock then writes resident
        # memory instead of taking a page fault per 4 KiB.
        torch.frombuffer(self._map, dtype=torch.uint8).zero_()
        for entry, header in zip(self.entries, headers):
            self._map[entry.offset:entry.offset + len(header)] = header
        self.lock_seconds = 0.0

    def copy(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy the tensors' bytes into their frames; the caller holds the weights still meanwhile."""
        t0 = time.perf_counter()
        buffer = torch.frombuffer(self._map, dtype=torch.uint8)
        for entry, start in zip(self.entries, self._data_offsets):
            t = tensors[entry.name]
            buffer[start:start + entry.nbytes].copy_(t.detach().contiguous().view(-1).view(torch.uint8))
        del buffer
        self.lock_seconds = time.perf_counter() - t0

    def commit(self) -> Snapshot:
        """Make the version the published one and unlink the versions before it."""
        self._map.flush()
        self._map.close()
        final = stream_path(self.directory, self.version)
        os.replace(self.path, final)
        snapshot = Snapshot(weight_version=self.version, created_at=utc_timestamp(), tensors=self.entries,
                            total_bytes=self.total_bytes, lock_seconds=round(self.lock_seconds, 6),
                            write_seconds=round(time.perf_counter() - self.started, 6))
        atomic_write_bytes(self.directory / MANIFEST, snapshot.model_dump_json().encode())
        for old in self.directory.glob("v*.frames"):
            if old != final:
                old.unlink(missing_ok=True)
        return snapshot

    def abort(self) -> None:
        if not self._map.closed:
            self._map.close()
        self.path.unlink(missing_ok=True)


def read_manifest(directory: Path) -> Snapshot | None:
    try:
        return Snapshot.model_validate_json((directory / MANIFEST).read_bytes())
    except FileNotFoundError:
        return None


def open_stream(directory: Path, snapshot: Snapshot, start: int) -> BinaryIO:
    """The version's stream positioned at frame `start` (IndexError past the end; FileNotFoundError once
    a newer version replaced it)."""
    if not 0 <= start <= len(snapshot.tensors):
        raise IndexError(f"start {start} is outside 0..{len(snapshot.tensors)}")
    f = open(stream_path(directory, snapshot.weight_version), "rb")
    f.seek(snapshot.tensors[start].offset if start < len(snapshot.tensors) else snapshot.total_bytes)
    return f


def _read_exactly(stream: BinaryIO, n: int) -> bytearray:
    data = bytearray(n)
    view, done = memoryview(data), 0
    while done < n:
        got = stream.readinto(view[done:])
        if not got:
            raise EOFError(f"stream ended {n - done} bytes short")
        done += got
    return data


def read_frames(stream: BinaryIO) -> Iterator[tuple[FrameHeader, torch.Tensor]]:
    """Each frame of `stream` as (header, CPU tensor) until the stream ends cleanly between frames;
    EOFError if it ends inside one (a broken connection), FrameError if it is not a stream."""
    while True:
        first = stream.read(FRAME_LENGTH_BYTES)
        if not first:
            return
        length = int.from_bytes(first + _read_exactly(stream, FRAME_LENGTH_BYTES - len(first)), "little")
        if not 0 < length <= FRAME_HEADER_MAX_BYTES:
            raise FrameError(f"frame header of {length} bytes")
        try:
            header = FrameHeader.model_validate_json(_read_exactly(stream, length))
            dtype = dtype_from_name(header.dtype)
        except (ValueError, RuntimeError) as exc:
            raise FrameError(f"unreadable frame header: {exc}") from None
        expected = dtype.itemsize * int(torch.Size(header.shape).numel())
        if header.nbytes != expected:
            raise FrameError(f"{header.name}: {header.nbytes} bytes for shape {header.shape} of {header.dtype}")
        data = _read_exactly(stream, header.nbytes)
        tensor = torch.frombuffer(data, dtype=dtype) if header.nbytes else torch.empty(0, dtype=dtype)
        yield header, tensor.reshape(header.shape)
