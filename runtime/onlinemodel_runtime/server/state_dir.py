"""The runtime's private state directory: the weights manifest, the CUDA IPC handles, the trainer's socket.

Whoever can write there can feed the trainer weights to attach to or talk to its socket, so it must be
ours alone: a fresh ``mkdtemp`` (0700) by default; a directory named with ``--state-dir`` is created
0700 if missing and otherwise refused unless it is a real directory (not a symlink) owned by this
process's user with no group or other access.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

PREFIX = "onlinemodel-"


class StateDirError(ValueError):
    """The state directory is not private to this user."""


def make_state_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix=PREFIX))


def ensure_private_dir(path: Path) -> Path:
    """`path`, created 0700 if missing; StateDirError unless it is this user's alone."""
    path = Path(path)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise StateDirError(f"cannot create state directory {path}: {exc.strerror}") from exc
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise StateDirError(f"state directory {path} is not a directory (symlinks are refused)")
    if info.st_uid != os.geteuid():
        raise StateDirError(f"state directory {path} is owned by uid {info.st_uid}, not by this server's "
                            f"uid {os.geteuid()}")
    if info.st_mode & 0o077:
        raise StateDirError(f"state directory {path} has mode {stat.S_IMODE(info.st_mode):o}: group and "
                            f"others must have no access (chmod 700 {path})")
    return path
