"""Training requests: validation of `POST /train` bodies, their defaults, and encoding of chat examples.

Format: OpenAI's chat fine-tuning format,
    {"examples": [{"messages": [{"role": "system|user|assistant", "content": "..."}]}],
     "epochs": N?, "learning_rate": x?, "guard": false?}
Policy on extra keys (documented in docs/api.md by the HTTP layer):
  - an assistant message may carry OpenAI's `"weight": 0 | 1` (0 = context only, no loss on it);
  - every other unknown key (`tools`, `tool_calls`, `name`, `functions`, top-level `model`, ...)
    is refused with a clear error rather than silently ignored, since ignoring it would train on
    something other than what the user sent.
This is where a request's defaults are resolved (epochs, learning rate: the server's configuration) and
its bounds checked (onlinemodel_protocol.limits, via RuntimeConfig); the trainer receives a complete
`TrainJob`. Loss is on assistant tokens only (the content and the template's end-of-turn marker); every
other label is IGNORE_INDEX. Labels are aligned with input_ids (transformers shifts them inside the model).
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from onlinemodel_protocol.api import TrainLimits
from onlinemodel_protocol.config import RuntimeConfig
from onlinemodel_protocol.limits import LEARNING_RATE_MAX, MAX_CHARS_PER_TOKEN, MAX_MESSAGES
from onlinemodel_protocol.rpc import IGNORE_INDEX, EncodedExample, TrainJob
from onlinemodel_runtime.server.assistant_spans import (SpanError, TurnMarkers, assistant_spans, label_mask,
                                                        probe_markers)

ROLES = ("system", "user", "assistant")


class ExampleError(ValueError):
    """A bad training request. `param` is a path such as `examples[0].messages[2].role`.

    `code` is a short machine-readable reason; `http_status` is the suggested status (413 for
    requests that are too large, 400 otherwise).
    """

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_request",
                 http_status: int = 400):
        super().__init__(message if param is None else f"{param}: {message}")
        self.message = message
        self.param = param
        self.code = code
        self.http_status = http_status


_STRICT = ConfigDict(strict=True, extra="forbid", frozen=True)


class ChatMessage(BaseModel):
    model_config = _STRICT

    role: str
    content: Any
    weight: Literal[0, 1] | None = None

    @field_validator("role", mode="plain")
    @classmethod
    def _role(cls, value: Any) -> str:
        if value not in ROLES:
            raise PydanticCustomError("unknown_role", "unknown role {role}; expected one of system, user, assistant",
                                      {"role": json.dumps(value) if isinstance(value, (str, int, float)) else
                                       type(value).__name__})
        return value

    @field_validator("content", mode="plain")
    @classmethod
    def _content(cls, value: Any) -> str:
        if not isinstance(value, str):
            raise PydanticCustomError("invalid_content", "content must be a string, found {found}",
                                      {"found": type(value).__name__ if value is not None else "null"})
        if not value.strip():
            raise PydanticCustomError("invalid_content", "content must not be empty")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:  # JSON allows "\ud800"; no tokenizer does
            raise PydanticCustomError("invalid_unicode", "content is not valid Unicode: {reason}",
                                      {"reason": exc.reason}) from None
        return value


class TrainingExample(BaseModel):
    model_config = _STRICT

    messages: list[ChatMessage] = Field(min_length=1)


class TrainRequest(BaseModel):
    """A `POST /train` body. After `parse_train_request`, `epochs` and `learning_rate` are never None:
    absent ones are the server's configured defaults."""

    model_config = _STRICT

    examples: list[TrainingExample]
    epochs: int | None = None
    learning_rate: float | None = None
    guard: bool = True  # false: skip the guard for this job (only where the guard file allows it)


def _param_path(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


_TOO_LARGE = 413


def parse_train_request(body: bytes | str | Mapping[str, Any], cfg: RuntimeConfig | TrainLimits) -> TrainRequest:
    """Parse and validate a request body (JSON text or decoded object) against `cfg`'s limits, and fill
    in `cfg`'s defaults; raise ExampleError. `cfg` is the server's config, or the ``GET /train/limits``
    a client read from it (``onlinemodel train`` checks a file with this function before sending it)."""
    if isinstance(body, (bytes, bytearray, str)):
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ExampleError(f"body is not valid JSON: {exc}", None, "invalid_json") from None
        except RecursionError:
            raise ExampleError("body is not valid JSON: nested too deeply", None, "invalid_json") from None
    else:
        data = body
    if not isinstance(data, Mapping):
        raise ExampleError("body must be a JSON object with an 'examples' list", None, "invalid_type")
    examples = data.get("examples")
    if "examples" not in data:
        raise ExampleError("'examples' is required", "examples", "missing")
    # Cheap checks first, so a huge request is refused before validating every example.
    if isinstance(examples, list):
        if not examples:
            raise ExampleError("'examples' must not be empty", "examples", "empty_examples")
        if len(examples) > cfg.max_examples:
            raise ExampleError(f"too many examples: {len(examples)}; at most {cfg.max_examples} per request",
                               "examples", "too_many_examples", _TOO_LARGE)
        for i, ex in enumerate(examples):
            msgs = ex.get("messages") if isinstance(ex, Mapping) else None
            if isinstance(msgs, list) and len(msgs) > MAX_MESSAGES:
                raise ExampleError(f"too many messages: {len(msgs)}; at most {MAX_MESSAGES}",
                                   f"examples[{i}].messages", "too_many_messages", _TOO_LARGE)
    try:
        request = TrainRequest.model_validate(data)
    except ValidationError as exc:
        raise _from_validation_error(exc) from None
    _check_semantics(request, cfg.max_epochs)
    return request.model_copy(update={
        "epochs": cfg.default_epochs if request.epochs is None else request.epochs,
        "learning_rate": cfg.learning_rate if request.learning_rate is None else request.learning_rate})


def _from_validation_error(exc: ValidationError) -> ExampleError:
    err = exc.errors(include_url=False)[0]
    loc = [p for p in err["loc"] if p not in ("function-plain",)]
    param = _param_path(loc) or None
    kind = err["type"]
    msg = err["msg"]
    if kind == "extra_forbidden":
        field = str(loc[-1]) if loc else "?"
        msg = f"unknown field {field!r}"
        if field in ("tools", "tool_calls", "functions", "function_call", "parallel_tool_calls"):
            msg += " (tool calling examples are not supported)"
        elif field == "weight" or (field == "name" and "messages" in loc):
            msg += " (supported message fields: role, content, and weight on assistant messages)"
        return ExampleError(msg, param, "unknown_field")
    if kind == "missing":
        return ExampleError("field required", param, "missing")
    if kind == "too_short" and loc and loc[-1] == "messages":
        return ExampleError("'messages' must not be empty", param, "empty_messages")
    if kind == "literal_error" and loc and loc[-1] == "weight":
        return ExampleError("weight must be 0 or 1", param, "invalid_weight")
    if kind in ("unknown_role", "invalid_content", "invalid_unicode"):
        return ExampleError(msg, param, kind)
    if kind == "string_unicode":  # a field name that is not valid Unicode ("\udfff")
        return ExampleError("field names must be valid Unicode", param, "invalid_unicode")
    if loc == ["guard"]:
        return ExampleError("guard must be true or false", param, "invalid_type")
    if loc == ["epochs"] or loc == ["learning_rate"]:
        return ExampleError(f"{loc[0]} must be a number" if loc[0] == "learning_rate" else "epochs must be an integer",
                            param, "invalid_type")
    return ExampleError(msg, param, "invalid_type")


def _check_semantics(request: TrainRequest, max_epochs: int) -> None:
    for i, example in enumerate(request.examples):
        for j, m in enumerate(example.messages):
            if m.weight is not None and m.role != "assistant":
                raise ExampleError("weight is only allowed on assistant messages",
                                   f"examples[{i}].messages[{j}].weight", "invalid_weight")
        if not any(m.role == "assistant" and m.weight != 0 for m in example.messages):
            raise ExampleError("example has no assistant turn to learn from (need a message with role "
                               "'assistant' and weight not 0)", f"examples[{i}].messages", "no_assistant_turn")
    if request.epochs is not None and not 1 <= request.epochs <= max_epochs:
        raise ExampleError(f"epochs must be between 1 and {max_epochs}, got {request.epochs}",
                           "epochs", "out_of_range")
    lr = request.learning_rate
    if lr is not None and (not math.isfinite(lr) or not 0.0 < lr <= LEARNING_RATE_MAX):
        raise ExampleError(f"learning_rate must be > 0.0 and <= {LEARNING_RATE_MAX}, got {lr}",
                           "learning_rate", "out_of_range")


def _renderer(tokenizer: Any, param: str):
    def render(messages: list[dict[str, str]], generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as exc:  # the template's raise_exception (e.g. roles out of order), or its own bug
            raise ExampleError(f"the model's chat template refused these messages: {type(exc).__name__}: {exc}",
                               param, "template_error") from None
    return render


def _markers(tokenizer: Any, param: str) -> TurnMarkers | None:
    def token_starts(text: str) -> list[int]:
        return [lo for lo, _ in tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
    return probe_markers(_renderer(tokenizer, param), token_starts)


def _check_tokenizer(tokenizer: Any, param: str) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ExampleError("the model's tokenizer has no chat template", param, "no_chat_template")
    if not getattr(tokenizer, "is_fast", False):
        raise ExampleError("a fast tokenizer (with offset mapping) is required", param, "slow_tokenizer")


def check_length(messages: Sequence[ChatMessage], max_len: int, param: str) -> None:
    """Refuse an example that cannot fit `max_len` tokens before rendering it (rendering and tokenizing
    cost time in proportion to its text)."""
    chars = sum(len(m.content) for m in messages)
    if chars > MAX_CHARS_PER_TOKEN * max_len:
        raise ExampleError(f"example has {chars} characters; at most {MAX_CHARS_PER_TOKEN} per token of the "
                           f"model's maximum length ({max_len} tokens) are accepted", param, "example_too_long",
                           _TOO_LARGE)


def encode_example(tokenizer: Any, messages: Sequence[ChatMessage | Mapping[str, Any]], max_len: int,
                   *, param: str = "messages", markers: TurnMarkers | None = None) -> EncodedExample:
    """Render `messages` with the tokenizer's chat template; labels only on assistant tokens.

    The conversation is rendered once; the assistant spans are found in it (``assistant_spans``, with the
    template's `markers`, probed here unless given). The full text is tokenized once and tokens are
    labelled by their character offsets, so BPE merges across turn boundaries cannot shift the mask.
    Raises ExampleError if the example is too long (checked on its characters before rendering, and on its
    tokens after) or leaves no assistant token.
    """
    msgs = [m if isinstance(m, ChatMessage) else ChatMessage.model_validate(dict(m)) for m in messages]
    check_length(msgs, max_len, param)
    _check_tokenizer(tokenizer, param)
    render = _renderer(tokenizer, param)
    plain = [{"role": m.role, "content": m.content} for m in msgs]
    full = render(plain, False)
    if markers is None:
        markers = _markers(tokenizer, param)
    trained = [m.role == "assistant" and m.weight != 0 for m in msgs]
    try:
        spans = assistant_spans(render, plain, trained, full, markers)
    except SpanError as exc:
        where = f"{param}[{exc.turn}]" if param == "messages" else f"{param}.messages[{exc.turn}]"
        raise ExampleError(str(exc), where, "template_unsupported") from None
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(enc["input_ids"])
    if len(input_ids) > max_len:
        raise ExampleError(f"example is {len(input_ids)} tokens long; the model's maximum is {max_len}",
                           param, "example_too_long", _TOO_LARGE)
    labels = [t if inside else IGNORE_INDEX for t, inside in zip(input_ids, label_mask(enc["offset_mapping"], spans))]
    if all(x == IGNORE_INDEX for x in labels):
        raise ExampleError("no assistant tokens after rendering with the chat template", param, "no_assistant_turn")
    return EncodedExample(input_ids=input_ids, labels=labels)


def encode_request(tokenizer: Any, request: TrainRequest, max_len: int) -> TrainJob:
    """The trainer's job for a parsed request: every example encoded (errors name `examples[i]`).

    Every example's length is checked before any is rendered, and the template's markers are probed once.
    """
    for i, ex in enumerate(request.examples):
        check_length(ex.messages, max_len, f"examples[{i}]")
    _check_tokenizer(tokenizer, "examples")
    markers = _markers(tokenizer, "examples")
    examples = [encode_example(tokenizer, ex.messages, max_len, param=f"examples[{i}]", markers=markers)
                for i, ex in enumerate(request.examples)]
    return TrainJob(examples=examples, epochs=request.epochs, learning_rate=request.learning_rate,
                    guard=request.guard)
