"""Checking and splitting a JSONL file of chat examples with the server's own parser and limits."""

from __future__ import annotations

import json

import pytest

from onlinemodel_protocol.api import TrainLimits
from onlinemodel_runtime.train_file import OptionError, TrainFileError, read_examples, split_requests

LIMITS = TrainLimits(max_examples=2, max_messages=256, max_body_bytes=4096, max_model_len=64, max_chars_per_token=16,
                     default_epochs=3, max_epochs=20, learning_rate=3e-5, learning_rate_max=1.0, max_queued_jobs=16)


def example(answer: str = "a") -> dict:
    return {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}]}


def write(tmp_path, *lines: str):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_every_bad_line_is_named_with_its_field(tmp_path):
    bad_role = {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "a"}]}
    path = write(tmp_path, json.dumps(example()), "", "{not json", json.dumps(bad_role),
                 json.dumps({**example(), "tools": []}), json.dumps([1]), json.dumps(example("x" * 2000)))
    with pytest.raises(TrainFileError) as refused:
        read_examples(path, LIMITS)
    lines = str(refused.value).splitlines()
    assert lines[0].startswith("line 3: not valid JSON")
    assert lines[1].startswith("line 4: messages[0].role: unknown role \"robot\"")
    assert lines[2].startswith("line 5: tools: unknown field 'tools' (tool calling examples are not supported)")
    assert lines[3].startswith("line 6: expected an object")
    assert lines[4].startswith("line 7: example has 2001 characters")  # 16 per token of max_model_len 64
    assert len(lines) == 5  # lines 1 and 2 (blank) are fine


def test_options_are_checked_against_the_servers_range(tmp_path):
    path = write(tmp_path, json.dumps(example()))
    with pytest.raises(OptionError, match="--epochs: epochs must be between 1 and 20"):
        read_examples(path, LIMITS, epochs=21)
    with pytest.raises(TrainFileError, match="no examples"):
        read_examples(write(tmp_path, ""), LIMITS)


def test_requests_respect_count_and_size_and_keys_are_stable(tmp_path):
    path = write(tmp_path, *(json.dumps(example(str(i))) for i in range(5)))
    lines = read_examples(path, LIMITS)
    requests = split_requests(lines, LIMITS)
    assert [r.lines for r in requests] == [(1, 2), (3, 4), (5,)]
    assert all(r.body["epochs"] == 3 for r in requests) and sum(r.steps for r in requests) == 15
    assert [r.idempotency_key for r in split_requests(lines, LIMITS)] == [r.idempotency_key for r in requests]
    assert len({r.idempotency_key for r in requests}) == 3
    other = split_requests(lines, LIMITS, epochs=1)
    assert not {r.idempotency_key for r in other} & {r.idempotency_key for r in requests}
    small = LIMITS.model_copy(update={"max_examples": 64, "max_body_bytes": 300})
    sized = split_requests(lines, small, learning_rate=1e-5)
    assert all(len(json.dumps(r.body)) <= 300 for r in sized) and len(sized) > 1
    assert all(r.body["learning_rate"] == 1e-5 for r in sized)
