"""Assistant spans found in one render agree with the reference (rendering the prefix of every turn)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from onlinemodel_runtime.devtools.model_prep import ensure_smollm2
from onlinemodel_runtime.server.assistant_spans import (MAX_SLOW_TURNS, SpanError, TurnMarkers, _slow_span,
                                                        assistant_spans, label_mask, probe_markers)

LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
# Qwen3's shape: an empty think block in the last assistant turn, reasoning stripped from earlier ones.
QWEN3 = ("{% for m in messages %}<|im_start|>{{ m.role }}\n"
         "{% if m.role == 'assistant' %}{% if loop.last %}<think>\n\n</think>\n\n{{ m.content }}"
         "{% else %}{{ m.content.split('</think>')[-1].lstrip('\n') }}{% endif %}"
         "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
EOS_AT_END = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
              "{% if loop.last and m.role == 'assistant' %}</s>{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GEMMA = ("{% for m in messages %}<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n"
         "{{ m.content }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")

CONVERSATIONS = [
    [("user", "Hi"), ("assistant", "Hello!")],
    [("system", "Be brief."), ("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2")],
    [("user", "Say assistant"), ("assistant", "assistant"), ("user", "again"), ("assistant", "assistant")],
    [("user", "x"), ("assistant", "  padded  "), ("user", "y"), ("assistant", "<think>r</think>answer")],
    [("user", "same"), ("assistant", "same"), ("user", "same"), ("assistant", "same")],
]


# Phi-3's shape: the user turn opens the assistant's, so there is no assistant header of its own.
PHI3 = ("{% for m in messages %}{% if m.role == 'user' %}<|user|>\n{{ m.content }}<|end|>\n<|assistant|>\n"
        "{% else %}{{ m.content }}<|end|>\n{% endif %}{% endfor %}")
TEMPLATES = {"smollm2": None, "llama3": LLAMA3, "qwen3": QWEN3, "eos-at-end": EOS_AT_END, "gemma": GEMMA,
             "phi3": PHI3}


def renderer(template):
    tok = AutoTokenizer.from_pretrained(ensure_smollm2())
    if template is not None:
        tok.chat_template = template

    def render(messages, gen):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    def token_starts(text):
        return [lo for lo, _ in tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]

    render.markers = probe_markers(render, token_starts)
    return render


@pytest.fixture(scope="module", params=list(TEMPLATES.values()), ids=list(TEMPLATES))
def render(request):
    return renderer(request.param)


def test_markers_of_each_template():
    found = {name: renderer(t).markers for name, t in TEMPLATES.items()}
    assert found["smollm2"] == TurnMarkers("<|im_start|>assistant\n", "<|im_end|>\n", "<|im_end|>\n")
    assert found["llama3"] == TurnMarkers("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>",
                                          "<|eot_id|>")
    # The EOS only the last turn gets is not part of an earlier turn's end (nor is the next "<").
    assert found["eos-at-end"] == TurnMarkers("<|im_start|>assistant\n", "<|im_end|>\n", "<|im_end|>\n</s>")
    assert found["phi3"] == TurnMarkers("", "<|end|>\n", "<|end|>\n")


@pytest.mark.parametrize("turns", CONVERSATIONS)
def test_one_render_finds_what_rendering_every_prefix_finds(render, turns):
    plain = [{"role": r, "content": c} for r, c in turns]
    trained = [r == "assistant" for r, _ in turns]
    full = render(plain, False)
    fast = assistant_spans(render, plain, trained, full, render.markers)
    reference = [_slow_span(render, plain, k, full, render.markers) for k in range(len(plain)) if trained[k]]
    assert fast == reference and len(fast) == sum(trained)
    for (a, b), (_, content) in zip(fast, [t for t in turns if t[0] == "assistant"]):
        # Each span is its own turn: the answer's text, none of the next message's.
        assert content.strip().split("</think>")[-1] in full[a:b]
        assert not any(c in full[a:b] for r, c in turns if r != "assistant" and c not in content)


def test_too_many_rewritten_turns_are_refused():
    render = renderer(QWEN3)
    plain = []
    for i in range(MAX_SLOW_TURNS + 2):
        plain += [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"<think>r</think>a{i}"}]
    trained = [m["role"] == "assistant" for m in plain]
    with pytest.raises(SpanError, match=f"more than {MAX_SLOW_TURNS}"):
        assistant_spans(render, plain, trained, render(plain, False), render.markers)


def test_label_mask_is_one_pass_over_sorted_spans():
    offsets = [(0, 2), (2, 4), (4, 4), (4, 6), (6, 9), (9, 12)]
    assert label_mask(offsets, [(6, 12), (2, 5)]) == [False, True, False, True, True, True]
    assert label_mask(offsets, []) == [False] * 6
