"""HTTP routes of scaling out, on vLLM's port like the training routes (same bearer token).

Learner: ``GET /replication/manifest`` (the latest published version; the asking follower reports its own
version in the query) and ``GET /replication/tensors?version=V&start=I`` (frames I.. of version V, read
from the version's file; 410 once a newer version replaced it, so the follower starts that one instead).
Both: ``GET /replication/ready``, a follower's readiness (open, like ``/health``).
Follower: the routes that change the model (``POST /train``, ``POST /checkpoint``, ``DELETE
/train/jobs/...``, ``POST /rollback``) answer 409 naming the learner, in OpenAI's error shape.
"""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field, ValidationError

from onlinemodel_protocol.replication import FOLLOWER_NAME, READY_PATH
from onlinemodel_runtime.replication import snapshot as snapshots

PUBLISHER_KEY = "onlinemodel_publisher"
_CHUNK = 1 << 20
# (method, path prefix) of the routes that change the model: the learner's alone.
LEARNER_ONLY = (("POST", "/train"), ("POST", "/checkpoint"), ("DELETE", "/train/jobs/"), ("POST", "/rollback"))

router = APIRouter()


class ManifestQuery(BaseModel):
    follower: str | None = Field(None, pattern=FOLLOWER_NAME.pattern)
    version: int | None = Field(None, ge=0)
    sync_seconds: float | None = Field(None, ge=0, allow_inf_nan=False)
    sync_bytes: int | None = Field(None, ge=0)


class TensorsQuery(BaseModel):
    version: int = Field(ge=0)
    start: int = Field(0, ge=0)


def _learner_request(request: Request, query_model: type[BaseModel]):
    """(the learner's Publisher, the parsed query, None), or (None, None, the error answer). The endpoint's
    helpers are imported here, not at the top: endpoint.py imports this module."""
    from onlinemodel_runtime.vllm_plugins.endpoint import _error, _runtime

    rt, refused = _runtime(request)
    if refused:
        return None, None, refused
    publisher = getattr(request.app.state, PUBLISHER_KEY, None)
    if publisher is None:
        why = f"this replica follows {rt.cfg.follow_url}" if rt.cfg.follow_url else "training is disabled"
        return None, None, _error(409, f"no weights are published here: {why}", type_="conflict")
    try:
        return publisher, query_model.model_validate(dict(request.query_params)), None
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(map(str, first["loc"])) or None
        return None, None, _error(400, f"{param}: {first['msg']}", param=param)


@router.get("/replication/manifest")
async def manifest(request: Request):
    from onlinemodel_runtime.vllm_plugins.endpoint import _answer, _error

    publisher, query, refused = _learner_request(request, ManifestQuery)
    if refused:
        return refused
    if query.follower is not None and query.version is not None:
        publisher.registry.report(query.follower, query.version, query.sync_seconds, query.sync_bytes)
    current = publisher.manifest()
    if current is None:  # asked for the first time: the publisher takes one within a poll
        return _error(404, "no weight version is published yet; retry shortly", type_="not_found",
                      code="not_published")
    return _answer(current)


@router.get("/replication/tensors")
async def tensors(request: Request):
    from onlinemodel_runtime.vllm_plugins.endpoint import _error

    publisher, query, refused = _learner_request(request, TensorsQuery)
    if refused:
        return refused
    current = publisher.manifest()
    gone = _error(410, f"weight version {query.version} is no longer published; fetch the manifest again",
                  type_="gone", code="version_gone")
    if current is None or current.weight_version != query.version:
        return gone
    try:
        stream = snapshots.open_stream(publisher.directory, current, query.start)
    except IndexError as exc:
        return _error(400, str(exc), param="start")
    except FileNotFoundError:
        return gone

    def body() -> Iterator[bytes]:  # Starlette iterates it in a thread: file reads never block the loop
        with stream:
            while chunk := stream.read(_CHUNK):
                yield chunk

    length = current.total_bytes - stream.tell()
    return StreamingResponse(body(), media_type="application/octet-stream",
                             headers={"Content-Length": str(length)})


@router.get(READY_PATH)
async def ready(request: Request):
    """Readiness: a follower is ready once it applied a version of the learner (until then it would answer
    from the base model) and its engine is healthy; a learner answers 200 (vLLM's /health covers it).
    Open, like /health: probes carry no token."""
    from onlinemodel_runtime.vllm_plugins.endpoint import STATE_KEY, _error

    rt = getattr(request.app.state, STATE_KEY, None)
    if rt is None:
        return _error(503, "onlinemodel runtime is not initialised", type_="service_unavailable")
    if not rt.cfg.follow_url:
        return Response(status_code=200)
    status = rt.supervisor.last_status
    if status is None or status.replication is None or not status.replication.synced:
        return _error(503, f"not synced with the learner at {rt.cfg.follow_url} yet", type_="service_unavailable",
                      code="not_synced")
    try:
        await rt.supervisor.engine.check_health()
    except Exception as exc:  # what vLLM's /health would answer 503 for
        return _error(503, f"engine unhealthy: {exc}", type_="service_unavailable")
    return Response(status_code=200)


def learner_only(method: str, path: str) -> bool:
    return any(method == m and (path == p or (p.endswith("/") and path.startswith(p))) for m, p in LEARNER_ONLY)


class LearnerOnlyMiddleware:
    """Pure ASGI (streamed answers pass untouched): on a follower, a request to a route that changes the
    model gets 409 naming the learner, after the token check its route would have made."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        from onlinemodel_runtime.vllm_plugins.endpoint import STATE_KEY, _error, _runtime

        rt = getattr(scope["app"].state, STATE_KEY, None) if scope["type"] == "http" else None
        if rt is None or not rt.cfg.follow_url or not learner_only(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        _, refused = _runtime(request)
        answer = refused or _error(409, f"this replica follows the learner at {rt.cfg.follow_url}: send "
                                        f"{request.method} {request.url.path} there", type_="conflict",
                                   code="not_the_learner")
        await answer(scope, receive, send)
