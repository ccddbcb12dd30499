"""The load signal: a 128-byte shared-memory file vLLM's API server writes and the trainer maps read-only.

The API server knows whether anyone waits for tokens (``inflight.py``) and how much training slows them
(``pacing_control.py``); the trainer needs both at every yield point of its forward and backward
(``trainer/pacing.py``), thousands of times per step. A file in the runtime's private state directory,
mapped by both, makes each read one memory load: no syscall, no message. The API server's event loop is
the only writer. Single 8-byte fields are read and written whole; a reader that wants several fields at
once (the status) takes a snapshot under the ``sequence`` counter (odd while the writer is writing).

Layout (native byte order, 8-byte slots): magic, sequence, in_flight, mode (int64); duty,
max_decode_slowdown, measured_slowdown, baseline_itl_seconds, tail_slowdown, baseline_tail_seconds,
recent_tail_seconds, slice_scale (float64, NaN: none); the rest is zero. "tail" is the quantile the budget
bounds (``limits.DECODE_SLOWDOWN_QUANTILE``).
"""

from __future__ import annotations

import math
import mmap
import os
import sys
from dataclasses import dataclass
from pathlib import Path

SIZE = 128
MAGIC = int.from_bytes(b"OMLOAD02", "little")
# int64 slots
_MAGIC, _SEQUENCE, _IN_FLIGHT, _MODE = 0, 1, 2, 3
# float64 slots
_DUTY, _BUDGET, _SLOWDOWN, _BASELINE, _TAIL_SLOWDOWN, _TAIL_BASELINE, _TAIL_RECENT, _SLICE_SCALE = range(4, 12)
MODES = ("off", "measured", "fixed")  # SchedulerMode of onlinemodel_protocol.api, by code


class LoadSignalError(RuntimeError):
    """The file is missing or is not a load signal."""


@dataclass(frozen=True)
class LoadSnapshot:
    """Every field at one moment."""

    in_flight: int
    mode: str
    duty: float
    max_decode_slowdown: float | None
    measured_slowdown: float | None
    baseline_itl_seconds: float | None
    tail_slowdown: float | None = None
    baseline_tail_seconds: float | None = None
    recent_tail_seconds: float | None = None
    slice_scale: float = 1.0


def _or_none(x: float) -> float | None:
    return None if math.isnan(x) else x


class _Mapped:
    def __init__(self, path: Path, writable: bool):
        flags = os.O_RDWR if writable else os.O_RDONLY
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise LoadSignalError(f"cannot open the load signal {path}: {exc}") from None
        try:
            if os.fstat(fd).st_size != SIZE:
                raise LoadSignalError(f"{path} is not a load signal ({os.fstat(fd).st_size} bytes)")
            self._map = mmap.mmap(fd, SIZE, prot=mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))
        finally:
            os.close(fd)
        self._ints = memoryview(self._map).cast("q")
        self._floats = memoryview(self._map).cast("d")
        if self._ints[_MAGIC] != MAGIC:
            self.close()
            raise LoadSignalError(f"{path} is not a load signal (bad magic)")

    @property
    def in_flight(self) -> int:
        return self._ints[_IN_FLIGHT]

    @property
    def duty(self) -> float:
        return self._floats[_DUTY]

    @property
    def slice_scale(self) -> float:
        return self._floats[_SLICE_SCALE]

    def snapshot(self) -> LoadSnapshot:
        # The writer never awaits inside an update, so a retry is rare and short; the bound only guards
        # against a writer killed half way (then its process group, this trainer included, is going too).
        for _ in range(1000):
            before = self._ints[_SEQUENCE]
            snap = LoadSnapshot(
                in_flight=self._ints[_IN_FLIGHT], mode=MODES[self._ints[_MODE]], duty=self._floats[_DUTY],
                max_decode_slowdown=_or_none(self._floats[_BUDGET]),
                measured_slowdown=_or_none(self._floats[_SLOWDOWN]),
                baseline_itl_seconds=_or_none(self._floats[_BASELINE]),
                tail_slowdown=_or_none(self._floats[_TAIL_SLOWDOWN]),
                baseline_tail_seconds=_or_none(self._floats[_TAIL_BASELINE]),
                recent_tail_seconds=_or_none(self._floats[_TAIL_RECENT]), slice_scale=self._floats[_SLICE_SCALE])
            if before % 2 == 0 and self._ints[_SEQUENCE] == before:
                return snap
            os.sched_yield()
        return snap

    def close(self) -> None:
        self._ints.release()
        self._floats.release()
        self._map.close()


class LoadSignalReader(_Mapped):
    """The trainer's read-only view: ``in_flight``, ``duty`` and ``slice_scale`` are one memory read each."""

    def __init__(self, path: Path):
        super().__init__(Path(path), writable=False)


class LoadSignalWriter(_Mapped):
    """The API server's side. ``create`` makes a fresh file (mode 0600 in the private state directory)."""

    @classmethod
    def create(cls, path: Path, *, mode: str, duty: float, max_decode_slowdown: float | None) -> LoadSignalWriter:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, SIZE)
            os.pwrite(fd, MAGIC.to_bytes(8, sys.byteorder), 0)
        finally:
            os.close(fd)
        writer = cls(tmp, writable=True)
        writer.publish(mode=mode, duty=duty, max_decode_slowdown=max_decode_slowdown)
        os.replace(tmp, path)  # a reader never maps a file whose fields are not set yet
        return writer

    @_Mapped.in_flight.setter
    def in_flight(self, value: int) -> None:
        self._ints[_IN_FLIGHT] = value

    def publish(self, *, mode: str, duty: float, max_decode_slowdown: float | None,
                measured_slowdown: float | None = None, baseline_itl_seconds: float | None = None,
                tail_slowdown: float | None = None, baseline_tail_seconds: float | None = None,
                recent_tail_seconds: float | None = None, slice_scale: float = 1.0) -> None:
        """Write the controller's fields as one consistent update (None: not measured)."""
        if not 0.0 <= duty <= 1.0:
            raise ValueError(f"duty {duty} is outside [0, 1]")
        if not 0.0 < slice_scale <= 1.0:
            raise ValueError(f"slice scale {slice_scale} is outside (0, 1]")
        self._ints[_SEQUENCE] += 1
        self._ints[_MODE] = MODES.index(mode)
        self._floats[_DUTY] = duty
        self._floats[_SLICE_SCALE] = slice_scale
        for slot, value in ((_BUDGET, max_decode_slowdown), (_SLOWDOWN, measured_slowdown),
                            (_BASELINE, baseline_itl_seconds), (_TAIL_SLOWDOWN, tail_slowdown),
                            (_TAIL_BASELINE, baseline_tail_seconds), (_TAIL_RECENT, recent_tail_seconds)):
            self._floats[slot] = math.nan if value is None else value
        self._ints[_SEQUENCE] += 1
