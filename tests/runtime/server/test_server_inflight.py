"""The in-flight counter on a real FastAPI app behind a real HTTP server: streams count until their last
chunk, disconnects and errors give their count back, other routes never count."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from onlinemodel_runtime.server.inflight import InFlightMiddleware, InFlightRequests, is_generation
from onlinemodel_runtime.server.load_signal import LoadSignalReader, LoadSignalWriter

CHUNKS = 8
CHUNK_SECONDS = 0.05


def build_app(requests: InFlightRequests) -> FastAPI:
    app = FastAPI()

    async def tokens(n: int):
        for i in range(n):
            await asyncio.sleep(CHUNK_SECONDS)
            yield f"data: {i}\n\n"

    @app.post("/v1/completions")
    async def completions():
        return StreamingResponse(tokens(CHUNKS), media_type="text/event-stream")

    @app.post("/v1/responses")
    async def long_stream():
        return StreamingResponse(tokens(200), media_type="text/event-stream")  # 10 s unless the client leaves

    @app.post("/v1/chat/completions")
    async def chat():
        raise RuntimeError("the engine failed")

    @app.post("/train")
    async def train():
        await asyncio.sleep(0.3)
        return {"ok": True}

    app.add_middleware(InFlightMiddleware, requests=requests)
    return app


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    requests = InFlightRequests()
    path = tmp_path_factory.mktemp("sig") / "load-signal"
    requests.publish_to(LoadSignalWriter.create(path, mode="measured", duty=1.0, max_decode_slowdown=1.25))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(requests), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", requests, LoadSignalReader(path)
    server.should_exit = True
    thread.join(10)


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_streams_count_until_their_last_chunk(served):
    url, requests, reader = served
    with httpx.Client(timeout=10) as client:
        with client.stream("POST", url + "/v1/completions") as short, client.stream("POST", url + "/v1/responses") as long:
            # Keep the line iterators: dropping one closes its response (a disconnect).
            short_lines, long_lines = short.iter_lines(), long.iter_lines()
            next(short_lines), next(long_lines)
            assert requests.count == 2 and reader.in_flight == 2
            assert len([line for line in short_lines if line]) == CHUNKS - 1
            wait_for(lambda: requests.count == 1)
            assert reader.in_flight == 1
    wait_for(lambda: requests.count == 0, timeout=2.0)
    assert reader.in_flight == 0


def test_a_client_that_leaves_gives_its_count_back(served):
    url, requests, reader = served
    with httpx.Client(timeout=10) as client:
        with client.stream("POST", url + "/v1/responses") as stream:
            lines = stream.iter_lines()
            next(lines)
            assert requests.count == 1
        # closed after one chunk: the server sees the disconnect and stops the stream long before its end
    wait_for(lambda: requests.count == 0, timeout=2.0)
    assert reader.in_flight == 0


def test_an_error_gives_its_count_back(served):
    url, requests, _ = served
    with httpx.Client(timeout=10) as client:
        assert client.post(url + "/v1/chat/completions").status_code == 500
    assert requests.count == 0


def test_other_routes_never_count(served):
    url, requests, _ = served
    seen = []
    with httpx.Client(timeout=10) as client:
        worker = threading.Thread(target=lambda: seen.append(client.post(url + "/train").status_code))
        worker.start()
        time.sleep(0.15)
        assert requests.count == 0
        worker.join()
        assert client.get(url + "/v1/completions").status_code == 405 and requests.count == 0
    assert seen == [200]


@pytest.mark.parametrize("scope,counted", [
    ({"type": "http", "method": "POST", "path": "/v1/chat/completions"}, True),
    ({"type": "http", "method": "POST", "path": "/api/v1/responses", "root_path": "/api"}, True),
    ({"type": "http", "method": "GET", "path": "/v1/completions"}, False),
    ({"type": "http", "method": "POST", "path": "/v1/completions/extra"}, False),
    ({"type": "websocket", "path": "/v1/realtime"}, False),
])
def test_which_requests_are_generation(scope, counted):
    assert is_generation(scope) is counted
