"""The anchor term: its KL against a direct computation, zero at the recorded weights, its turns, its bounded
record through JSON, and the conversations it ships, in a real chat template."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from onlinemodel_protocol.limits import ANCHOR_PER_STEP, ANCHOR_TOP_K
from onlinemodel_protocol.rpc import IGNORE_INDEX, EncodedExample
from onlinemodel_runtime.trainer.anchor import AnchorTerm, encode_anchors
from onlinemodel_runtime.trainer.anchor_texts import ANCHOR_CONVERSATIONS
from tests.runtime.trainer.trainer_fixtures import example, tiny_llama


def anchors(n: int = 3) -> list[EncodedExample]:
    return [EncodedExample(input_ids=ids, labels=labels)
            for ids, labels in (example(tokens=12 + i, prompt=5, seed=i) for i in range(n))]


def another() -> EncodedExample:
    ids, labels = example(tokens=15, prompt=4, seed=9)
    return EncodedExample(input_ids=ids, labels=labels)


def perturb(model: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def direct_kl(before: torch.nn.Module, after: torch.nn.Module, ex: EncodedExample, k: int) -> torch.Tensor:
    """KL between the two models' next-token distributions at the labelled positions, both coarsened to
    the first model's top-k tokens and one class for all the others, from full softmaxes."""
    ids = torch.tensor([ex.input_ids])
    mask = torch.tensor(ex.labels[1:]) != IGNORE_INDEX
    p = F.softmax(before(input_ids=ids).logits[0, :-1][mask].float(), -1)
    q = F.softmax(after(input_ids=ids).logits[0, :-1][mask].float(), -1)
    top = p.topk(k, -1).indices
    p_top, q_top = p.gather(1, top), q.gather(1, top)
    p_all = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1)
    q_all = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    return (p_all * (p_all.log() - q_all.log())).sum(-1).mean()


def one_forward_each(term: AnchorTerm, model: torch.nn.Module, turns: list[list[int]]) -> list[float]:
    """For each of `turns` (conversation indices), the token mean of the term's loss on each conversation alone,
    from an AnchorTerm of one a step with `term`'s record."""
    single = AnchorTerm(term.examples, weight=term.weight, per_step=1, top_k=term.top_k)
    single.load_state_dict({**term.state_dict(), "next": 0})
    each = [float(single.loss(model)) for _ in term.examples]  # conversations 0, 1, ... in turn
    tokens = [sum(t != IGNORE_INDEX for t in ex.labels[1:]) for ex in term.examples]
    return [sum(each[i] * tokens[i] for i in turn) / sum(tokens[i] for i in turn) for turn in turns]


@torch.no_grad()
def test_the_loss_is_the_weighted_mean_kl_on_k_plus_one_classes():
    model = tiny_llama(dtype=torch.float32)
    untouched = tiny_llama(dtype=torch.float32)
    term = AnchorTerm(anchors(1), weight=3.0, per_step=1, top_k=8)
    term.record(model, untouched=True)
    perturb(model)
    expected = 3.0 * direct_kl(untouched, model, term.examples[0], 8)
    assert float(expected) > 1e-3
    torch.testing.assert_close(term.loss(model), expected, rtol=1e-4, atol=1e-6)


def test_zero_at_the_recorded_weights_with_no_gradient_and_positive_once_they_move():
    model = tiny_llama(dtype=torch.float32)
    term = AnchorTerm(anchors(), weight=1.0, per_step=3, top_k=ANCHOR_TOP_K)
    term.record(model, untouched=True)
    loss = term.loss(model)
    loss.backward()
    assert abs(float(loss.detach())) < 1e-5
    assert max(float(p.grad.abs().max()) for p in model.parameters()) < 1e-4
    perturb(model)
    assert float(term.loss(model).detach()) > 1e-3


@torch.no_grad()
def test_each_step_takes_the_next_conversations_in_turn():
    model = tiny_llama(dtype=torch.float32)
    term = AnchorTerm(anchors(3), weight=1.0, per_step=2, top_k=4)
    term.record(model, untouched=True)
    perturb(model)
    first, second = one_forward_each(term, model, [[0, 1], [2, 0]])
    assert float(term.loss(model)) == pytest.approx(first, rel=1e-5)
    assert float(term.loss(model)) == pytest.approx(second, rel=1e-5)  # wraps around


@torch.no_grad()
def test_the_record_survives_json_and_is_bounded():
    model = tiny_llama(dtype=torch.float32)
    term = AnchorTerm(anchors(), weight=1.0, per_step=1, top_k=8)
    term.record(model, untouched=True)
    positions = sum(sum(t != IGNORE_INDEX for t in ex.labels[1:]) for ex in term.examples)
    assert term.record_bytes == positions * (8 * (4 + 4) + 4)
    term.loss(model)  # the next turn is part of the state
    state = json.loads(json.dumps(term.state_dict()))
    perturb(model)
    restored = AnchorTerm(anchors(), weight=1.0, per_step=1, top_k=8)
    assert not restored.recorded
    restored.load_state_dict(state)
    assert restored.recorded
    assert float(restored.loss(model)) == float(term.loss(model))


@torch.no_grad()
def test_records_are_kept_per_conversation_whatever_the_order_and_dropped_when_they_do_not_fit():
    model = tiny_llama(dtype=torch.float32)
    term = AnchorTerm(anchors(3), weight=1.0, per_step=1, top_k=8)
    term.record(model, untouched=True)
    state = json.loads(json.dumps(term.state_dict()))
    perturb(model)
    reordered = AnchorTerm(list(reversed(anchors(3))), 1.0, 1, 8)
    reordered.load_state_dict(state)
    assert reordered.recorded
    assert float(reordered.loss(model)) == pytest.approx(float(_turn(term, 2).loss(model)), rel=1e-6)
    fewer = AnchorTerm(anchors(2), 1.0, 1, 8)
    fewer.load_state_dict(state)
    assert fewer.recorded and set(fewer.state_dict()["records"]) == set(fewer.keys) < set(term.keys)
    smaller_k = AnchorTerm(anchors(3), 1.0, 1, 4)  # records of 8 tokens a position do not fit k = 4
    smaller_k.load_state_dict(state)
    assert not smaller_k.recorded and smaller_k.state_dict()["records"] == {}
    with pytest.raises(RuntimeError, match="record"):
        smaller_k.loss(model)


def _turn(term: AnchorTerm, i: int) -> AnchorTerm:
    term._next = i  # the loss of conversation i next (a test's shortcut to compare one conversation)
    return term


def test_an_edited_set_keeps_the_records_it_still_needs_and_records_the_new_ones_from_the_current_weights(
        caplog):
    model = tiny_llama(dtype=torch.float32)
    untouched = tiny_llama(dtype=torch.float32)
    old = anchors(3)
    term = AnchorTerm(old, weight=1.0, per_step=1, top_k=8, from_file=2)
    term.record(model, untouched=True)
    state = json.loads(json.dumps(term.state_dict()))
    perturb(model)  # trained since
    new = another()
    edited = AnchorTerm([old[0], old[2], new], weight=1.0, per_step=1, top_k=8, from_file=2)
    edited.load_state_dict(state)
    assert not edited.recorded
    with caplog.at_level("WARNING", logger="onlinemodel_runtime.trainer.anchor"):
        edited.record(model, untouched=False)
    assert "1 of 3 anchor conversations" in caplog.text and "trained weights" in caplog.text
    assert edited.summary() == {"weight": 1.0, "conversations": 3, "from_file": 2, "recorded": True,
                                "recorded_untouched": 2, "recorded_trained": 1, "record_bytes": edited.record_bytes}
    assert set(edited.state_dict()["records"]) == {term.keys[0], term.keys[2], edited.keys[2]}  # old[1]'s dropped
    with torch.no_grad():
        # Kept: anchored to the untouched model. New: to the weights it was recorded from (zero there).
        torch.testing.assert_close(_turn(edited, 1).loss(model), direct_kl(untouched, model, old[2], 8),
                                   rtol=1e-4, atol=1e-6)
        assert abs(float(_turn(edited, 2).loss(model))) < 1e-5
    again = AnchorTerm([old[0], old[2], new], weight=1.0, per_step=1, top_k=8, from_file=2)
    again.load_state_dict(json.loads(json.dumps(edited.state_dict())))  # a restart with the same set: all of it
    assert again.recorded and again.summary() == edited.summary()


def test_a_state_from_before_keyed_records_restores_the_built_in_conversations():
    model = tiny_llama(dtype=torch.float32)
    builtin = anchors(3)
    term = AnchorTerm(builtin, weight=1.0, per_step=1, top_k=8)
    term.record(model, untouched=True)
    rows = term.state_dict()["records"]
    legacy = {"next": 1, "record": [{k: rows[key][k] for k in ("ids", "logp", "rest")} for key in term.keys]}
    same = AnchorTerm(builtin, weight=1.0, per_step=1, top_k=8)
    same.load_state_dict(legacy)
    assert same.recorded and same.state_dict() == {**term.state_dict(), "next": 1}
    file = another()
    added = AnchorTerm([*builtin, file], weight=1.0, per_step=1, top_k=8, from_file=1)
    added.load_state_dict(legacy)
    assert added.summary()["recorded_untouched"] == 3 and not added.recorded
    only_file = AnchorTerm([file, *builtin[:2]], weight=1.0, per_step=1, top_k=8, from_file=3)
    only_file.load_state_dict(legacy)  # builtin: false, the legacy list is no record of these
    assert only_file.state_dict()["records"] == {}


@pytest.mark.parametrize("kwargs", [dict(weight=-1.0), dict(weight=math.inf), dict(weight=True), dict(per_step=0),
                                    dict(top_k=0), dict(top_k=2.0), dict(from_file=4), dict(from_file=-1)])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        AnchorTerm(anchors(), **{"weight": 1.0, "per_step": 1, "top_k": 8, **kwargs})
    with pytest.raises(ValueError, match="conversation"):
        AnchorTerm([], weight=1.0, per_step=1, top_k=8)
    assert not AnchorTerm([], weight=0.0, per_step=1, top_k=8).enabled


def test_the_shipped_conversations_label_only_their_replies():
    from transformers import AutoTokenizer

    from onlinemodel_runtime.devtools.model_prep import ensure_smollm2

    tokenizer = AutoTokenizer.from_pretrained(ensure_smollm2())
    encoded = encode_anchors(tokenizer)
    assert len(encoded) == len(ANCHOR_CONVERSATIONS) >= 2 * ANCHOR_PER_STEP
    for ex, (_, reply) in zip(encoded, ANCHOR_CONVERSATIONS):
        labelled = tokenizer.decode([t for t in ex.labels if t != IGNORE_INDEX])
        assert labelled.startswith(reply), (labelled, reply)
    # The record of all of them at the defaults: a few hundred KB, whatever the vocabulary.
    positions = sum(sum(t != IGNORE_INDEX for t in ex.labels[1:]) for ex in encoded)
    assert positions * (8 * ANCHOR_TOP_K + 4) < 512 * 1024


def test_an_anchor_files_conversations_are_added_or_alone_and_only_their_last_reply_is_labelled(monkeypatch):
    from transformers import AutoTokenizer

    from onlinemodel_protocol.anchors import parse_anchor_file
    from onlinemodel_runtime.devtools.model_prep import ensure_smollm2
    from onlinemodel_runtime.trainer import anchor
    from tests.protocol.test_protocol_anchors import SUPPORT

    tokenizer = AutoTokenizer.from_pretrained(ensure_smollm2())
    added = encode_anchors(tokenizer, parse_anchor_file(SUPPORT))
    alone = encode_anchors(tokenizer, parse_anchor_file(SUPPORT + "builtin: false\n"))
    assert len(added) == len(ANCHOR_CONVERSATIONS) + 2 and added[-2:] == alone and len(alone) == 2
    labelled = tokenizer.decode([t for t in alone[0].labels if t != IGNORE_INDEX])
    assert labelled.startswith("Open Settings, then Security, then Reset password.") and "Which" not in labelled
    monkeypatch.setattr(anchor, "ANCHOR_CONVERSATION_MAX_TOKENS", 40)
    with pytest.raises(ValueError, match=r"--anchor-file conversations\.0: example is \d+ tokens long"):
        encode_anchors(tokenizer, parse_anchor_file(SUPPORT + "builtin: false\n"))


def test_a_step_differentiates_the_example_loss_plus_the_term_and_reports_them_apart():
    from onlinemodel_runtime.optim import make_optimizer
    from onlinemodel_runtime.trainer.loop import train_step
    from onlinemodel_runtime.trainer.loss import causal_lm_loss
    from tests.runtime.trainer.trainer_fixtures import POLICY

    ids, labels = example(seed=7)
    after = {}
    for weight in (0.0, 10.0):
        model = tiny_llama(dtype=torch.float32)
        term = AnchorTerm(anchors(), weight=weight, per_step=2, top_k=8)
        twin = AnchorTerm(anchors(), weight=weight, per_step=2, top_k=8)  # the same term, to read its value
        if weight:
            term.record(model, untouched=True)
            twin.load_state_dict(term.state_dict())
        perturb(model)
        with torch.no_grad():
            own = float(causal_lm_loss(model, torch.tensor([ids]), torch.tensor([labels])))
            expected = float(twin.loss(model)) if weight else None
        opt = make_optimizer(model, POLICY, lr=1e-2)
        opt.attach_to_backward()
        result = train_step(model, opt, ids, labels, anchor=term)
        assert result.applied and result.loss == pytest.approx(own, rel=1e-6)
        assert result.anchor_loss == (pytest.approx(expected, rel=1e-5) if weight else None)
        after[weight] = [p.detach().clone() for p in model.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(after[0.0], after[10.0]))  # the term moved the update


def test_a_steps_conversations_share_forwards_as_long_as_the_padding_stays_bounded():
    from onlinemodel_runtime.trainer.anchor import _padded_batches

    sized = [EncodedExample(input_ids=[1] * n, labels=[IGNORE_INDEX] * n) for n in (10, 30, 20, 50, 5)]
    runs = _padded_batches(sized, 90)  # 10+30 -> 2 x 30; +20 -> 3 x 30; +50 would be 4 x 50
    assert [(r.start, r.stop) for r in runs] == [(0, 3), (3, 4), (4, 5)]  # 50 + 5 would be 2 x 50 > 90
    assert [(r.start, r.stop) for r in _padded_batches(sized[:1] * 3, 5)] == [(0, 1), (1, 2), (2, 3)]
    assert _padded_batches([], 90) == []


@torch.no_grad()
def test_split_and_shared_forwards_give_the_loss_of_one_forward_per_conversation(monkeypatch):
    import onlinemodel_runtime.trainer.anchor as anchor

    model = tiny_llama(dtype=torch.float32)
    term = AnchorTerm(anchors(4), weight=2.0, per_step=4, top_k=4)
    term.record(model, untouched=True)
    perturb(model)
    [expected] = one_forward_each(term, model, [[0, 1, 2, 3]])
    shared = float(term.loss(model))  # one forward of the four, padded to the longest
    monkeypatch.setattr(anchor, "ANCHOR_CONVERSATION_MAX_TOKENS", 30)  # two forwards of two
    split = float(term.loss(model))
    assert shared == pytest.approx(expected, rel=1e-5) and split == pytest.approx(expected, rel=1e-5)
    assert len(anchor._padded_batches(term.examples, 30)) == 2


@torch.no_grad()
@pytest.mark.parametrize("arch", ["qwen3_5_text", "qwen3_moe"])
def test_one_padded_forward_is_exact_for_the_seeds_family(arch, tmp_path):
    """Right padding leaves a causal model's earlier positions alone: Gated DeltaNet's recurrence and causal
    convolution (Qwen3.5) and per-token expert routing (MoE) included."""
    from transformers import AutoModelForCausalLM

    from onlinemodel_runtime.devtools.model_prep import make_tiny_model_dir

    model = AutoModelForCausalLM.from_pretrained(make_tiny_model_dir(arch, tmp_path / arch, dtype="float32"),
                                                 dtype=torch.float32).eval()
    examples = [EncodedExample(input_ids=ids, labels=labels)
                for ids, labels in (example(tokens=9 + 3 * i, prompt=4, seed=i) for i in range(3))]
    term = AnchorTerm(examples, weight=1.0, per_step=3, top_k=4)
    term.record(model, untouched=True)
    perturb(model, scale=0.1)
    each = one_forward_each(term, model, [[0], [1], [2]])
    [expected] = one_forward_each(term, model, [[0, 1, 2]])
    assert float(term.loss(model)) == pytest.approx(expected, rel=1e-4)
    assert min(each) > 1e-6  # the weights moved: the comparison is not of zeros
