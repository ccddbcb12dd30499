"""Async client of the runtime's HTTP API in the pod: GET /train/status and POST /checkpoint."""

from __future__ import annotations

from typing import Any, Optional

import httpx


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
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if body.get("detail"):
            return str(body["detail"])
    return str(body)[:500]


class RuntimeClient:
    """One runtime (pod) at `base_url`, e.g. http://10.1.2.3:8000."""

    def __init__(self, base_url: str, token: Optional[str] = None, *, timeout: float = 5.0,
                 transport: Optional[httpx.AsyncBaseTransport] = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._transport = transport

    def _client(self, timeout: float) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        # trust_env=False: a proxy from the operator's environment must not sit between it and its pods.
        return httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout,
                                 transport=self._transport, trust_env=False)

    async def train_status(self) -> dict[str, Any]:
        try:
            async with self._client(self.timeout) as client:
                response = await client.get("/train/status")
        except httpx.HTTPError as exc:
            raise RuntimeUnreachable(f"{type(exc).__name__}: {exc}".rstrip(": ")) from exc
        if response.status_code != 200:
            raise RuntimeUnreachable(f"HTTP {response.status_code}: {_error_message(response)}")
        try:
            body = response.json()
        except ValueError as exc:
            raise RuntimeUnreachable(f"not JSON: {response.text[:200]!r}") from exc
        if not isinstance(body, dict):
            raise RuntimeUnreachable(f"unexpected answer: {body!r:.200}")
        return body

    async def checkpoint(self, timeout: float = 600.0) -> dict[str, Any]:
        """POST /checkpoint and wait for it; returns {"path", "step", "time", ...}."""
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
            body = response.json()
        except ValueError:
            body = {}
        return body if isinstance(body, dict) else {}
