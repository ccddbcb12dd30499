"""Async ZMQ client the API server uses to talk to the trainer (DEALER to the trainer's ROUTER).

Requests and answers are those of ``onlinemodel_protocol.rpc``; results come back as its models.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import zmq
import zmq.asyncio
from pydantic import ValidationError

from onlinemodel_protocol.rpc import OPS, TrainerOp, TrainerReply


class TrainerUnavailable(RuntimeError):
    """The trainer did not answer (not started, restarting, or dead)."""


class TrainerRequestError(RuntimeError):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class TrainerClient:
    def __init__(self, endpoint: str):
        self._endpoint = endpoint
        self._ctx = zmq.asyncio.Context.instance()
        self._sock: zmq.asyncio.Socket | None = None
        self._ids = itertools.count(1)
        self._pending: dict[bytes, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None

    def _ensure(self) -> zmq.asyncio.Socket:
        if self._sock is None:
            self._sock = self._ctx.socket(zmq.DEALER)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.connect(self._endpoint)
            self._reader = asyncio.create_task(self._read())
        return self._sock

    async def _read(self) -> None:
        assert self._sock is not None
        while True:
            frames = await self._sock.recv_multipart()
            if len(frames) != 2:
                continue
            rid, body = frames
            fut = self._pending.pop(rid, None)
            if fut is not None and not fut.done():
                try:
                    fut.set_result(TrainerReply.model_validate_json(body))
                except ValidationError as exc:
                    fut.set_exception(TrainerUnavailable(f"unreadable answer from the trainer: {exc}"))

    async def request(self, op: TrainerOp | str, timeout: float = 10.0, **args: Any) -> Any:
        """Send `op` with its arguments (the fields of ``OPS[op].args``); return its result, as
        ``OPS[op].result`` where the protocol names one, else as plain JSON."""
        op = TrainerOp(op)
        sock = self._ensure()
        rid = str(next(self._ids)).encode()
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        await sock.send_multipart([rid, json.dumps({"op": op.value, **args}).encode()])
        try:
            reply = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            self._pending.pop(rid, None)
            raise TrainerUnavailable(f"trainer did not answer {op.value!r} within {timeout:.0f}s") from None
        if not reply.ok:
            raise TrainerRequestError(reply.error or "trainer error", reply.code)
        result_model = OPS[op].result
        if result_model is None:
            return reply.result
        try:
            return result_model.model_validate(reply.result)
        except ValidationError as exc:
            raise TrainerUnavailable(f"unreadable {op.value!r} answer from the trainer: {exc}") from None

    def reset(self) -> None:
        """Drop the connection (after a trainer restart) and fail whatever was waiting."""
        if self._reader is not None:
            self._reader.cancel()
        if self._sock is not None:
            self._sock.close()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(TrainerUnavailable("trainer restarted"))
        self._pending.clear()
        self._sock = None
        self._reader = None
