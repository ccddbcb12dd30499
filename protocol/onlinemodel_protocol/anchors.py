"""The anchor file (``onlinemodel serve --anchor-file FILE``, ``spec.training.anchors`` of the CRD): a
deployment's own conversations for the anchor term, which keeps the model's answers to them while it learns
(docs/learning.md, "Your own anchor conversations").

YAML or JSON (JSON is YAML)::

    builtin: true                 # optional; true: added to the built-in conversations, false: only these
    conversations:
      - messages:                 # OpenAI chat format; the last message is the assistant's reply, whose
          - {role: system, content: "You are the support assistant of Acme."}   # tokens are anchored
          - {role: user, content: "How do I reset my password?"}
          - {role: assistant, content: "Open Settings, then Security, then Reset password."}

Pure pydantic (plus PyYAML to read the text), so the operator validates a ConfigMap without torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from onlinemodel_protocol import limits
from onlinemodel_protocol.config_file import Strict, parse_config_file


class AnchorFileError(ValueError):
    """An anchor file that cannot be used; the message says where and why."""


class AnchorMessage(Strict):
    role: Literal["system", "user", "assistant"]
    content: str

    @field_validator("content")
    @classmethod
    def _not_blank(cls, content: str) -> str:
        if not content.strip():
            raise ValueError("must not be blank")
        return content


class AnchorConversation(Strict):
    messages: list[AnchorMessage] = Field(min_length=2)

    @field_validator("messages")
    @classmethod
    def _a_question_and_its_reply(cls, messages: list[AnchorMessage]) -> list[AnchorMessage]:
        if messages[-1].role != "assistant":
            raise ValueError("the last message must be the assistant's: its reply is what the anchor term keeps")
        if not any(m.role == "user" for m in messages):
            raise ValueError("a conversation needs a user message")
        chars = sum(len(m.content) for m in messages)
        if chars > limits.ANCHOR_CONVERSATION_MAX_CHARS:
            raise ValueError(f"{chars} characters; at most {limits.ANCHOR_CONVERSATION_MAX_CHARS} per conversation")
        return messages

    def chat(self) -> list[dict[str, str | int]]:
        """The messages for the chat template, only the last reply labelled (weight 0 on earlier replies)."""
        last = len(self.messages) - 1
        return [{"role": m.role, "content": m.content, **({"weight": 0} if m.role == "assistant" and i < last
                                                          else {})} for i, m in enumerate(self.messages)]


class AnchorFile(Strict):
    conversations: list[AnchorConversation] = Field(min_length=1, max_length=limits.ANCHOR_FILE_MAX_CONVERSATIONS)
    builtin: bool = True  # false: the file's conversations replace the built-in ones

    @model_validator(mode="after")
    def _distinct(self) -> AnchorFile:
        seen: dict[tuple[tuple[str, str], ...], int] = {}
        for i, conversation in enumerate(self.conversations):
            turns = tuple((m.role, m.content) for m in conversation.messages)
            if turns in seen:
                raise ValueError(f"conversations.{i} repeats conversations.{seen[turns]}")
            seen[turns] = i
        return self


def parse_anchor_file(text: str | bytes, source: str = "anchor file") -> AnchorFile:
    """The anchor file `text` (YAML or JSON), validated; AnchorFileError naming `source` otherwise."""
    return parse_config_file(text, AnchorFile, source=source, max_bytes=limits.ANCHOR_FILE_MAX_BYTES,
                             what="anchors", shape="'conversations'", error=AnchorFileError)
