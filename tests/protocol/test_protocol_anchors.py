"""The anchor file: YAML or JSON, validated once, with messages that name the conversation (the runtime and
the operator both parse it with this one model)."""

from __future__ import annotations

import json

import pytest

from onlinemodel_protocol import limits
from onlinemodel_protocol.anchors import AnchorFileError, parse_anchor_file

QA = [{"role": "user", "content": "How do I reset my password?"},
      {"role": "assistant", "content": "Open Settings, then Security."}]

# Two conversations, the first with an earlier reply that is context only (tests/runtime/trainer use it too).
SUPPORT = """
conversations:
  - messages:
      - {role: system, content: You are the support assistant of Acme.}
      - {role: user, content: "How do I reset my password?"}
      - {role: assistant, content: "Which account?"}
      - {role: user, content: My Acme account.}
      - {role: assistant, content: "Open Settings, then Security, then Reset password."}
  - messages: [{role: user, content: "What is Acme?"}, {role: assistant, content: Acme makes anvils.}]
"""


def conversations(*messages: list[dict[str, str]]) -> dict:
    return {"conversations": [{"messages": m} for m in messages]}


def test_yaml_and_json_give_the_same_file_and_only_the_last_reply_is_labelled():
    anchors = parse_anchor_file(SUPPORT)
    assert anchors.builtin and len(anchors.conversations) == 2
    assert parse_anchor_file(json.dumps(anchors.model_dump())) == anchors
    assert not parse_anchor_file(SUPPORT + "builtin: false\n").builtin
    assert [m.get("weight") for m in anchors.conversations[0].chat()] == [None, None, 0, None, None]
    assert anchors.conversations[1].chat() == [{"role": "user", "content": "What is Acme?"},
                                               {"role": "assistant", "content": "Acme makes anvils."}]


@pytest.mark.parametrize("text, message", [
    ("", "must be a mapping with 'conversations'"),
    ("[1, 2]", "must be a mapping"),
    ("conversations: [", "not YAML or JSON"),
    ("{}", "conversations: Field required"),
    ("builtin: false", "conversations: Field required"),
    (json.dumps({"conversations": []}), "conversations: List should have at least 1 item"),
    (json.dumps(conversations(QA[:1])), "conversations.0.messages: List should have at least 2 items"),
    (json.dumps(conversations(QA, list(reversed(QA)))), "conversations.1.messages: the last message must be the "
                                                         "assistant's"),
    (json.dumps(conversations([{"role": "system", "content": "x"}, QA[1]])), "conversations.0.messages: a "
                                                                            "conversation needs a user message"),
    (json.dumps(conversations([QA[0], {"role": "tool", "content": "x"}])), "conversations.0.messages.1.role"),
    (json.dumps(conversations([QA[0], {"role": "assistant", "content": " \n"}])),
     "conversations.0.messages.1.content: must not be blank"),
    (json.dumps(conversations([QA[0], {"role": "assistant", "content": "x" * limits.ANCHOR_CONVERSATION_MAX_CHARS}])),
     f"conversations.0.messages: {len(QA[0]['content']) + limits.ANCHOR_CONVERSATION_MAX_CHARS} characters; at most "
     f"{limits.ANCHOR_CONVERSATION_MAX_CHARS}"),
    (json.dumps(conversations(QA, [QA[0], {**QA[1], "content": "other"}], QA)),
     "anchors: conversations.2 repeats conversations.0"),
    (json.dumps(conversations(*[[{**QA[0], "content": f"q{i}"}, QA[1]]
                                for i in range(limits.ANCHOR_FILE_MAX_CONVERSATIONS + 1)])),
     f"conversations: List should have at most {limits.ANCHOR_FILE_MAX_CONVERSATIONS} items"),
    (json.dumps({**conversations(QA), "builtin": "maybe"}), "builtin: Input should be a valid boolean"),
    (json.dumps({**conversations(QA), "typo": 1}), "typo: Extra inputs are not permitted"),
    (json.dumps(conversations([QA[0], {**QA[1], "weight": 0}])), "conversations.0.messages.1.weight"),
    ("x" * (limits.ANCHOR_FILE_MAX_BYTES + 1), "larger than"),
])
def test_bad_anchor_files_are_refused_clearly(text, message):
    with pytest.raises(AnchorFileError) as refused:
        parse_anchor_file(text, source="anchors.yaml")
    assert str(refused.value).startswith("anchors.yaml: ") and message in str(refused.value), str(refused.value)
