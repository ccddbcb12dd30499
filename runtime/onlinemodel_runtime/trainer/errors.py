"""What the trainer's operations raise."""

from __future__ import annotations


class TrainerError(RuntimeError):
    """A refused or failed operation; `code` is the HTTP status the API server answers with."""

    def __init__(self, message: str, code: int = 500):
        super().__init__(message)
        self.code = code


class JobRolledBack(Exception):
    """Raised in the training thread once the guard has undone the running job."""
