"""The ``vllm.endpoint_plugins`` entry: ``POST /train``, ``GET /train/status``, ``POST /checkpoint``.

The routes live on vLLM's own FastAPI app, on the port that serves ``/v1/chat/completions``. Requests
are validated and tokenized here (so bad input gets a 4xx before anything is queued) and forwarded to
the trainer process over async ZMQ; nothing here blocks the event loop.
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

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from onlinemodel_runtime.config import ENV_API_TOKEN, RuntimeConfig
from onlinemodel_runtime.server.train_request import ExampleError, TrainLimits, encode_request, parse_train_request
from onlinemodel_runtime.server.supervisor import placeholder_status
from onlinemodel_runtime.server.trainer_client import TrainerRequestError, TrainerUnavailable

log = logging.getLogger(__name__)

STATE_KEY = "onlinemodel"


def register() -> OnlineModelEndpoints:
    """Entry-point factory (vLLM calls it with no arguments)."""
    return OnlineModelEndpoints()


def _error(status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": type_, "param": param, "code": code}})


class _Runtime:
    """Per-app state: config, tokenizer, limits, supervisor."""

    def __init__(self, cfg: RuntimeConfig, tokenizer: Any, max_len: int, supervisor: Any, token: str | None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.supervisor = supervisor
        self.token = token
        self.limits = TrainLimits(max_examples=cfg.max_examples, max_epochs=cfg.max_epochs,
                                  default_epochs=cfg.default_epochs)
        self._encode_lock = asyncio.Lock()

    def authorized(self, request: Request) -> bool:
        if not self.token:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        # Bytes: compare_digest refuses non-ASCII str, and a stray header must be a 401, not a 500.
        return scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode("utf-8", "surrogateescape"), self.token.encode("utf-8"))

    async def encode(self, body: bytes):
        """Validate and tokenize off the event loop (chat templates over long requests take a while);
        one at a time, since a fast tokenizer must not be shared between threads."""
        async with self._encode_lock:
            return await asyncio.to_thread(self._encode, body)

    def _encode(self, body: bytes):
        parsed = parse_train_request(body, self.limits)
        return parsed, encode_request(self.tokenizer, parsed, self.max_len)


def _runtime(request: Request, *, needs_token: bool) -> tuple[_Runtime | None, JSONResponse | None]:
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
    body = await request.body()
    try:
        parsed, encoded = await rt.encode(body)
    except ExampleError as exc:
        return _error(exc.http_status, str(exc), param=exc.param, code=exc.code)
    examples = [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded]
    try:
        job = await rt.supervisor.submit(examples, parsed.epochs, parsed.learning_rate)
    except TrainerUnavailable as exc:
        return _error(503, str(exc), type_="service_unavailable")
    except TrainerRequestError as exc:
        return _error(exc.code, str(exc), type_="trainer_error")
    job["tokens"] = sum(len(e["input_ids"]) for e in examples)
    return JSONResponse(status_code=202, content=job)


@router.get("/train/status")
async def train_status(request: Request):
    rt, refused = _runtime(request, needs_token=False)
    if refused:
        return refused
    if rt.supervisor is None:
        return placeholder_status("disabled")  # --no-training: no trainer, weights never change
    return await rt.supervisor.status()


@router.post("/checkpoint")
async def checkpoint(request: Request):
    rt, refused = _runtime(request, needs_token=True)
    if refused:
        return refused
    if rt.supervisor is None:
        return _error(409, "training is disabled for this model: there is nothing to checkpoint", type_="conflict")
    try:
        return await rt.supervisor.checkpoint()
    except TrainerUnavailable as exc:
        return _error(503, str(exc), type_="service_unavailable")
    except TrainerRequestError as exc:
        return _error(exc.code, str(exc), type_="checkpoint_error")


class OnlineModelEndpoints:
    name = "onlinemodel_train"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(router)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        from transformers import AutoTokenizer

        from onlinemodel_runtime.server.supervisor import TrainerSupervisor
        from onlinemodel_runtime.vllm_plugins.worker import EXTENSION_CLS

        if engine_client is None:
            log.warning("onlinemodel: no engine (render-only server); training routes answer 503")
            return
        cfg = RuntimeConfig.from_env() or _config_from_args(args)
        if getattr(args, "worker_extension_cls", "") != EXTENSION_CLS:
            raise RuntimeError(f"onlinemodel needs vLLM started with --worker-extension-cls {EXTENSION_CLS} "
                               "(`onlinemodel serve` does this)")
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
            supervisor = TrainerSupervisor(cfg, engine_client)
            await supervisor.start()
        setattr(state, STATE_KEY, _Runtime(cfg, tokenizer, max_len, supervisor, os.environ.get(ENV_API_TOKEN)))


def _config_from_args(args: Namespace) -> RuntimeConfig:
    # vLLM started directly (python -m vllm.entrypoints.openai.api_server) with the plugins allowed:
    # defaults, with a private state directory.
    state_dir = Path(tempfile.mkdtemp(prefix="onlinemodel-"))
    return RuntimeConfig(model=str(args.model), base_model=str(args.model), state_dir=state_dir)
