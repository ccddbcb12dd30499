"""How a follower gets the learner's weight versions: ``WeightTransport``, and its HTTP implementation.

A transport answers two questions: which version is the learner's latest (``latest``, which also carries
the follower's report), and the tensors of one version from a given frame on (``frames``). The follower
(``follower.py``) does the rest: it checks the names, shapes and dtypes against its live weights, writes
each tensor in place, and resumes at the frame it was at when a connection breaks. A faster transport
(an NCCL broadcast between GPU pods, vLLM's weight-transfer API) implements the same two methods; it may
yield GPU tensors, which the follower copies without a round trip through host memory.
"""

from __future__ import annotations

import http.client
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Protocol

import torch
from pydantic import BaseModel, ValidationError

from onlinemodel_protocol.api import ErrorBody
from onlinemodel_protocol.replication import FrameHeader, Snapshot
from onlinemodel_runtime.replication.snapshot import FrameError, read_frames


class TransportError(RuntimeError):
    """The learner could not be reached or the stream broke: retry, resuming where it stopped."""


class VersionGone(RuntimeError):
    """The learner published a newer version meanwhile: fetch the manifest again."""


class LearnerRefused(RuntimeError):
    """The learner answered with an error that retrying the same request will not fix (401, 409, ...)."""


class FollowerReport(BaseModel):
    follower: str
    version: int
    sync_seconds: float | None = None
    sync_bytes: int | None = None


class WeightTransport(Protocol):
    def latest(self, report: FollowerReport) -> Snapshot | None:
        """The learner's latest published version (None: none yet); tells the learner `report`."""

    def frames(self, snapshot: Snapshot, start: int) -> Iterator[tuple[FrameHeader, torch.Tensor]]:
        """Tensors `start`.. of `snapshot`, in order. TransportError when the stream breaks, VersionGone
        when the version is no longer served."""


class HttpWeightTransport:
    """``GET /replication/manifest`` and ``GET /replication/tensors`` on the learner's port, with the model's
    bearer token (``onlinemodel_protocol.replication`` has the stream format)."""

    def __init__(self, url: str, token: str | None, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _open(self, path: str, query: dict):
        params = urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        req = urllib.request.Request(f"{self.url}{path}?{params}")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                detail = ErrorBody.model_validate_json(raw).error
                message, code = detail.message, detail.code
            except ValidationError:
                message, code = raw[:200].decode(errors="replace"), None
            error = f"learner answered {exc.code} to {path}: {message}"
            if exc.code == 404 and code == "not_published":
                return None
            if exc.code == 410:
                raise VersionGone(error) from None
            if exc.code >= 500 or exc.code == 429:
                raise TransportError(error) from None
            raise LearnerRefused(error) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise TransportError(f"learner at {self.url} unreachable: {exc}") from None

    def latest(self, report: FollowerReport) -> Snapshot | None:
        resp = self._open("/replication/manifest", report.model_dump())
        if resp is None:
            return None
        with resp:
            try:
                return Snapshot.model_validate_json(resp.read())
            except (ValidationError, OSError, http.client.HTTPException) as exc:
                raise TransportError(f"unreadable manifest from the learner: {exc}") from None

    def frames(self, snapshot: Snapshot, start: int) -> Iterator[tuple[FrameHeader, torch.Tensor]]:
        resp = self._open("/replication/tensors", {"version": snapshot.weight_version, "start": start})
        if resp is None:
            raise VersionGone(f"weight version {snapshot.weight_version} is no longer published")
        with resp:
            try:
                yield from read_frames(resp)
            except (EOFError, OSError, http.client.HTTPException) as exc:
                raise TransportError(f"weight stream broke: {exc}") from None
            except FrameError as exc:
                raise TransportError(f"bad weight stream: {exc}") from None
