"""A fake of the runtime's HTTP API for the operator tests: GET /health, GET /train/status and
POST /checkpoint, answering full bodies of the runtime's own models (onlinemodel_protocol.api), asking for the
bearer token like the runtime does once one is set, and recording the calls it gets."""

from __future__ import annotations

import asyncio
from typing import Any, Optional

from aiohttp import web

from onlinemodel_protocol.api import (
    CheckpointRecord,
    CheckpointStatus,
    ErrorBody,
    ErrorDetail,
    TrainStatus,
    utc_timestamp,
)
from onlinemodel_runtime.devtools.launcher import free_port


class FakeRuntime:
    """GET /health, GET /train/status, POST /checkpoint of the runtime contract, with recorded calls."""

    def __init__(self) -> None:
        self.port = free_port()
        # Fields of GET /train/status a test changes (a TrainStatus's, validated on every answer).
        self.train_status: dict[str, Any] = {"state": "idle", "checkpoint": {"state": "idle"}}
        self.token: Optional[str] = None  # once set, every route but /health needs "Bearer <token>"
        self.status_calls: list[Optional[str]] = []  # the Authorization header of each GET /train/status
        self.checkpoint_calls: list[dict[str, Any]] = []
        self.checkpoint_error: Optional[tuple[int, str]] = None
        self.checkpoint_delay = 0.0  # seconds POST /checkpoint takes
        self._runner: Optional[web.AppRunner] = None

    async def __aenter__(self) -> "FakeRuntime":
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/train/status", self._status)
        app.router.add_post("/checkpoint", self._checkpoint)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    @staticmethod
    def _error(status: int, message: str, type_: str) -> web.Response:
        body = ErrorBody(error=ErrorDetail(message=message, type=type_))
        return web.json_response(body.model_dump(mode="json", exclude_none=True), status=status)

    def _refused(self, request: web.Request) -> Optional[web.Response]:
        if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
            return self._error(401, "missing or wrong bearer token", "authentication_error")
        return None

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def _status(self, request: web.Request) -> web.Response:
        self.status_calls.append(request.headers.get("Authorization"))
        refused = self._refused(request)
        if refused is not None:
            return refused
        return web.json_response(TrainStatus.model_validate(self.train_status).model_dump(mode="json"))

    async def _checkpoint(self, request: web.Request) -> web.Response:
        self.checkpoint_calls.append({"authorization": request.headers.get("Authorization"), "time": utc_timestamp()})
        refused = self._refused(request)
        if refused is not None:
            return refused
        await asyncio.sleep(self.checkpoint_delay)
        if self.checkpoint_error is not None:
            code, message = self.checkpoint_error
            return self._error(code, message, "server_error")
        step = self.train_status.get("steps", 0)
        last = CheckpointRecord(step=step, weight_version=step, time=utc_timestamp(),
                                path=f"/var/lib/onlinemodel/checkpoints/step-{step:08d}", size_bytes=1,
                                seconds=0.01, content_hash="sha256:" + "0" * 64)
        self.train_status["checkpoint"] = CheckpointStatus(state="idle", last=last).model_dump(mode="json")
        return web.json_response(last.model_dump(mode="json"))
