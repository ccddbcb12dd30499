"""``Idempotency-Key`` of ``POST /train``: a retried submit gets the original answer and queues nothing.

The API server remembers the newest ``IDEMPOTENCY_KEYS_REMEMBERED`` keys with a fingerprint of the body
each came with and the answer it got (it outlives trainer restarts). A key seen again with the same body
gets that answer, without tokenizing or queueing anything; while the first request with a key is still
being handled, a retry waits for its answer. A key seen with a different body is refused. A request that
got no job (any error) leaves no key behind: its retry is handled as new.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
from typing import Awaitable, Callable

from onlinemodel_protocol.api import TrainAccepted
from onlinemodel_protocol.limits import IDEMPOTENCY_KEY_MAX_LENGTH, IDEMPOTENCY_KEYS_REMEMBERED

HEADER = "idempotency-key"


class IdempotencyKeyError(ValueError):
    """A refused key: `status` and `code` are the HTTP answer's."""

    def __init__(self, message: str, status: int, code: str):
        super().__init__(message)
        self.status = status
        self.code = code


def check_key(value: str) -> str:
    if not 0 < len(value) <= IDEMPOTENCY_KEY_MAX_LENGTH or not (value.isascii() and value.isprintable()):
        raise IdempotencyKeyError(f"Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX_LENGTH} printable ASCII characters",
                        400, "invalid_idempotency_key")
    return value


def fingerprint(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


class IdempotencyKeys:
    def __init__(self, capacity: int = IDEMPOTENCY_KEYS_REMEMBERED):
        self.capacity = capacity
        self._entries: collections.OrderedDict[str, tuple[str, asyncio.Future]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def submit(self, key: str, body_fingerprint: str,
                     submit: Callable[[], Awaitable[TrainAccepted]]) -> tuple[TrainAccepted, bool]:
        """(answer, replayed): `submit()`'s answer for a new key, the remembered one for a known key."""
        known = self._entries.get(key)
        if known is not None:
            seen_fingerprint, answer = known
            if seen_fingerprint != body_fingerprint:
                raise IdempotencyKeyError(f"Idempotency-Key {key!r} was already used with a different request body",
                                422, "idempotency_key_reused")
            self._entries.move_to_end(key)
            # shield: a retry that gives up waiting must not cancel the first request's answer.
            return await asyncio.shield(answer), True
        answer = asyncio.get_running_loop().create_future()
        self._entries[key] = (body_fingerprint, answer)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        try:
            accepted = await submit()
        except BaseException as exc:
            if self._entries.get(key, (None, None))[1] is answer:
                del self._entries[key]
            if not isinstance(exc, Exception):  # cancelled: the waiting retries must not look cancelled
                exc = IdempotencyKeyError("the first request with this Idempotency-Key was interrupted; retry",
                                          409, "idempotency_key_interrupted")
            answer.set_exception(exc)
            answer.exception()  # retrieved: waiting retries re-raise it, nobody else needs to
            raise
        answer.set_result(accepted)
        return accepted, False
