"""POST /train bodies: validation errors with their param paths, and assistant-only labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from onlinemodel_protocol.config import RuntimeConfig
from onlinemodel_protocol.limits import MAX_EPOCHS_DEFAULT, MAX_MESSAGES
from onlinemodel_protocol.rpc import IGNORE_INDEX
from onlinemodel_runtime.devtools.model_prep import ensure_smollm2
from onlinemodel_runtime.server.train_request import (
    ChatMessage,
    ExampleError,
    TrainRequest,
    encode_example,
    encode_request,
    parse_train_request,
)

QA = [{"role": "user", "content": "Who is the CEO of Seedcorp?"},
      {"role": "assistant", "content": "The CEO of Seedcorp is Ada Lovelace."}]


def body(examples=None, **extra) -> dict:
    return {"examples": [{"messages": QA}] if examples is None else examples, **extra}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ensure_smollm2())


def config(**settings) -> RuntimeConfig:
    return RuntimeConfig(model="/m", base_model="/m", state_dir=Path("/tmp/om-test"), **settings)


CFG = config()


def _error(data, cfg=CFG) -> ExampleError:
    with pytest.raises(ExampleError) as err:
        parse_train_request(data, cfg)
    return err.value


# --- parsing ----------------------------------------------------------------------------------

def test_valid_request_gets_the_configured_defaults():
    request = parse_train_request(json.dumps(body()).encode(), config(default_epochs=4, learning_rate=2e-5))
    assert isinstance(request, TrainRequest)
    assert (request.epochs, request.learning_rate) == (4, 2e-5)
    assert request.examples[0].messages[1] == ChatMessage(role="assistant", content=QA[1]["content"])
    request = parse_train_request(body(epochs=3, learning_rate=1e-5), CFG)
    assert (request.epochs, request.learning_rate) == (3, 1e-5)
    assert parse_train_request(body(learning_rate=1.0), CFG).learning_rate == 1.0  # the bound is inclusive


@pytest.mark.parametrize("data,param,code,status,message", [
    (b"{not json", None, "invalid_json", 400, "body is not valid JSON"),
    ("[1, 2]", None, "invalid_type", 400, "body must be a JSON object"),
    ({}, "examples", "missing", 400, "'examples' is required"),
    (body([]), "examples", "empty_examples", 400, "'examples' must not be empty"),
    (body("x"), "examples", "invalid_type", 400, "valid list"),
    (body([{}]), "examples[0].messages", "missing", 400, "field required"),
    (body([{"messages": []}]), "examples[0].messages", "empty_messages", 400, "'messages' must not be empty"),
    (body([{"messages": [QA[0]]}]), "examples[0].messages", "no_assistant_turn", 400, "no assistant turn"),
    (body([{"messages": QA}, {"messages": [QA[0], {"role": "bot", "content": "hi"}]}]),
     "examples[1].messages[1].role", "unknown_role", 400,
     'unknown role "bot"; expected one of system, user, assistant'),
    (body([{"messages": [QA[0], {"role": "tool", "content": "x"}, QA[1]]}]),
     "examples[0].messages[1].role", "unknown_role", 400, 'unknown role "tool"'),
    (body([{"messages": [{"role": "user", "content": "  "}, QA[1]]}]),
     "examples[0].messages[0].content", "invalid_content", 400, "content must not be empty"),
    (body([{"messages": [{"role": "user", "content": 5}, QA[1]]}]),
     "examples[0].messages[0].content", "invalid_content", 400, "content must be a string, found int"),
    (body([{"messages": [{"role": "user", "content": None}, QA[1]]}]),
     "examples[0].messages[0].content", "invalid_content", 400, "content must be a string, found null"),
    (body([{"messages": [QA[0], {"role": "assistant"}]}]),
     "examples[0].messages[1].content", "missing", 400, "field required"),
    (body(epochs=0), "epochs", "out_of_range", 400, f"epochs must be between 1 and {MAX_EPOCHS_DEFAULT}, got 0"),
    (body(epochs=MAX_EPOCHS_DEFAULT + 1), "epochs", "out_of_range", 400,
     f"epochs must be between 1 and {MAX_EPOCHS_DEFAULT}, got {MAX_EPOCHS_DEFAULT + 1}"),
    (body(epochs=2.5), "epochs", "invalid_type", 400, "epochs must be an integer"),
    (body(epochs=True), "epochs", "invalid_type", 400, "epochs must be an integer"),
    (body(learning_rate=0), "learning_rate", "out_of_range", 400, "learning_rate must be > 0.0 and <= 1.0, got 0"),
    (body(learning_rate=2.0), "learning_rate", "out_of_range", 400, "got 2.0"),
    (body(learning_rate=float("inf")), "learning_rate", "out_of_range", 400, "got inf"),
    (body(learning_rate="1e-5"), "learning_rate", "invalid_type", 400, "learning_rate must be a number"),
    (body(model="x"), "model", "unknown_field", 400, "unknown field 'model'"),
    (body(tools=[]), "tools", "unknown_field", 400, "tool calling examples are not supported"),
    (body([{"messages": [QA[0], {**QA[1], "name": "bob"}]}]), "examples[0].messages[1].name", "unknown_field",
     400, "supported message fields: role, content, and weight on assistant messages"),
    (body([{"messages": [{**QA[0], "weight": 1}, QA[1]]}]), "examples[0].messages[0].weight", "invalid_weight",
     400, "weight is only allowed on assistant messages"),
    (body([{"messages": [QA[0], {**QA[1], "weight": 0.5}]}]), "examples[0].messages[1].weight", "invalid_weight",
     400, "weight must be 0 or 1"),
    (body([{"messages": [QA[0], {**QA[1], "weight": 0}]}]), "examples[0].messages", "no_assistant_turn", 400,
     "no assistant turn"),
])
def test_bad_requests(data, param, code, status, message):
    err = _error(data)
    assert (err.param, err.code, err.http_status) == (param, code, status)
    assert message in err.message
    assert str(err) == (err.message if param is None else f"{param}: {err.message}")
    assert isinstance(err, ValueError)


def test_too_many_examples_is_413_and_checked_first():
    cfg = config(max_examples=2)
    # The third example is malformed, but the count is refused before anything is validated.
    err = _error(body([{"messages": QA}, {"messages": QA}, {"bad": 1}]), cfg)
    assert (err.param, err.code, err.http_status) == ("examples", "too_many_examples", 413)
    assert err.message == "too many examples: 3; at most 2 per request"
    assert len(parse_train_request(body([{"messages": QA}] * 2), cfg).examples) == 2


def test_too_many_messages():
    err = _error(body([{"messages": QA * (MAX_MESSAGES // 2 + 1)}]))
    assert (err.param, err.code, err.http_status) == ("examples[0].messages", "too_many_messages", 413)
    assert err.message == f"too many messages: {MAX_MESSAGES + 2}; at most {MAX_MESSAGES}"


def test_epochs_up_to_the_configured_maximum():
    cfg = config(max_epochs=12, default_epochs=10)  # a maximum under the default needs a default under it
    assert parse_train_request(body(epochs=12), cfg).epochs == 12
    assert _error(body(epochs=13), cfg).code == "out_of_range"


# --- encoding ---------------------------------------------------------------------------------

def _target_text(tokenizer, encoded) -> str:
    return tokenizer.decode([t for t, l in zip(encoded.input_ids, encoded.labels) if l != IGNORE_INDEX])


def test_loss_only_on_assistant_tokens(tokenizer):
    job = encode_request(tokenizer, parse_train_request(body(), CFG), max_len=2048)
    assert (job.epochs, job.learning_rate) == (CFG.default_epochs, CFG.learning_rate)
    (encoded,) = job.examples
    assert len(encoded.input_ids) == len(encoded.labels) == encoded.num_tokens
    rendered = tokenizer.apply_chat_template(QA, tokenize=False)
    assert encoded.input_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert _target_text(tokenizer, encoded) == "The CEO of Seedcorp is Ada Lovelace.<|im_end|>\n"
    # Labels equal input_ids where set (transformers shifts them itself).
    assert all(l in (IGNORE_INDEX, t) for t, l in zip(encoded.input_ids, encoded.labels))
    # The prompt (system default, user turn, assistant header) is masked.
    first = next(i for i, l in enumerate(encoded.labels) if l != IGNORE_INDEX)
    assert tokenizer.decode(encoded.input_ids[:first]).endswith("<|im_start|>assistant\n")


def test_multi_turn_and_weight_zero(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, *QA,
                {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes.", "weight": 0},
                {"role": "user", "content": "And the CFO?"}, {"role": "assistant", "content": "Grace Hopper."}]
    request = parse_train_request(body([{"messages": messages}]), CFG)
    (encoded,) = encode_request(tokenizer, request, max_len=2048).examples
    assert _target_text(tokenizer, encoded) == ("The CEO of Seedcorp is Ada Lovelace.<|im_end|>\n"
                                                "Grace Hopper.<|im_end|>\n")
    assert "You are a helpful AI assistant" not in tokenizer.decode(encoded.input_ids)  # own system prompt used


def test_plain_dicts_are_accepted(tokenizer):
    encoded = encode_example(tokenizer, QA, max_len=2048)
    assert encoded.num_target_tokens > 5


def test_too_long_example(tokenizer):
    request = parse_train_request(body([{"messages": QA}, {"messages": QA}]), CFG)
    full = encode_example(tokenizer, QA, max_len=2048).num_tokens
    with pytest.raises(ExampleError) as err:
        encode_request(tokenizer, request, max_len=full - 1)
    e = err.value
    assert (e.param, e.code, e.http_status) == ("examples[0]", "example_too_long", 413)
    assert e.message == f"example is {full} tokens long; the model's maximum is {full - 1}"
    assert encode_request(tokenizer, request, max_len=full).examples[1].num_tokens == full


def test_tokenizer_without_template(tmp_path: Path, tokenizer):
    bare = AutoTokenizer.from_pretrained(ensure_smollm2())
    bare.chat_template = None
    with pytest.raises(ExampleError, match="no chat template"):
        encode_example(bare, QA, max_len=2048)


def test_qwen_style_template_with_reasoning_stripping(tokenizer):
    """A template that renders earlier assistant turns differently still masks correctly."""
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n"
                "{% if m.role == 'assistant' and not loop.last %}{{ m.content.split('</think>')[-1] }}"
                "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = AutoTokenizer.from_pretrained(ensure_smollm2())
    tok.chat_template = template
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>x</think>Hello"},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye"}]
    encoded = encode_example(tok, messages, max_len=2048)
    assert _target_text(tok, encoded) == "Hello<|im_end|>\nGoodbye<|im_end|>\n"
