"""The trainer's ZMQ server: a ROUTER socket answering JSON requests from the vLLM API server.

Requests are ``[request_id, json]`` frames; each is handled in its own task so a long checkpoint does
not hold up status requests. Operations: ``ping``, ``status``, ``train``, ``checkpoint``, ``introspect``, ``debug_scale`` (tests
only, behind ``debug_ops``), ``shutdown``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any

import zmq
import zmq.asyncio

from onlinemodel_runtime.trainer import debug
from onlinemodel_runtime.trainer.service import TrainerError, TrainerService

log = logging.getLogger(__name__)


async def handle(service: TrainerService, request: dict[str, Any], stop: asyncio.Event) -> Any:
    op = request.get("op")
    if op == "ping":
        return {"pid": os.getpid()}
    if op == "status":
        return service.status()
    if op == "train":
        return service.submit(request)
    if op == "checkpoint":
        return await asyncio.to_thread(service.checkpoint)
    if op == "introspect":
        return debug.introspect(service.model)
    if op == "debug_scale":
        if not service.cfg.debug_ops:
            raise TrainerError("debug operations are disabled", code=403)
        return await asyncio.to_thread(service.debug_scale, request["name"], float(request["factor"]))
    if op == "shutdown":
        stop.set()
        return {"stopping": True}
    raise TrainerError(f"unknown operation {op!r}", code=400)


async def serve(service: TrainerService, endpoint: str, parent_pid: int | None = None) -> None:
    ctx = zmq.asyncio.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    stop = asyncio.Event()
    tasks: set[asyncio.Task] = set()

    async def answer(identity: bytes, rid: bytes, body: bytes) -> None:
        try:
            result = await handle(service, json.loads(body), stop)
            reply = {"ok": True, "result": result}
        except TrainerError as exc:
            reply = {"ok": False, "error": str(exc), "code": exc.code}
        except Exception as exc:  # answer every request, whatever happened
            log.exception("request failed")
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "code": 500}
        await sock.send_multipart([identity, rid, json.dumps(reply).encode()])

    async def watch_parent() -> None:
        # The trainer belongs to one vLLM API server: when it is gone, so are we.
        while parent_pid is not None:
            if os.getppid() != parent_pid:
                log.warning("parent process %d exited; trainer stopping", parent_pid)
                stop.set()
                return
            await asyncio.sleep(1.0)

    async def periodic_checkpoints() -> None:
        # While training, the training thread checks after each step; when idle, this does.
        while True:
            await asyncio.sleep(1.0)
            if service.checkpoint_due_by_time() and service.state == "idle":
                await asyncio.to_thread(service.periodic_checkpoint)

    async def receive() -> None:
        while True:
            frames = await sock.recv_multipart()
            if len(frames) != 3:  # not one of our clients: drop it, keep serving
                log.warning("dropping a malformed request (%d frames)", len(frames))
                continue
            identity, rid, body = frames
            task = asyncio.create_task(answer(identity, rid, body))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    background = [asyncio.create_task(c) for c in (receive(), watch_parent(), periodic_checkpoints())]
    log.info("trainer listening on %s", endpoint)
    try:
        await stop.wait()
        await asyncio.sleep(0.05)  # let the shutdown reply leave
    finally:
        for task in background:
            task.cancel()
        sock.close()
