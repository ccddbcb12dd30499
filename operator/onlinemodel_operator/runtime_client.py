"""The operator's view of the runtime's HTTP API in the pod: GET /train/status and POST /checkpoint, with the
pod's bearer token, through the project's one client (``onlinemodel_protocol.client``).

This module only names the outcomes the reconciler acts on: the runtime did not answer usefully
(``RuntimeUnreachable``), a checkpoint is already running (``CheckpointBusy``), or it refused or failed
the checkpoint (``CheckpointFailed``).
"""

from __future__ import annotations

from typing import Any, Optional

from onlinemodel_protocol.api import CheckpointRecord, TrainStatus
from onlinemodel_protocol.client import ApiError, AsyncClient, Unreachable, UnexpectedAnswer


class RuntimeClientError(Exception):
    """The runtime could not be reached or answered badly."""


class RuntimeUnreachable(RuntimeClientError):
    """Connection refused, timed out, an error status, or an unparseable answer."""


class CheckpointBusy(RuntimeClientError):
    """409: a checkpoint is already running."""


class CheckpointFailed(RuntimeClientError):
    """The runtime refused or failed the checkpoint (4xx/5xx other than 409)."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(f"HTTP {status_code}: {message}")
        self.status_code = status_code


class RuntimeClient:
    """One runtime (pod) at `base_url`, e.g. http://10.1.2.3:8000."""

    def __init__(self, base_url: str, token: Optional[str] = None, *, timeout: float = 5.0,
                 transport: Any = None) -> None:
        # trust_env=False: a proxy from the operator's environment must not sit between it and its pods.
        self._options = {"token": token, "timeout": timeout, "trust_env": False, "transport": transport}
        self.base_url = base_url

    def _client(self) -> AsyncClient:
        return AsyncClient(self.base_url, **self._options)

    async def train_status(self) -> TrainStatus:
        try:
            async with self._client() as client:
                return await client.status()
        except (Unreachable, ApiError) as exc:
            raise RuntimeUnreachable(str(exc)) from exc

    async def checkpoint(self, timeout: float = 600.0) -> CheckpointRecord:
        """POST /checkpoint and wait for it."""
        try:
            async with self._client() as client:
                return await client.checkpoint(timeout)
        except UnexpectedAnswer as exc:
            raise CheckpointFailed(exc.status_code, str(exc)) from exc
        except Unreachable as exc:
            raise RuntimeUnreachable(str(exc)) from exc
        except ApiError as exc:
            if exc.status_code == 409:
                raise CheckpointBusy(exc.message) from exc
            raise CheckpointFailed(exc.status_code, exc.message) from exc
