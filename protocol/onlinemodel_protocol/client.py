"""A typed client of the training routes (docs/api.md): ``Client`` (sync) and ``AsyncClient`` (async).

Every answer is parsed into its model of ``onlinemodel_protocol.api``; every refusal raises ``ApiError``
with the server's status, message, ``code`` and ``param``, and a connection failure or an answer the models
refuse raises ``Unreachable``. With ``retry_seconds`` > 0 a 503 or 429 is retried after the server's
``Retry-After`` until that much time has passed (a trainer that is still starting, a full queue).

It lives in the protocol package (pydantic and httpx only) so that ``onlinemodel train`` and the operator,
which must not import torch or vLLM, use the same implementation. The two classes differ only in how they
send: each route is described once (``_Call``) and each answer is read once (``_read``).

    from onlinemodel_protocol.client import Client
    with Client("http://127.0.0.1:8000", token) as om:
        job = om.train([{"messages": [...]}], epochs=3, idempotency_key="seedcorp-1")
        print(om.job(job.job_id).steps_done)
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Generic, Mapping, Sequence, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from onlinemodel_protocol.api import CheckpointRecord, ErrorBody, Job, TrainAccepted, TrainLimits, TrainStatus

Answer = TypeVar("Answer", bound=BaseModel)
RETRIED_STATUSES = (429, 503)
DEFAULT_RETRY_AFTER = 1.0  # seconds, when a 503/429 names none (a proxy's)


class ClientError(Exception):
    """The request did not produce the expected answer."""


class Unreachable(ClientError):
    """No answer: connection refused or timed out, or an answer that is not the API's shape."""


class UnexpectedAnswer(Unreachable):
    """An answer (`status_code`) that is not the shape the API's model for it says."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code


class ApiError(ClientError):
    """The server refused the request (4xx/5xx); the fields are those of its OpenAI-shaped error."""

    def __init__(self, status_code: int, message: str, code: str | None = None, param: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status_code}: {message}")
        self.status_code = status_code
        self.message = message
        self.code = code
        self.param = param
        self.retry_after = retry_after


@dataclass(frozen=True)
class _Call(Generic[Answer]):
    method: str
    path: str
    answer: type[Answer]
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout: float | None = None  # None: the client's


def _train(examples: Sequence[Mapping[str, Any]], epochs: int | None, learning_rate: float | None,
           idempotency_key: str | None) -> _Call[TrainAccepted]:
    body: dict[str, Any] = {"examples": list(examples)}
    if epochs is not None:
        body["epochs"] = epochs
    if learning_rate is not None:
        body["learning_rate"] = learning_rate
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    return _Call("POST", "/train", TrainAccepted, body, headers)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    try:
        return max(float(value), 0.0)
    except ValueError:
        return None  # absent, or an HTTP date (not sent by this API)


def _error(response: httpx.Response) -> ApiError:
    retry = _retry_after(response)
    try:
        detail = ErrorBody.model_validate_json(response.content).error
        return ApiError(response.status_code, detail.message, detail.code, detail.param, retry)
    except ValidationError:
        pass
    try:  # not the runtime's own shape: a proxy's, or FastAPI's {"detail": ...}
        body = response.json()
    except ValueError:
        return ApiError(response.status_code, response.text[:500] or response.reason_phrase, retry_after=retry)
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, str):
            return ApiError(response.status_code, err, retry_after=retry)
        if body.get("detail"):
            return ApiError(response.status_code, str(body["detail"]), retry_after=retry)
    return ApiError(response.status_code, str(body)[:500], retry_after=retry)


def _read(call: _Call[Answer], response: httpx.Response) -> Answer:
    if response.status_code >= 400:
        raise _error(response)
    try:
        return call.answer.model_validate_json(response.content)
    except ValidationError as exc:
        raise UnexpectedAnswer(response.status_code, f"unexpected answer to {call.method} {call.path}: {response.text[:200]!r}: "
                          f"{exc.errors(include_url=False)[0]['msg']}") from None


def _unreachable(exc: httpx.HTTPError) -> Unreachable:
    return Unreachable(f"{type(exc).__name__}: {exc}".rstrip(": "))


def _wait(error: ApiError, deadline: float) -> float | None:
    """Seconds to wait before retrying `error`, or None when it is not retried (or time is up)."""
    if error.status_code not in RETRIED_STATUSES:
        return None
    delay = error.retry_after if error.retry_after is not None else DEFAULT_RETRY_AFTER
    return delay if time.monotonic() + delay <= deadline else None


@functools.lru_cache(maxsize=2)
def _verifying_context(trust_env: bool) -> ssl.SSLContext:
    """The context httpx would build (certifi's CAs, or SSL_CERT_FILE / SSL_CERT_DIR with trust_env), built
    once per process: a client per request (the operator's poll of every pod) otherwise parses the CA bundle
    each time, ~130 ms of CPU on a busy 2-core machine against 0.2 ms with this one."""
    return httpx.create_ssl_context(trust_env=trust_env)


class _Base:
    def __init__(self, base_url: str, token: str | None = None, *, timeout: float = 30.0,
                 retry_seconds: float = 0.0, trust_env: bool = True, transport: Any = None) -> None:
        self.base_url = base_url.rstrip("/")
        # Stripped as the server strips it: a Secret made with --from-file ends with a newline.
        self.token = (token or "").strip() or None
        self.timeout = timeout
        self.retry_seconds = retry_seconds
        self._options = {"base_url": self.base_url, "timeout": timeout, "trust_env": trust_env,
                         "transport": transport, "verify": _verifying_context(trust_env),
                         "headers": {"Authorization": f"Bearer {self.token}"} if self.token else {}}

    @staticmethod
    def _request_args(call: _Call) -> dict[str, Any]:
        args: dict[str, Any] = {"headers": dict(call.headers)}
        if call.body is not None:
            args["json"] = call.body
        if call.timeout is not None:
            args["timeout"] = call.timeout
        return args


class Client(_Base):
    """Synchronous client; a context manager (or call ``close()``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._http = httpx.Client(**self._options)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _run(self, call: _Call[Answer]) -> Answer:
        deadline = time.monotonic() + self.retry_seconds
        while True:
            try:
                return _read(call, self._http.request(call.method, call.path, **self._request_args(call)))
            except httpx.HTTPError as exc:
                raise _unreachable(exc) from exc
            except ApiError as exc:
                delay = _wait(exc, deadline)
                if delay is None:
                    raise
                time.sleep(delay)

    def train(self, examples: Sequence[Mapping[str, Any]], *, epochs: int | None = None,
              learning_rate: float | None = None, idempotency_key: str | None = None) -> TrainAccepted:
        return self._run(_train(examples, epochs, learning_rate, idempotency_key))

    def status(self) -> TrainStatus:
        return self._run(_Call("GET", "/train/status", TrainStatus))

    def limits(self) -> TrainLimits:
        return self._run(_Call("GET", "/train/limits", TrainLimits))

    def job(self, job_id: str) -> Job:
        return self._run(_Call("GET", f"/train/jobs/{job_id}", Job))

    def cancel(self, job_id: str) -> Job:
        return self._run(_Call("DELETE", f"/train/jobs/{job_id}", Job))

    def checkpoint(self, timeout: float = 600.0) -> CheckpointRecord:
        """``POST /checkpoint``: answers when the checkpoint is durable."""
        return self._run(_Call("POST", "/checkpoint", CheckpointRecord, timeout=timeout))


class AsyncClient(_Base):
    """Asynchronous client; an async context manager (or ``await aclose()``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._http = httpx.AsyncClient(**self._options)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _run(self, call: _Call[Answer]) -> Answer:
        deadline = time.monotonic() + self.retry_seconds
        while True:
            try:
                return _read(call, await self._http.request(call.method, call.path, **self._request_args(call)))
            except httpx.HTTPError as exc:
                raise _unreachable(exc) from exc
            except ApiError as exc:
                delay = _wait(exc, deadline)
                if delay is None:
                    raise
                await asyncio.sleep(delay)

    async def train(self, examples: Sequence[Mapping[str, Any]], *, epochs: int | None = None,
                    learning_rate: float | None = None, idempotency_key: str | None = None) -> TrainAccepted:
        return await self._run(_train(examples, epochs, learning_rate, idempotency_key))

    async def status(self) -> TrainStatus:
        return await self._run(_Call("GET", "/train/status", TrainStatus))

    async def limits(self) -> TrainLimits:
        return await self._run(_Call("GET", "/train/limits", TrainLimits))

    async def job(self, job_id: str) -> Job:
        return await self._run(_Call("GET", f"/train/jobs/{job_id}", Job))

    async def cancel(self, job_id: str) -> Job:
        return await self._run(_Call("DELETE", f"/train/jobs/{job_id}", Job))

    async def checkpoint(self, timeout: float = 600.0) -> CheckpointRecord:
        """``POST /checkpoint``: answers when the checkpoint is durable."""
        return await self._run(_Call("POST", "/checkpoint", CheckpointRecord, timeout=timeout))
