"""Who waits for tokens: a pure-ASGI middleware counting the generation requests in flight.

A request counts from the moment it reaches vLLM's app until the last chunk of its response is sent, or
until the app gives up on it (client gone, error, cancellation): whichever comes first, exactly once. The
count lives in ``InFlightRequests``; once the load signal exists (``load_signal.py``), every change is
also written there for the trainer to read. Pure ASGI rather than Starlette's ``BaseHTTPMiddleware``: it
neither buffers nor re-wraps streamed responses, and costs two integer updates per request.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

# POST routes of vLLM's API server whose answers are generated tokens.
GENERATION_PATHS = frozenset({
    "/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/messages", "/inference/v1/generate",
})

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class InFlightRequests:
    """The count, and where it is published."""

    def __init__(self) -> None:
        self.count = 0
        self._sink: Any = None  # a LoadSignalWriter, once there is one

    def publish_to(self, sink: Any) -> None:
        self._sink = sink
        sink.in_flight = self.count

    def add(self, delta: int) -> None:
        self.count += delta
        if self._sink is not None:
            self._sink.in_flight = self.count


def is_generation(scope: Scope) -> bool:
    if scope["type"] != "http" or scope["method"] != "POST":
        return False
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path in GENERATION_PATHS


class InFlightMiddleware:
    """ASGI middleware: ``app.add_middleware(InFlightMiddleware, requests=InFlightRequests())``."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], requests: InFlightRequests):
        self.app = app
        self.requests = requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not is_generation(scope):
            await self.app(scope, receive, send)
            return
        requests = self.requests
        requests.add(1)
        counted = True

        async def send_and_watch(message: Message) -> None:
            nonlocal counted
            await send(message)
            if counted and message["type"] == "http.response.body" and not message.get("more_body", False):
                counted = False  # the client has its last byte: nobody waits any more
                requests.add(-1)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            if counted:
                counted = False
                requests.add(-1)
