"""The bearer token of the training routes: where it comes from, and how a request is checked against it.

Sources, first found wins: ``ONLINEMODEL_API_TOKEN``; else vLLM's own keys (``--api-key``, else
``VLLM_API_KEY``), so a user who set vLLM's key has ``/v1/*`` and ``/train`` behind the same key.
Whitespace around a value is stripped (a Secret made with ``--from-file`` ends in a newline); a source
that is set but empty after stripping is an error, never "auth off". ``onlinemodel serve`` resolves the
token before it starts vLLM, the endpoint plugin again in vLLM's process from the same environment and
arguments, and ``onlinemodel checkpoint`` (the pod's preStop hook) from the same environment.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence

from onlinemodel_protocol.config import ENV_API_TOKEN, ENV_VLLM_API_KEY


class TokenError(ValueError):
    """A token source is set but holds nothing usable."""


def _clean(value: str, source: str) -> str:
    token = value.strip()
    if not token:
        raise TokenError(f"{source} is set but empty (after stripping whitespace): set a token, or unset it")
    return token


def resolve_tokens(env: Mapping[str, str], vllm_api_keys: Sequence[str] | str | None = None) -> tuple[str, ...]:
    """The accepted tokens (empty: none configured). `vllm_api_keys`: the value(s) of vLLM's --api-key
    (a list in recent vLLM, one string in older ones)."""
    if isinstance(vllm_api_keys, str):
        vllm_api_keys = [vllm_api_keys]
    if ENV_API_TOKEN in env:
        return (_clean(env[ENV_API_TOKEN], ENV_API_TOKEN),)
    if vllm_api_keys:
        return tuple(_clean(k, "--api-key") for k in vllm_api_keys)
    if ENV_VLLM_API_KEY in env:
        return (_clean(env[ENV_VLLM_API_KEY], ENV_VLLM_API_KEY),)
    return ()


_API_KEY_FLAGS = ("--api-key", "--api_key")


def vllm_api_keys(argv: list[str]) -> tuple[list[str] | None, list[str]]:
    """(vLLM's --api-key values in `argv`, `argv` with those values stripped of whitespace).

    Read as vLLM's parser reads them: the last occurrence wins, its values run up to the next option.
    """
    keys, out = None, list(argv)
    i = 0
    while i < len(out):
        flag, eq, value = out[i].partition("=")
        i += 1
        if flag not in _API_KEY_FLAGS:
            continue
        if eq:
            keys = [value]
            out[i - 1] = f"{flag}={value.strip()}"
            continue
        keys = []
        while i < len(out) and not out[i].startswith("-"):
            keys.append(out[i])
            out[i] = out[i].strip()
            i += 1
    return keys, out


def authorized(header: str | None, tokens: Sequence[str]) -> bool:
    """Whether an ``Authorization`` header value carries one of `tokens` (always True without tokens)."""
    if not tokens:
        return True
    scheme, _, value = (header or "").partition(" ")
    # Bytes: compare_digest refuses non-ASCII str, and a stray header must be a 401, not a 500. Every
    # token is compared, so the time taken does not tell which one nearly matched.
    offered = value.strip().encode("utf-8", "surrogateescape")
    matches = [hmac.compare_digest(offered, t.encode("utf-8")) for t in tokens]
    return scheme.lower() == "bearer" and any(matches)
