"""Async client of the runtime's HTTP API in the pod: GET /train/status and POST /checkpoint, both with the
pod's bearer token.

Answers are parsed into the runtime's own models (``onlinemodel_protocol.api``): ``TrainStatus`` and
``CheckpointRecord``. An answer those models refuse is a RuntimeClientError.
"""

from __future__ import annotations

from typing import Optional, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from onlinemodel_protocol.api import CheckpointRecord, ErrorBody, TrainStatus


class RuntimeClientError(Exception):
    """The runtime could not be reached or answered badly."""


class RuntimeUnreachable(RuntimeClientError):
    """Connection refused, timed out, or an unparseable answer."""


class CheckpointBusy(RuntimeClientError):
    """409: a checkpoint is already running."""


class CheckpointFailed(RuntimeClientError):
    """The runtime refused or failed the checkpoint (4xx/5xx other than 409)."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(f"HTTP {status_code}: {message}")
        self.status_code = status_code


def _error_message(response: httpx.Response) -> str:
    try:
        return ErrorBody.model_validate_json(response.content).error.message
    except ValidationError:
        pass
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    # Not the runtime's own error shape: a proxy's, or FastAPI's {"detail": ...}.
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, str):
            return err
        if body.get("detail"):
            return str(body["detail"])
    return str(body)[:500]


Body = TypeVar("Body", bound=BaseModel)


def _parse(model: type[Body], response: httpx.Response) -> Body:
    """The body as `model`; ValueError if it is not JSON or not that shape."""
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        raise ValueError(f"unexpected answer {response.text[:200]!r}: {exc.error_count()} problem(s), first: "
                         f"{exc.errors(include_url=False)[0]['msg']}") from None


class RuntimeClient:
    """One runtime (pod) at `base_url`, e.g. http://10.1.2.3:8000."""

    def __init__(self, base_url: str, token: Optional[str] = None, *, timeout: float = 5.0,
                 transport: Optional[httpx.AsyncBaseTransport] = None) -> None:
        self.base_url = base_url.rstrip("/")
        # Stripped as the runtime strips it: a Secret made with --from-file ends with a newline.
        self.token = (token or "").strip() or None
        self.timeout = timeout
        self._transport = transport

    def _client(self, timeout: float) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        # trust_env=False: a proxy from the operator's environment must not sit between it and its pods.
        return httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout,
                                 transport=self._transport, trust_env=False)

    async def train_status(self) -> TrainStatus:
        try:
            async with self._client(self.timeout) as client:
                response = await client.get("/train/status")
        except httpx.HTTPError as exc:
            raise RuntimeUnreachable(f"{type(exc).__name__}: {exc}".rstrip(": ")) from exc
        if response.status_code != 200:
            raise RuntimeUnreachable(f"HTTP {response.status_code}: {_error_message(response)}")
        try:
            return _parse(TrainStatus, response)
        except ValueError as exc:
            raise RuntimeUnreachable(str(exc)) from None

    async def checkpoint(self, timeout: float = 600.0) -> CheckpointRecord:
        """POST /checkpoint and wait for it."""
        try:
            async with self._client(timeout) as client:
                response = await client.post("/checkpoint")
        except httpx.HTTPError as exc:
            raise RuntimeUnreachable(f"{type(exc).__name__}: {exc}".rstrip(": ")) from exc
        if response.status_code == 409:
            raise CheckpointBusy(_error_message(response))
        if response.status_code != 200:
            raise CheckpointFailed(response.status_code, _error_message(response))
        try:
            return _parse(CheckpointRecord, response)
        except ValueError as exc:
            raise CheckpointFailed(response.status_code, str(exc)) from None
