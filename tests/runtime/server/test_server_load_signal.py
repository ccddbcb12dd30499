"""The load signal file: what the API server writes, the trainer reads, through two real mappings."""

from __future__ import annotations

import os
import stat

import pytest

from onlinemodel_runtime.server.load_signal import (
    SIZE,
    LoadSignalError,
    LoadSignalReader,
    LoadSignalWriter,
    LoadSnapshot,
)


def test_round_trip(tmp_path):
    path = tmp_path / "load-signal"
    writer = LoadSignalWriter.create(path, mode="measured", duty=0.2, max_decode_slowdown=1.25)
    reader = LoadSignalReader(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and os.path.getsize(path) == SIZE
    assert reader.snapshot() == LoadSnapshot(in_flight=0, mode="measured", duty=0.2, max_decode_slowdown=1.25,
                                             measured_slowdown=None, baseline_itl_seconds=None)
    writer.in_flight = 3
    figures = dict(measured_slowdown=1.1, baseline_itl_seconds=0.0047, tail_slowdown=1.2,
                   baseline_tail_seconds=0.0053, recent_tail_seconds=0.0061)
    writer.publish(mode="fixed", duty=0.5, max_decode_slowdown=2.0, slice_scale=0.25, **figures)
    assert (reader.in_flight, reader.duty, reader.slice_scale) == (3, 0.5, 0.25)
    assert reader.snapshot() == LoadSnapshot(in_flight=3, mode="fixed", duty=0.5, max_decode_slowdown=2.0,
                                             slice_scale=0.25, **figures)
    writer.publish(mode="off", duty=1.0, max_decode_slowdown=None)  # unmeasured figures: None, slice: whole
    snap = reader.snapshot()
    assert (snap.mode, snap.max_decode_slowdown, snap.tail_slowdown, snap.slice_scale) == ("off", None, None, 1.0)
    # A second writer (a restarted API server) replaces the file; a new reader sees the fresh one.
    LoadSignalWriter.create(path, mode="measured", duty=0.3, max_decode_slowdown=1.5)
    assert LoadSignalReader(path).snapshot().duty == 0.3
    reader.close()
    writer.close()


def test_reader_cannot_write(tmp_path):
    LoadSignalWriter.create(tmp_path / "s", mode="measured", duty=1.0, max_decode_slowdown=1.25)
    reader = LoadSignalReader(tmp_path / "s")
    with pytest.raises(AttributeError):
        reader.in_flight = 1
    with pytest.raises(TypeError):
        reader._ints[2] = 1  # the mapping itself is read-only


def test_missing_or_foreign_files_are_refused(tmp_path):
    with pytest.raises(LoadSignalError, match="cannot open"):
        LoadSignalReader(tmp_path / "missing")
    (tmp_path / "short").write_bytes(b"x" * 10)
    with pytest.raises(LoadSignalError, match="10 bytes"):
        LoadSignalReader(tmp_path / "short")
    (tmp_path / "foreign").write_bytes(b"\0" * SIZE)
    with pytest.raises(LoadSignalError, match="bad magic"):
        LoadSignalReader(tmp_path / "foreign")


def test_duty_outside_0_1_and_slice_scale_outside_0_1_are_refused(tmp_path):
    writer = LoadSignalWriter.create(tmp_path / "s", mode="measured", duty=1.0, max_decode_slowdown=1.25)
    with pytest.raises(ValueError, match="duty"):
        writer.publish(mode="measured", duty=1.5, max_decode_slowdown=1.25)
    with pytest.raises(ValueError, match="slice scale"):
        writer.publish(mode="measured", duty=0.5, max_decode_slowdown=1.25, slice_scale=0.0)
