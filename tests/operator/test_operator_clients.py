"""Unit tests of the runtime client, the operator config and the CLI (httpx mock transport, no servers)."""

from __future__ import annotations

import httpx
import pytest

from onlinemodel_operator.config import OperatorConfig
from onlinemodel_operator.main import build_parser
from onlinemodel_operator.runtime_client import CheckpointBusy, CheckpointFailed, RuntimeClient, RuntimeUnreachable
from onlinemodel_protocol.api import CheckpointRecord, TrainStatus


def client(handler, token: str | None = None) -> RuntimeClient:
    return RuntimeClient("http://10.0.0.1:8000", token, transport=httpx.MockTransport(handler))


async def test_train_status_is_the_protocol_model_and_sends_the_token() -> None:
    seen: list[str | None] = []

    def ok(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, json={"state": "idle", "steps": 3, "last_loss": None, "some_newer_field": 1})

    assert await client(ok, "t0k\n").train_status() == TrainStatus(state="idle", steps=3)
    await client(ok, " ").train_status()
    assert seen == ["Bearer t0k", None]  # stripped, as the runtime strips it; blank is none


@pytest.mark.parametrize("response", [httpx.Response(503, json={"error": {"message": "trainer not running"}}),
                                      httpx.Response(401, json={"error": {"message": "missing bearer token"}}),
                                      httpx.Response(200, text="not json"),
                                      httpx.Response(200, json={"state": "weird"}),
                                      httpx.Response(200, json=[1, 2])])
async def test_train_status_bad_answers(response: httpx.Response) -> None:
    with pytest.raises(RuntimeUnreachable):
        await client(lambda req: response).train_status()


async def test_train_status_connection_error() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(RuntimeUnreachable, match="connection refused"):
        await client(refuse).train_status()


async def test_checkpoint_sends_token_and_maps_errors() -> None:
    seen: list[str | None] = []

    def ok(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, json={"step": 4, "path": "/ck/4", "content_hash": "sha256:ab"})

    assert await client(ok, "t0k").checkpoint() == CheckpointRecord(step=4, path="/ck/4", content_hash="sha256:ab")
    assert seen == ["Bearer t0k"]
    with pytest.raises(CheckpointBusy):
        await client(lambda r: httpx.Response(409, json={"error": {"message": "running"}})).checkpoint()
    with pytest.raises(CheckpointFailed, match="HTTP 500: disk full"):
        await client(lambda r: httpx.Response(500, json={"error": {"message": "disk full"}})).checkpoint()
    with pytest.raises(CheckpointFailed, match="HTTP 401"):
        await client(lambda r: httpx.Response(401, json={"error": "unauthorized"})).checkpoint()
    with pytest.raises(CheckpointFailed, match="unexpected answer"):
        await client(lambda r: httpx.Response(200, json={"step": -1, "path": "/ck"})).checkpoint()


def test_config_from_env_and_overrides() -> None:
    cfg = OperatorConfig.from_env({"ONLINEMODEL_OPERATOR_POLL_INTERVAL": "2.5",
                                   "ONLINEMODEL_OPERATOR_NAMESPACES": "a, b"}, checkpoint_timeout=30)
    assert (cfg.poll_interval, cfg.namespaces, cfg.checkpoint_timeout) == (2.5, ("a", "b"), 30)
    assert OperatorConfig.from_env({}).poll_interval == 10.0
    with pytest.raises(ValueError):
        OperatorConfig.from_env({"ONLINEMODEL_OPERATOR_POLL_INTERVAL": "-1"})


def test_cli_arguments() -> None:
    args = build_parser().parse_args(["-n", "ml", "-n", "team-*", "--poll-interval", "3", "--liveness", ""])
    assert args.namespace == ["ml", "team-*"] and args.poll_interval == 3.0 and args.liveness == ""
    assert build_parser().parse_args([]).liveness == "http://0.0.0.0:8080/healthz"
