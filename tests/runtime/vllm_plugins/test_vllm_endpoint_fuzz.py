"""Property-based fuzzing of POST /train: the real routes, parser and SmolLM2 tokenizer, a stand-in trainer.

Bodies (arbitrary JSON, near-valid requests with hostile values, raw bytes, sizes over the cap sent in
random chunks), headers (Authorization, Idempotency-Key, a Content-Length that lies) and two chat
templates (SmolLM2's, and one that raises on roles out of order). For every request: never a 5xx; every
refusal is a 4xx in OpenAI's error shape; a refused request queues nothing (the stand-in's weight version
does not move); an accepted one queues exactly one job, or none when it replays an Idempotency-Key.
Bounded to about a minute on a 2-core machine.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from endpoint_helpers import StubSupervisor, asgi_request, error_of, make_app
from onlinemodel_protocol.api import TrainAccepted
from onlinemodel_protocol.limits import MAX_BODY_BYTES_MIN
from onlinemodel_runtime.devtools.model_prep import ensure_smollm2

TOKEN = "fuzz-token"
STRICT_TEMPLATE = (
    "{% for m in messages %}{% if m.role != 'system' and (m.role == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")



def mostly(usual, *others):
    """`usual` seven times in ten, else one of `others`."""
    return st.integers(0, 9).flatmap(lambda i: usual if i < 7 else st.one_of(*others))


# Text with what breaks naive handling: lone surrogates, NUL, template syntax, markers, long runs.
plain_text = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=30).filter(str.strip)
# Over the model's length (512 tokens here): in tokens only, or already in characters.
long_text = st.sampled_from([3000, 5000]).map(lambda n: "w " * n)
texts = st.one_of(
    plain_text,
    st.text(max_size=40),
    st.lists(st.sampled_from(["\ud800", "\udfff", "\x00", "{{", "}}", "{%", "<|im_end|>", "\n", " ", "é"]),
             max_size=12).map("".join),
    st.sampled_from(["", " ", "<|im_start|>assistant\n", "{{ raise_exception('x') }}"]),
    long_text,
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), texts)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(texts, inner, max_size=4), max_leaves=20)
roles = st.one_of(st.sampled_from(["system", "user", "assistant", "tool", "bot", ""]), scalars)


@st.composite
def train_bodies(draw):
    """A valid request, then up to three hostile changes to it."""
    examples = []
    for _ in range(draw(st.integers(1, 3))):
        messages = [{"role": "system", "content": draw(plain_text)}] if draw(st.booleans()) else []
        messages += [{"role": ("user", "assistant")[i % 2], "content": draw(mostly(plain_text, long_text))}
                     for i in range(draw(st.integers(2, 6)))]
        examples.append({"messages": messages})
    body = {"examples": examples}
    if draw(st.booleans()):
        body["epochs"] = draw(st.integers(1, 3))
    if draw(st.booleans()):
        body["learning_rate"] = draw(st.floats(1e-6, 1e-3))
    for _ in range(max(0, draw(st.integers(0, 5)) - 2)):
        found = [e for e in body.get("examples", []) if isinstance(body.get("examples"), list) and isinstance(e, dict)]
        example = draw(st.sampled_from(found)) if found else {}
        found = [m for m in example.get("messages", []) if isinstance(example.get("messages"), list)
                 and isinstance(m, dict)]
        message = draw(st.sampled_from(found)) if found else {}
        change = draw(st.integers(0, 9))
        if change == 0:
            message["role"] = draw(roles)
        elif change == 1:
            message["content"] = draw(st.one_of(texts, scalars, json_values))
        elif change == 2:
            message["weight"] = draw(st.one_of(st.sampled_from([0, 1]), scalars))
        elif change == 3:
            draw(st.sampled_from([body, example, message]))[draw(texts)] = draw(json_values)
        elif change == 4:
            body[draw(st.sampled_from(["epochs", "learning_rate"]))] = draw(scalars)
        elif change == 5 and isinstance(example.get("messages"), list):
            draw(st.randoms()).shuffle(example["messages"])  # roles out of order
        elif change == 6 and isinstance(body.get("examples"), list):
            body["examples"] = body["examples"] * draw(st.sampled_from([0, 30]))  # none, or too many
        elif change == 7:
            draw(st.sampled_from([body, example, message])).clear()
        elif change == 8:
            body[draw(st.sampled_from(["examples", "epochs"]))] = draw(json_values)
        elif change == 9 and isinstance(example.get("messages"), list):
            example["messages"] = example["messages"] * 50  # more messages than allowed
    return body


raw_bodies = st.one_of(
    train_bodies().map(lambda b: json.dumps(b, allow_nan=True, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    train_bodies().map(lambda b: json.dumps(b, allow_nan=True).encode()),
    train_bodies().map(lambda b: json.dumps(b).encode()),
    json_values.map(lambda v: json.dumps(v, allow_nan=True).encode()),
    st.binary(max_size=64),
    st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
)
garbage = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=255), max_size=20)
auth_headers = mostly(st.just(f"Bearer {TOKEN}"), st.just(f"bearer   {TOKEN} "), st.none(), garbage)
idempotency_keys = mostly(st.none(), st.sampled_from(["k1", "k2", "retry-me"]), garbage)


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def apps():
    """(app, supervisor) with SmolLM2's template, with a template that raises, and with the smallest cap."""
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(ensure_smollm2())
    strict = AutoTokenizer.from_pretrained(ensure_smollm2())
    strict.chat_template = STRICT_TEMPLATE
    out = []
    for tokenizer, cfg in ((plain, {}), (strict, {}), (plain, {"max_body_bytes": MAX_BODY_BYTES_MIN})):
        sup = StubSupervisor()
        out.append((make_app(tokenizer, sup, (TOKEN,), max_len=512, **cfg), sup))
    return out


def split(body: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(body) + 1) for c in cuts} | {0, len(body)})
    return [body[a:b] for a, b in zip(points, points[1:])] or [b""]


@settings(max_examples=1500, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 2), body=raw_bodies, auth=auth_headers, key=idempotency_keys,
       length=st.one_of(st.none(), st.just("true"), st.integers(0, 10**9).map(str), st.text(max_size=4)),
       cuts=st.lists(st.integers(0, 10**6), max_size=4))
def test_no_body_or_header_gets_a_5xx_or_trains_when_refused(loop, apps, which, body, auth, key, length, cuts):
    app, sup = apps[which]
    headers = {}
    for name, value in (("Authorization", auth), ("Idempotency-Key", key)):
        if value is not None:
            headers[name] = value
    if length == "true":
        headers["Content-Length"] = str(len(body))
    elif length is not None and length.isascii() and length.isprintable():
        headers["Content-Length"] = length
    before = (sup.weight_version, len(sup.jobs))
    status, response_headers, answer = loop.run_until_complete(
        asgi_request(app, "POST", "/train", headers=headers, chunks=split(body, cuts)))
    assert status < 500, answer
    if status >= 400:
        error = error_of(answer)
        event(f"app {which}: {status} {error['code']}")  # what was exercised: --hypothesis-show-statistics
        assert (sup.weight_version, len(sup.jobs)) == before, "a refused request changed the weights"
        return
    assert status == 202, answer
    event(f"app {which}: 202")
    accepted = TrainAccepted.model_validate_json(answer)
    replayed = response_headers.get("idempotent-replayed") == "true"
    assert len(sup.jobs) == before[1] + (0 if replayed else 1)
    if not replayed:
        assert accepted.job_id == f"job-{len(sup.jobs)}"
