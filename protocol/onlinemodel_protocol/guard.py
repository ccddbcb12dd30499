"""The guard file (``onlinemodel serve --guard FILE``, ``spec.training.guard`` of the CRD): what must keep
working after every training job (docs/guard.md).

YAML or JSON (JSON is YAML)::

    probes:
      - name: capital-of-france            # optional; default: probe-<index>
        messages: [{role: user, content: "What is the capital of France?"}]
        expect: Paris                      # substring of the greedy answer, case-insensitive
        max_tokens: 32                     # optional
    heldout:                               # optional
      text: "..."                          # plain text; its loss must not rise by more than max_increase
      max_increase: 0.05                   # relative (0.05: +5%)
    every_steps: 0                         # also evaluate every N steps of a job (0: after the job only)
    allow_job_opt_out: false               # true: POST /train {"guard": false} skips the guard for that job

Pure pydantic (plus PyYAML to read the text), so the operator validates a ConfigMap without torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from onlinemodel_protocol import limits
from onlinemodel_protocol.config_file import Strict, parse_config_file


class GuardFileError(ValueError):
    """A guard file that cannot be used; the message says where and why."""


class ProbeMessage(Strict):
    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1)


class ChatProbe(Strict):
    name: str = Field("", max_length=128)
    messages: list[ProbeMessage] = Field(min_length=1)
    expect: str = Field(min_length=1)
    max_tokens: int = Field(limits.GUARD_PROBE_MAX_TOKENS_DEFAULT, ge=1, le=limits.GUARD_PROBE_MAX_TOKENS_MAX)

    @field_validator("messages")
    @classmethod
    def _ends_with_user(cls, messages: list[ProbeMessage]) -> list[ProbeMessage]:
        if messages[-1].role != "user":
            raise ValueError("the last message must be the user's: the model answers it")
        return messages

    def passes(self, answer: str) -> bool:
        return self.expect.casefold() in answer.casefold()


class HeldOut(Strict):
    text: str = Field(min_length=1)
    max_increase: float = Field(limits.GUARD_HELDOUT_MAX_INCREASE_DEFAULT, ge=0, allow_inf_nan=False)


class GuardFile(Strict):
    probes: list[ChatProbe] = Field(default_factory=list, max_length=limits.GUARD_MAX_PROBES)
    heldout: HeldOut | None = None
    every_steps: int = Field(0, ge=0)
    allow_job_opt_out: bool = False

    @model_validator(mode="after")
    def _named_and_nonempty(self) -> GuardFile:
        if not self.probes and self.heldout is None:
            raise ValueError("a guard needs at least one probe or a heldout text")
        named = [p if p.name else p.model_copy(update={"name": f"probe-{i}"}) for i, p in enumerate(self.probes)]
        names = [p.name for p in named]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"probe names must be unique; repeated: {', '.join(duplicates)}")
        object.__setattr__(self, "probes", named)  # frozen: the defaults filled in once, here
        return self


def parse_guard_file(text: str | bytes, source: str = "guard file") -> GuardFile:
    """The guard file `text` (YAML or JSON), validated; GuardFileError naming `source` otherwise."""
    return parse_config_file(text, GuardFile, source=source, max_bytes=limits.GUARD_FILE_MAX_BYTES, what="guard",
                             shape="'probes' and/or 'heldout'", error=GuardFileError)
