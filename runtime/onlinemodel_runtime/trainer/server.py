"""The trainer's ZMQ server: a ROUTER socket answering the vLLM API server's requests.

Requests are ``[request_id, json]`` frames holding an operation of ``onlinemodel_protocol.rpc`` and its
arguments, validated against ``OPS`` before they reach the service; each is handled in its own task so a
long checkpoint does not hold up status requests. ``debug_scale`` (tests only) needs ``debug_ops``.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import logging
import os
import sys
from typing import Any, Callable

import zmq
import zmq.asyncio
from pydantic import ValidationError

from onlinemodel_protocol.config import RuntimeConfig
from onlinemodel_protocol.rpc import EXIT_PERMANENT, OPS, Counters, TrainerOp, TrainerReply, WorkerShard
from onlinemodel_runtime.trainer import debug
from onlinemodel_runtime.trainer.service import TrainerError, TrainerService

log = logging.getLogger(__name__)


async def handle(service: TrainerService, request: dict[str, Any], stop: asyncio.Event) -> Any:
    name = request.pop("op", None)
    try:
        op = TrainerOp(name)
    except ValueError:
        raise TrainerError(f"unknown operation {name!r}", code=400) from None
    spec = OPS[op]
    try:
        args = spec.args.model_validate(request) if spec.args is not None else None
    except ValidationError as exc:
        raise TrainerError(f"bad arguments for {op.value!r}: {exc}", code=400) from None
    if op is TrainerOp.PING:
        return {"pid": os.getpid()}
    if op is TrainerOp.STATUS:
        return service.status()
    if op is TrainerOp.TRAIN:
        return service.submit(args)
    if op is TrainerOp.CANCEL:
        return service.cancel(args.job_id)
    if op is TrainerOp.CHECKPOINT:
        return await asyncio.to_thread(service.checkpoint)
    if op is TrainerOp.ROLLBACK:
        return await asyncio.to_thread(service.rollback_to, args.to)
    if op is TrainerOp.PUBLISH:
        return await asyncio.to_thread(service.publish, args.directory)
    if op is TrainerOp.INTROSPECT:
        return debug.introspect(service.model)
    if op is TrainerOp.DEBUG_SCALE:
        if not service.cfg.debug_ops:
            raise TrainerError("debug operations are disabled", code=403)
        return await asyncio.to_thread(service.debug_scale, args.name, args.factor)
    if op is TrainerOp.SHUTDOWN:
        stop.set()
        return {"stopping": True}
    raise TrainerError(f"operation {op.value!r} has no handler", code=500)


async def serve(service: TrainerService, endpoint: str, parent_pid: int | None = None) -> None:
    ctx = zmq.asyncio.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    stop = asyncio.Event()
    tasks: set[asyncio.Task] = set()

    async def answer(identity: bytes, rid: bytes, body: bytes) -> None:
        try:
            request = json.loads(body)
            if not isinstance(request, dict):
                raise TrainerError("a request is a JSON object", code=400)
            reply = TrainerReply(ok=True, result=await handle(service, request, stop))
        except TrainerError as exc:
            reply = TrainerReply(ok=False, error=str(exc), code=exc.code)
        except Exception as exc:  # answer every request, whatever happened
            log.exception("request failed")
            reply = TrainerReply(ok=False, error=f"{type(exc).__name__}: {exc}", code=500)
        await sock.send_multipart([identity, rid, reply.model_dump_json().encode()])

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
    log.info("listening on %s", endpoint)
    try:
        await stop.wait()
        await asyncio.sleep(0.05)  # let the shutdown reply leave
    finally:
        for task in background:
            task.cancel()
        sock.close()


def run_process(role: str, build_service: Callable[[RuntimeConfig, Counters | None], Any],
                argv: list[str] | None = None) -> int:
    """The main of a process the supervisor starts (the trainer, or a follower's writer): build its service
    from ``--config`` (EXIT_PERMANENT if that fails: restarting will not help), then answer requests until
    the parent exits or asks it to stop."""
    parser = argparse.ArgumentParser(prog=f"onlinemodel-{role}")
    parser.add_argument("--config", required=True, help="RuntimeConfig as JSON")
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--counters", default=None, help="counters the supervisor saw before a restart (JSON)")
    parser.add_argument("--shard", default=None, help="tensor parallelism: this process's WorkerShard (JSON)")
    parser.add_argument("--tp-init", default=None, help="tensor parallelism: the group's torch.distributed init URL")
    args = parser.parse_args(argv)
    faulthandler.enable()  # a native crash (a signal) still leaves every thread's Python stack in the log
    shard = WorkerShard.model_validate_json(args.shard) if args.shard else WorkerShard()
    logging.basicConfig(level=logging.INFO, format=f"[onlinemodel {role} %(process)d rank {shard.tp_rank}] "
                                                   "%(levelname)s %(message)s")
    cfg = RuntimeConfig.model_validate_json(args.config)
    parent_pid = args.parent_pid or os.getppid()
    try:
        service = build_service(cfg, Counters.model_validate_json(args.counters) if args.counters else None,
                                **({"shard": shard, "tp_init": args.tp_init} if shard.tp_size > 1 else {}))
    except Exception as exc:
        log.exception("%s failed to start", role)
        print(f"onlinemodel {role}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_PERMANENT
    if shard.tp_rank > 0:  # no socket: it runs what rank 0 runs (trainer/tp_group.py)
        return service.follow(parent_pid)
    service.start()
    asyncio.run(serve(service, cfg.trainer_endpoint, parent_pid=parent_pid))
    service.stop()
    return 0
