"""A fake of the runtime's HTTP API for the operator tests: GET /health, GET /train/status and
POST /checkpoint with the runtime's answer shapes, recording the calls it gets."""

from __future__ import annotations

import asyncio
import socket
from typing import Any, Optional

from aiohttp import web

from onlinemodel_operator.clock import rfc3339, utcnow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeRuntime:
    """GET /health, GET /train/status, POST /checkpoint of the runtime contract, with recorded calls."""

    def __init__(self) -> None:
        self.port = free_port()
        self.train_status: dict[str, Any] = {
            "state": "idle", "steps": 0, "tokens_trained": 0, "last_loss": None, "weight_version": 0,
            "last_step_time": None, "jobs": [], "last_error": None,
            "checkpoint": {"state": "idle", "last": None, "last_error": None}}
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

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self.train_status)

    async def _checkpoint(self, request: web.Request) -> web.Response:
        self.checkpoint_calls.append({"authorization": request.headers.get("Authorization"), "time": rfc3339(utcnow())})
        await asyncio.sleep(self.checkpoint_delay)
        if self.checkpoint_error is not None:
            code, message = self.checkpoint_error
            return web.json_response({"error": {"message": message, "type": "server_error"}}, status=code)
        step = self.train_status.get("steps", 0)
        last = {"step": step, "weight_version": step, "time": rfc3339(utcnow()),
                "path": f"/var/lib/onlinemodel/checkpoints/step-{step:06d}", "size_bytes": 1, "seconds": 0.01}
        self.train_status["checkpoint"] = {"state": "idle", "last": last, "last_error": None}
        return web.json_response(last)

