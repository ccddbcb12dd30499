"""The ``vllm.endpoint_plugins`` entry: ``POST /train``, ``GET /train/status``, ``GET /train/limits``,
``GET`` and ``DELETE /train/jobs/{id}``, ``POST /checkpoint``, ``POST /rollback``, scaling out's routes
(``replication/routes.py``); and the training metrics on vLLM's ``/metrics``.

The routes live on vLLM's own FastAPI app, on the port that serves ``/v1/chat/completions``. A
``POST /train`` is validated and tokenized here (``server/train_request.py``: bad input gets a 4xx before
anything is queued, cheap checks before expensive ones) into a ``TrainJob`` that ``server/supervisor.py``
hands to the trainer process over async ZMQ (``trainer/service.py`` runs it); nothing here blocks the
event loop. Every answer is a model of ``onlinemodel_protocol.api``; every refusal is OpenAI's error shape,
and every 503 and 429 says when to retry (``Retry-After``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from argparse import Namespace
from pathlib import Path
from typing import Any, Awaitable

from fastapi import APIRouter, FastAPI, Request, Response
from pydantic import BaseModel, ValidationError

from onlinemodel_protocol.api import ErrorBody, ErrorDetail, RollbackRequest, TrainStatus
from onlinemodel_protocol.limits import RECENT_JOBS, RETRY_AFTER_QUEUE_FULL_SECONDS, RETRY_AFTER_STARTING_SECONDS
from onlinemodel_protocol.config import RuntimeConfig
from onlinemodel_protocol.rpc import ENDPOINT_PLUGIN, WORKER_EXTENSION_CLS, TrainJob
from onlinemodel_runtime.replication.publisher import Publisher
from onlinemodel_runtime.replication.routes import PUBLISHER_KEY, LearnerOnlyMiddleware
from onlinemodel_runtime.replication.routes import router as replication_router
from onlinemodel_runtime.server import auth, idempotency
from onlinemodel_runtime.server.inflight import InFlightMiddleware, InFlightRequests
from onlinemodel_runtime.server.train_request import ExampleError, encode_request, parse_train_request
from onlinemodel_runtime.server.trainer_client import TrainerRequestError, TrainerUnavailable

log = logging.getLogger(__name__)

STATE_KEY = "onlinemodel"
IN_FLIGHT_KEY = "onlinemodel_in_flight"
PACING_KEY = "onlinemodel_pacing"


def register() -> OnlineModelEndpoints:
    """Entry-point factory (vLLM calls it with no arguments)."""
    return OnlineModelEndpoints()


def _answer(body: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    # pydantic writes the JSON: a NaN loss becomes null instead of failing the response.
    return Response(body.model_dump_json(), status_code=status, media_type="application/json", headers=headers)


def _printable(text: str | None) -> str | None:
    # An error may quote the request (a field name holding "\ud800"): JSON must still be UTF-8.
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


# Retry-After of the statuses that mean "not now": the trainer is (re)starting, or the queue is full.
RETRY_AFTER = {503: RETRY_AFTER_STARTING_SECONDS, 429: RETRY_AFTER_QUEUE_FULL_SECONDS}


def _error(status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> Response:
    detail = ErrorDetail(message=_printable(message), type=type_, param=_printable(param), code=code)
    retry = RETRY_AFTER.get(status)
    return _answer(ErrorBody(error=detail), status, None if retry is None else {"Retry-After": str(retry)})


class _Runtime:
    """Per-app state: config, tokenizer, supervisor, accepted tokens, remembered idempotency keys."""

    def __init__(self, cfg: RuntimeConfig, tokenizer: Any, max_len: int, supervisor: Any,
                 tokens: tuple[str, ...] = ()):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.supervisor = supervisor
        self.tokens = tokens
        self.idempotency = idempotency.IdempotencyKeys()
        self._encode_lock = asyncio.Lock()

    async def encode(self, body: bytes) -> TrainJob:
        """Validate and tokenize off the event loop (chat templates over long requests take a while);
        one at a time, since a fast tokenizer must not be shared between threads."""
        async with self._encode_lock:
            return await asyncio.to_thread(self._encode, body)

    def _encode(self, body: bytes) -> TrainJob:
        return encode_request(self.tokenizer, parse_train_request(body, self.cfg), self.max_len)


def _runtime(request: Request) -> tuple[_Runtime | None, Response | None]:
    """The app's runtime state, or the error response that answers the request instead. Every training
    route needs the token when one is set."""
    rt = getattr(request.app.state, STATE_KEY, None)
    if rt is None:
        return None, _error(503, "onlinemodel runtime is not initialised", type_="service_unavailable")
    if not auth.authorized(request.headers.get("authorization"), rt.tokens):
        return None, _error(401, "missing or invalid bearer token", type_="authentication_error")
    return rt, None


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, read in chunks and given up as soon as it passes `limit` bytes (whatever
    Content-Length claims, or without one)."""
    too_large = ExampleError(f"request body is larger than {limit} bytes (--max-body-bytes)", None,
                             "body_too_large", 413)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


router = APIRouter()


@router.post("/train", status_code=202)
async def train(request: Request):
    rt, refused = _runtime(request)
    if refused:
        return refused
    if not rt.cfg.training_enabled:
        return _error(409, "training is disabled for this model", type_="conflict")
    try:
        key = request.headers.get(idempotency.HEADER)
        if key is not None:
            key = idempotency.check_key(key)
        body = await _read_body(request, rt.cfg.max_body_bytes)

        async def submit():
            return await rt.supervisor.submit(await rt.encode(body))

        if key is None:
            accepted, replayed = await submit(), False
        else:
            accepted, replayed = await rt.idempotency.submit(key, idempotency.fingerprint(body), submit)
    except ExampleError as exc:
        return _error(exc.http_status, str(exc), param=exc.param, code=exc.code)
    except idempotency.IdempotencyKeyError as exc:
        return _error(exc.status, str(exc), param="Idempotency-Key", code=exc.code)
    except TrainerUnavailable as exc:
        return _error(503, str(exc), type_="service_unavailable")
    except TrainerRequestError as exc:
        return _error(exc.code, str(exc), type_="trainer_error")
    return _answer(accepted, 202, {"Idempotent-Replayed": "true"} if replayed else None)


@router.get("/train/status")
async def train_status(request: Request):
    rt, refused = _runtime(request)
    if refused:
        return refused
    if rt.supervisor is None:
        return _answer(TrainStatus.placeholder("disabled"))  # --no-training: no trainer, weights never change
    status = await rt.supervisor.status()
    publisher = getattr(request.app.state, PUBLISHER_KEY, None)
    if publisher is not None:  # a learner: its published version and followers
        status = status.model_copy(update={"replication": publisher.status(status)})
    return _answer(status)


@router.get("/train/limits")
async def train_limits(request: Request):
    rt, refused = _runtime(request)
    return refused or _answer(rt.cfg.train_limits(rt.max_len))


def _trainer(request: Request, nothing: str) -> tuple[_Runtime | None, Response | None]:
    """Like `_runtime`, for the routes that need a trainer: 409 when training is disabled (there is `nothing`)."""
    rt, refused = _runtime(request)
    if refused is None and rt.supervisor is None:
        refused = _error(409, f"training is disabled for this model: {nothing}", type_="conflict")
    return rt, refused


@router.get("/train/jobs/{job_id}")
async def get_job(request: Request, job_id: str):
    rt, refused = _trainer(request, "there are no jobs")
    if refused:
        return refused
    if not rt.supervisor.answering:
        return _error(503, "trainer is not answering (starting or restarting)", type_="service_unavailable")
    job = next((j for j in (await rt.supervisor.status()).jobs if j.id == job_id), None)
    if job is None:
        return _error(404, f"no job {job_id!r} (unknown, or older than the {RECENT_JOBS} most recent)",
                      type_="not_found_error", param="job_id")
    return _answer(job)


async def _ask_trainer(request: Awaitable[BaseModel], error_type: str, param: str | None = None
                       ) -> tuple[BaseModel | None, Response | None]:
    """(the trainer's answer, None), or (None, the error response that answers instead)."""
    try:
        return await request, None
    except TrainerUnavailable as exc:
        return None, _error(503, str(exc), type_="service_unavailable")
    except TrainerRequestError as exc:
        return None, _error(exc.code, str(exc), type_=error_type, param=param)


@router.delete("/train/jobs/{job_id}")
async def cancel_job(request: Request, job_id: str):
    rt, refused = _trainer(request, "there are no jobs")
    if refused:
        return refused
    job, refused = await _ask_trainer(rt.supervisor.cancel(job_id), "trainer_error", param="job_id")
    # A queued job is cancelled at once; a running one stops after its current step.
    return refused or _answer(job, 200 if job.state == "cancelled" else 202)


@router.post("/checkpoint")
async def checkpoint(request: Request):
    rt, refused = _trainer(request, "there is nothing to checkpoint")
    if refused:
        return refused
    record, refused = await _ask_trainer(rt.supervisor.checkpoint(), "checkpoint_error")
    return refused or _answer(record)


@router.post("/rollback")
async def rollback(request: Request):
    rt, refused = _runtime(request)
    if refused:
        return refused
    if rt.supervisor is None:
        return _error(409, "training is disabled for this model: there is nothing to roll back", type_="conflict")
    try:
        body = RollbackRequest.model_validate_json(await _read_body(request, rt.cfg.max_body_bytes))
    except ExampleError as exc:
        return _error(exc.http_status, str(exc), code=exc.code)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        return _error(400, f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}", param="to",
                      code="invalid_request")
    record, refused = await _ask_trainer(rt.supervisor.rollback(body.to), "rollback_error", param="to")
    return refused or _answer(record)


class OnlineModelEndpoints:
    name = ENDPOINT_PLUGIN
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(router)
        app.include_router(replication_router)
        app.add_middleware(LearnerOnlyMiddleware)  # a follower refuses what only the learner may do
        # Serving first (docs/serving-first.md): generation requests in flight, counted for the trainer's pacer.
        # Kept on the app's state, which init_state receives too.
        requests = InFlightRequests()
        setattr(app.state, IN_FLIGHT_KEY, requests)
        app.add_middleware(InFlightMiddleware, requests=requests)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        from transformers import AutoTokenizer

        from onlinemodel_runtime.server.supervisor import TrainerSupervisor

        if engine_client is None:
            log.warning("onlinemodel: no engine (render-only server); training routes answer 503")
            return
        cfg = RuntimeConfig.from_env() or _config_from_args(args)
        tokens = auth.resolve_tokens(os.environ, getattr(args, "api_key", None))
        if cfg.training_enabled and not tokens and not cfg.open_training:
            raise RuntimeError("onlinemodel: the training routes need an API token (ONLINEMODEL_API_TOKEN, or "
                               "vLLM's --api-key / VLLM_API_KEY); `onlinemodel serve --insecure-open-training` "
                               "opens them to anyone who can reach this port")
        if getattr(args, "worker_extension_cls", "") != WORKER_EXTENSION_CLS:
            raise RuntimeError("onlinemodel needs vLLM started with --worker-extension-cls "
                               f"{WORKER_EXTENSION_CLS} (`onlinemodel serve` does this)")
        if not Path(cfg.model).is_dir():
            # A Hugging Face id: vLLM has downloaded it by now; the trainer and checkpoints need the files.
            from huggingface_hub import snapshot_download

            revision = getattr(args, "revision", None)
            local = snapshot_download(cfg.model, revision=revision, local_files_only=True)
            cfg = cfg.model_copy(update={"model": local})
        cfg = cfg.model_copy(update=_serving_address(args))
        max_len = engine_client.model_config.max_model_len
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        supervisor = None
        if cfg.follow_url:  # no trainer: a process that writes the learner's versions into the weights
            from onlinemodel_runtime.replication.follower import FollowerSupervisor

            supervisor = FollowerSupervisor(cfg, engine_client)
            await supervisor.start()
        elif cfg.training_enabled:  # serve-only: no export, no trainer process, no GPU memory for it
            from onlinemodel_runtime.server.pacing_control import PacingGovernor
            from onlinemodel_runtime.server.state_dir import ensure_private_dir

            # The trainer asks vLLM the guard's probes: it needs a key of /v1 when vLLM has one.
            keys = getattr(args, "api_key", None)
            supervisor = TrainerSupervisor(cfg, engine_client, _training_metrics(),
                                           serving_key=(keys if isinstance(keys, str) else (keys or [None])[0]))
            ensure_private_dir(cfg.state_dir)  # the load signal goes there, next to the weight handles
            # Before the trainer starts: it maps the load signal the governor creates.
            requests = getattr(state, IN_FLIGHT_KEY, None) or InFlightRequests()  # no middleware: never paced
            pacing = PacingGovernor(cfg, requests, training=lambda: supervisor.training)
            setattr(state, PACING_KEY, pacing)
            pacing.start()
            await supervisor.start()
            publisher = Publisher(cfg, supervisor)  # idle until a follower asks
            setattr(state, PUBLISHER_KEY, publisher)
            publisher.start()
        setattr(state, STATE_KEY, _Runtime(cfg, tokenizer, max_len, supervisor, tokens))


_METRICS: Any = None


def _training_metrics() -> Any:
    """The process's one TrainingMetrics (a metric name can be registered once per registry)."""
    global _METRICS
    if _METRICS is None:
        from onlinemodel_runtime.server.metrics import TrainingMetrics

        _METRICS = TrainingMetrics()
    return _METRICS


def _serving_address(args: Namespace) -> dict[str, Any]:
    """The API server's own URL and served model name, as the trainer reaches it (loopback)."""
    if getattr(args, "uds", None):
        return {}
    host = getattr(args, "host", None)
    host = "127.0.0.1" if host in (None, "", "0.0.0.0") else "[::1]" if host == "::" else \
        f"[{host}]" if ":" in host else host
    scheme = "https" if getattr(args, "ssl_keyfile", None) else "http"
    names = getattr(args, "served_model_name", None)
    name = names if isinstance(names, str) else (names or [None])[0]
    return {"serving_url": f"{scheme}://{host}:{args.port}", "served_model_name": name or str(args.model)}


def _config_from_args(args: Namespace) -> RuntimeConfig:
    # vLLM started directly (python -m vllm.entrypoints.openai.api_server) with the plugins allowed:
    # defaults, with a private state directory.
    from onlinemodel_runtime.server.state_dir import make_state_dir

    return RuntimeConfig(model=str(args.model), base_model=str(args.model), state_dir=make_state_dir())
