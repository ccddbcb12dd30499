"""Where the training routes' token comes from, and how a request header is checked against it."""

from __future__ import annotations

import pytest

from onlinemodel_protocol.config import ENV_API_TOKEN, ENV_VLLM_API_KEY
from onlinemodel_runtime.server.auth import TokenError, authorized, resolve_tokens, vllm_api_keys


@pytest.mark.parametrize("env,keys,expected", [
    ({}, None, ()),
    ({ENV_API_TOKEN: "a\n"}, None, ("a",)),
    ({ENV_API_TOKEN: " a ", ENV_VLLM_API_KEY: "b"}, ["c"], ("a",)),  # ours first
    ({ENV_VLLM_API_KEY: "b\r\n"}, ["c ", "d"], ("c", "d")),  # vLLM's --api-key before its env
    ({ENV_VLLM_API_KEY: "b\r\n"}, None, ("b",)),
    ({}, "single", ("single",)),  # older vLLM: one string
])
def test_sources_in_order(env, keys, expected):
    assert resolve_tokens(env, keys) == expected


@pytest.mark.parametrize("env,keys", [({ENV_API_TOKEN: ""}, None), ({ENV_API_TOKEN: " \n"}, ["k"]),
                                      ({}, ["k", " "]), ({ENV_VLLM_API_KEY: "\t"}, None)])
def test_empty_values_are_errors(env, keys):
    with pytest.raises(TokenError, match="set but empty"):
        resolve_tokens(env, keys)


@pytest.mark.parametrize("argv,keys,stripped", [
    (["--enforce-eager"], None, ["--enforce-eager"]),
    (["--api-key", "a\n", "b", "--port", "1"], ["a\n", "b"], ["--api-key", "a", "b", "--port", "1"]),
    (["--api-key=a ", "--api_key", " c"], [" c"], ["--api-key=a", "--api_key", "c"]),  # the last one wins
    (["--api-key"], [], ["--api-key"]),
])
def test_vllm_api_keys_are_read_as_vllm_reads_them(argv, keys, stripped):
    assert vllm_api_keys(argv) == (keys, stripped)


def test_authorized():
    assert authorized(None, ())  # no token: open (only with --insecure-open-training or --no-training)
    tokens = ("one", "two")
    assert authorized("Bearer one", tokens) and authorized("bearer two ", tokens)
    for header in (None, "", "Bearer", "Bearer three", "Basic one", "one", "Bearer onee", "Bearer \udcff"):
        assert not authorized(header, tokens), header
