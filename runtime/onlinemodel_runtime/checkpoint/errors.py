"""Errors raised by the checkpoint package."""

from __future__ import annotations

import errno as _errno


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, read or validated.

    Raised only after any partial output was removed: the previous checkpoint is untouched.
    """


class CheckpointBusy(CheckpointError):
    """Another save into the same checkpoint directory is running (this process or another)."""


class CheckpointNotFound(CheckpointError):
    """No checkpoint of the store answers to the name or step asked for."""


class CheckpointUnusable(CheckpointError):
    """The checkpoint asked for exists but must not be used (unhealthy, incomplete, corrupt)."""


_SPACE_ERRNOS = {_errno.ENOSPC, _errno.EDQUOT, _errno.EFBIG}
_ACCESS_ERRNOS = {_errno.EACCES, _errno.EPERM, _errno.EROFS, _errno.ENOTDIR}


def describe_os_error(exc: OSError) -> str:
    """A short human reason for an OSError, naming disk-full and not-writable cases plainly."""
    name = _errno.errorcode.get(exc.errno or 0, str(exc.errno))
    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno in _SPACE_ERRNOS:
        return f"no space left for the checkpoint: {exc.strerror or exc} [{name}]{where}"
    if exc.errno in _ACCESS_ERRNOS:
        return f"checkpoint directory is not writable: {exc.strerror or exc} [{name}]{where}"
    return f"{exc.strerror or exc} [{name}]{where}"
