"""Small durable-file helpers: full writes, fsync of files and directories, atomic small files."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

# Copy/hash buffers: large enough for full disk bandwidth, small enough to never matter for RAM.
COPY_CHUNK = 8 << 20
# Every new file: created here or nowhere, never through a symlink someone planted at its name.
NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW


def write_all(fd: int, data: memoryview | bytes) -> None:
    """os.write until every byte is out (a regular-file write can be short, e.g. near disk full)."""
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view)
        if written <= 0:  # pragma: no cover - the kernel reports errors by raising
            raise OSError(f"write returned {written}")
        view = view[written:]


def fsync_path(path: Path) -> None:
    """fsync a file or directory by path (a fresh fd flushes the inode's dirty pages too)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file, then every directory bottom-up, so names and data are both durable."""
    dirs: list[Path] = []
    for dirpath, _dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        dirs.append(base)
        for name in filenames:
            fsync_path(base / name)
    for directory in reversed(dirs):
        fsync_path(directory)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` atomically and durably: temp file, fsync, os.replace, fsync dir."""
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
    fd = os.open(tmp, NEW_FILE, mode)
    try:
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def copy_file_hashed(src: Path, dst: Path) -> tuple[int, str]:
    """Copy src to dst (new file), returning (size, sha256 hex) of what was written."""
    digest = hashlib.sha256()
    size = 0
    fd = os.open(dst, NEW_FILE, 0o644)
    try:
        with open(src, "rb") as fin:
            while chunk := fin.read(COPY_CHUNK):
                digest.update(chunk)
                write_all(fd, chunk)
                size += len(chunk)
    finally:
        os.close(fd)
    return size, digest.hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fin:
        while chunk := fin.read(COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class HashingFile:
    """A write-only file object that hashes and counts what passes through (for torch.save)."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, NEW_FILE, 0o644)
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._digest.update(view)
        write_all(self._fd, view)
        self.size += len(view)
        return len(view)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def __enter__(self) -> "HashingFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
