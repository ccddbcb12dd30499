"""The ``vllm.endpoint_plugins`` entry: ``POST /train``, ``GET /train/status``, ``POST /checkpoint``.

The routes live on vLLM's own FastAPI app, on the port that serves ``/v1/chat/completions``. A
``POST /train`` is validated and tokenized here (``server/train_request.py``: bad input gets a 4xx before
anything is queued) into a ``TrainJob`` that ``server/supervisor.py`` hands to the trainer process over
async ZMQ (``trainer/service.py`` runs it); nothing here blocks the event loop. Every answer is a model of
``onlinemodel_protocol.api``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import tempfile
from argparse import Namespace
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from pydantic import BaseModel

from onlinemodel_protocol.api import ErrorBody, ErrorDetail, TrainStatus
from onlinemodel_protocol.config import ENV_API_TOKEN, RuntimeConfig
from onlinemodel_protocol.rpc import ENDPOINT_PLUGIN, WORKER_EXTENSION_CLS, TrainJob
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


def _answer(body: BaseModel, status: int = 200) -> Response:
    # pydantic writes the JSON: a NaN loss becomes null instead of failing the response.
    return Response(body.model_dump_json(), status_code=status, media_type="application/json")


def _error(status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> Response:
    return _answer(ErrorBody(error=ErrorDetail(message=message, type=type_, param=param, code=code)), status)


class _Runtime:
    """Per-app state: config, tokenizer, supervisor."""

    def __init__(self, cfg: RuntimeConfig, tokenizer: Any, max_len: int, supervisor: Any, token: str | None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.supervisor = supervisor
        self.token = token
        self._encode_lock = asyncio.Lock()

    def authorized(self, request: Request) -> bool:
        if not self.token:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        # Bytes: compare_digest refuses non-ASCII str, and a stray header must be a 401, not a 500.
        return scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode("utf-8", "surrogateescape"), self.token.encode("utf-8"))

    async def encode(self, body: bytes) -> TrainJob:
        """Validate and tokenize off the event loop (chat templates over long requests take a while);
        one at a time, since a fast tokenizer must not be shared between threads."""
        async with self._encode_lock:
            return await asyncio.to_thread(self._encode, body)

    def _encode(self, body: bytes) -> TrainJob:
        return encode_request(self.tokenizer, parse_train_request(body, self.cfg), self.max_len)


def _runtime(request: Request, *, needs_token: bool) -> tuple[_Runtime | None, Response | None]:
    """The app's runtime state, or the error response that answers the request instead."""
    rt = getattr(request.app.state, STATE_KEY, None)
    if rt is None:
        return None, _error(503, "onlinemodel runtime is not initialised", type_="service_unavailable")
    if needs_token and not rt.authorized(request):
        return None, _error(401, "missing or invalid bearer token", type_="authentication_error")
    return rt, None


router = APIRouter()


@router.post("/train", status_code=202)
async def train(request: Request):
    rt, refused = _runtime(request, needs_token=True)
    if refused:
        return refused
    if not rt.cfg.training_enabled:
        return _error(409, "training is disabled for this model", type_="conflict")
    try:
        job = await rt.encode(await request.body())
    except ExampleError as exc:
        return _error(exc.http_status, str(exc), param=exc.param, code=exc.code)
    try:
        accepted = await rt.supervisor.submit(job)
    except TrainerUnavailable as exc:
        return _error(503, str(exc), type_="service_unavailable")
    except TrainerRequestError as exc:
        return _error(exc.code, str(exc), type_="trainer_error")
    return _answer(accepted, 202)


@router.get("/train/status")
async def train_status(request: Request):
    rt, refused = _runtime(request, needs_token=False)
    if refused:
        return refused
    if rt.supervisor is None:
        return _answer(TrainStatus.placeholder("disabled"))  # --no-training: no trainer, weights never change
    return _answer(await rt.supervisor.status())


@router.post("/checkpoint")
async def checkpoint(request: Request):
    rt, refused = _runtime(request, needs_token=True)
    if refused:
        return refused
    if rt.supervisor is None:
        return _error(409, "training is disabled for this model: there is nothing to checkpoint", type_="conflict")
    try:
        return _answer(await rt.supervisor.checkpoint())
    except TrainerUnavailable as exc:
        return _error(503, str(exc), type_="service_unavailable")
    except TrainerRequestError as exc:
        return _error(exc.code, str(exc), type_="checkpoint_error")


class OnlineModelEndpoints:
    name = ENDPOINT_PLUGIN
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(router)
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
        if getattr(args, "worker_extension_cls", "") != WORKER_EXTENSION_CLS:
            raise RuntimeError("onlinemodel needs vLLM started with --worker-extension-cls "
                               f"{WORKER_EXTENSION_CLS} (`onlinemodel serve` does this)")
        if not Path(cfg.model).is_dir():
            # A Hugging Face id: vLLM has downloaded it by now; the trainer and checkpoints need the files.
            from huggingface_hub import snapshot_download

            revision = getattr(args, "revision", None)
            local = snapshot_download(cfg.model, revision=revision, local_files_only=True)
            cfg = cfg.model_copy(update={"model": local})
        max_len = engine_client.model_config.max_model_len
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        supervisor = None
        if cfg.training_enabled:  # serve-only: no export, no trainer process, no GPU memory for it
            from onlinemodel_runtime.server.pacing_control import PacingGovernor

            supervisor = TrainerSupervisor(cfg, engine_client)
            cfg.state_dir.mkdir(parents=True, exist_ok=True)
            # Before the trainer starts: it maps the load signal the governor creates.
            requests = getattr(state, IN_FLIGHT_KEY, None) or InFlightRequests()  # no middleware: never paced
            pacing = PacingGovernor(cfg, requests, training=lambda: supervisor.training)
            setattr(state, PACING_KEY, pacing)
            pacing.start()
            await supervisor.start()
        setattr(state, STATE_KEY, _Runtime(cfg, tokenizer, max_len, supervisor, os.environ.get(ENV_API_TOKEN)))


def _config_from_args(args: Namespace) -> RuntimeConfig:
    # vLLM started directly (python -m vllm.entrypoints.openai.api_server) with the plugins allowed:
    # defaults, with a private state directory.
    state_dir = Path(tempfile.mkdtemp(prefix="onlinemodel-"))
    return RuntimeConfig(model=str(args.model), base_model=str(args.model), state_dir=state_dir)
