"""Where the assistant turns are in a rendered chat: the character spans the loss is computed on.

A span runs from the end of the turn's header (the template's generation prompt, e.g.
``<|im_start|>assistant\\n``) to the end of its end-of-turn marker (``<|im_end|>\\n``). The markers are
learned once per request from three tiny probe conversations, then the full conversation is rendered ONCE
and every assistant turn is found by a forward scan: linear in the text, whatever the number of turns.

A turn the scan cannot place exactly (the template rewrites its content, e.g. Qwen3 strips reasoning from
earlier turns) is placed the exact slow way: by rendering the conversation up to it, which costs two
renders of that prefix. At most ``MAX_SLOW_TURNS`` turns of an example may need that, so an example
never costs more than that many renders of itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

MAX_SLOW_TURNS = 16
_PROBE_USER = "onlinemodel-probe-question-7f3a"
_PROBE_USER_2 = "onlinemodel-probe-follow-up-52d0"
_PROBE_ASSISTANT = "onlinemodel-probe-answer-c91e"

Render = Callable[[list[dict[str, str]], bool], str]


@dataclass(frozen=True)
class TurnMarkers:
    header: str  # before an assistant message's content ("" if the template writes none of its own)
    end: str  # after it, when another message follows
    final_end: str  # after it, when it is the last message (templates may add e.g. an EOS there)


class SpanError(ValueError):
    def __init__(self, message: str, turn: int | None = None):
        super().__init__(message)
        self.turn = turn


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def probe_markers(render: Render, token_starts: Callable[[str], Sequence[int]]) -> TurnMarkers | None:
    """The template's assistant header and end-of-turn texts, or None if the probes cannot tell them.

    `token_starts(text)`: the character offsets where the tokens of `text` start. When the last turn ends
    with more than the others (an EOS), the end of a turn followed by another message is what its final
    end and its continuation share, cut back to a token boundary: ``<|im_end|>\\n</s>`` and
    ``<|im_end|>\\n<|im_start|>user`` share ``<|im_end|>\\n<``, and that ``<`` starts the next token.
    """
    user = [{"role": "user", "content": _PROBE_USER}]
    answer = {"role": "assistant", "content": _PROBE_ASSISTANT}
    plain, prompt = render(user, False), render(user, True)
    last = render([*user, answer], False)
    then = render([*user, answer, {"role": "user", "content": _PROBE_USER_2}], False)
    if not prompt.startswith(plain) or _PROBE_ASSISTANT not in last or _PROBE_ASSISTANT not in then:
        return None
    final_end = last[last.index(_PROBE_ASSISTANT) + len(_PROBE_ASSISTANT):]
    after = then[then.index(_PROBE_ASSISTANT) + len(_PROBE_ASSISTANT):]
    if after.startswith(final_end):  # most templates: every turn ends the same way
        end = final_end
    else:
        shared = _common_prefix_len(final_end, after)
        end = after[:max((b for b in token_starts(after) if b <= shared), default=0)]
    return TurnMarkers(prompt[len(plain):], end, final_end) if end and final_end else None


def _fast_span(full: str, cursor: int, content: str, header: str, end: str) -> tuple[int, int] | None:
    """The span of the assistant turn after `cursor`, if its header, content and end appear verbatim."""
    head = full.find(header, cursor)
    if head < 0:
        return None
    start = head + len(header)
    for text in dict.fromkeys((content, content.strip())):
        at = full.find(text, start)
        if at < 0:
            continue
        # Between header and content there may be template text (Qwen3's empty think block), but never
        # the end of a turn or another header: the content found must belong to this turn.
        between = full[start:at]
        if end in between or header in between:
            return None
        stop = at + len(text)
        if full.startswith(end, stop):
            return start, stop + len(end)
    return None


def _slow_span(render: Render, plain: list[dict[str, str]], k: int, full: str,
               markers: TurnMarkers | None) -> tuple[int, int]:
    """The text assistant turn k adds beyond render(messages[:k], add_generation_prompt=True)."""
    before = render(plain[:k], True) if k else ""
    upto = render(plain[:k + 1], False)
    start = _common_prefix_len(before, full)
    if full.startswith(upto):
        return start, len(upto)
    # The template renders this turn differently when it is not the last one: end at the first
    # end-of-turn text after its start.
    if markers is not None:
        end_text = markers.end
    else:
        tail = upto[start:]
        at = tail.rfind(plain[k]["content"])
        end_text = tail[at + len(plain[k]["content"]):] if at >= 0 else ""
    found = full.find(end_text, start) if end_text else -1
    if found < 0:
        raise SpanError(f"cannot locate assistant message {k} in the chat template's output", k)
    return start, found + len(end_text)


def assistant_spans(render: Render, plain: list[dict[str, str]], trained: Sequence[bool], full: str,
                    markers: TurnMarkers | None) -> list[tuple[int, int]]:
    """Spans (start, end) in `full` = render(plain) of the messages with `trained[k]`, in order.

    Without `markers` (or with a template that writes no assistant header of its own) every trained
    turn is placed the slow way.
    """
    spans: list[tuple[int, int]] = []
    cursor, slow = 0, 0
    for k, message in enumerate(plain):
        content = message["content"]
        if not trained[k]:
            # Past this message's text, so a later search cannot land inside it.
            at = full.find(content, cursor)
            cursor = at + len(content) if at >= 0 else cursor
            continue
        span = None
        if markers is not None and markers.header:
            end = markers.final_end if k == len(plain) - 1 else markers.end
            span = _fast_span(full, cursor, content, markers.header, end)
        if span is None:
            slow += 1
            if slow > MAX_SLOW_TURNS:
                raise SpanError(f"this chat template needs a render per assistant message, and the example has "
                                f"more than {MAX_SLOW_TURNS} of them; split it into several examples", k)
            span = _slow_span(render, plain, k, full, markers)
        if span[1] > span[0]:
            spans.append(span)
        cursor = max(cursor, span[1])
    return spans


def label_mask(offsets: Sequence[Any], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """For each token's (lo, hi) character offsets: does it start inside a span? (one pass over both)"""
    ordered = sorted(spans)
    out, s = [], 0
    for lo, hi in offsets:
        while s < len(ordered) and ordered[s][1] <= lo:
            s += 1
        out.append(hi > lo and s < len(ordered) and ordered[s][0] <= lo)
    return out
