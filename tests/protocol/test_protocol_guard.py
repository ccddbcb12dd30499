"""The guard file: YAML or JSON, validated once, with messages that name the field (the runtime and the
operator both parse it with this one model)."""

from __future__ import annotations

import json

import pytest

from onlinemodel_protocol import limits
from onlinemodel_protocol.guard import GuardFileError, parse_guard_file

PROBE = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "expect": "Paris"}


def test_yaml_and_json_give_the_same_guard():
    text = """
probes:
  - messages: [{role: user, content: "What is the capital of France?"}]
    expect: Paris
  - name: named
    messages: [{role: system, content: terse}, {role: user, content: hi}]
    expect: hello
    max_tokens: 8
heldout: {text: "Some ordinary text."}
every_steps: 10
"""
    guard = parse_guard_file(text)
    assert [p.name for p in guard.probes] == ["probe-0", "named"]
    assert guard.probes[0].max_tokens == limits.GUARD_PROBE_MAX_TOKENS_DEFAULT
    assert guard.heldout.max_increase == limits.GUARD_HELDOUT_MAX_INCREASE_DEFAULT
    assert (guard.every_steps, guard.allow_job_opt_out) == (10, False)
    assert parse_guard_file(json.dumps(guard.model_dump())) == guard
    assert guard.probes[0].passes("The capital of france is PARIS.") and not guard.probes[0].passes("Lyon")


@pytest.mark.parametrize("text, message", [
    ("", "must be a mapping"),
    ("[1, 2]", "must be a mapping"),
    ("probes: [", "not YAML or JSON"),
    ("{}", "at least one probe or a heldout text"),
    ("probes: []", "at least one probe or a heldout text"),
    (json.dumps({"probes": [PROBE, {**PROBE, "name": "probe-0"}]}), "repeated: probe-0"),
    (json.dumps({"probes": [{**PROBE, "messages": [{"role": "assistant", "content": "x"}]}]}), "last message"),
    (json.dumps({"probes": [{**PROBE, "messages": [{"role": "tool", "content": "x"}]}]}), "probes.0.messages.0.role"),
    (json.dumps({"probes": [{**PROBE, "expect": ""}]}), "probes.0.expect"),
    (json.dumps({"probes": [{**PROBE, "max_tokens": limits.GUARD_PROBE_MAX_TOKENS_MAX + 1}]}), "max_tokens"),
    (json.dumps({"probes": [PROBE] * (limits.GUARD_MAX_PROBES + 1)}), "probes"),
    (json.dumps({"heldout": {"text": "x", "max_increase": -0.1}}), "heldout.max_increase"),
    (json.dumps({"probes": [PROBE], "every_steps": -1}), "every_steps"),
    (json.dumps({"probes": [PROBE], "typo": 1}), "typo"),
    ("x" * (limits.GUARD_FILE_MAX_BYTES + 1), "larger than"),
])
def test_bad_guard_files_are_refused_clearly(text, message):
    with pytest.raises(GuardFileError) as refused:
        parse_guard_file(text, source="guard.yaml")
    assert str(refused.value).startswith("guard.yaml: ") and message in str(refused.value)
