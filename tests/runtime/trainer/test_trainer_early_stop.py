"""Early stop: the learned check on a real (tiny) model, and the order and bound of a job's steps."""

from __future__ import annotations

import pytest
import torch

from onlinemodel_protocol.rpc import EncodedExample
from onlinemodel_runtime.trainer import loss
from onlinemodel_runtime.trainer.early_stop import answer_predicted, job_schedule
from tests.runtime.trainer.trainer_fixtures import example, tiny_llama


def greedy_labels(model, ids: list[int], prompt: int) -> list[int]:
    """Labels that are exactly the model's argmax next tokens after the first `prompt` tokens."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    predicted = logits.argmax(-1).tolist()  # predicted[i] is the guess for token i + 1
    return [-100] * prompt + predicted[prompt - 1:-1]


@pytest.mark.parametrize("chunk_bytes", [loss.LOSS_CHUNK_BYTES, 4 * 96 * 3])  # one chunk; chunks of 3 tokens
def test_answer_predicted_means_every_labelled_token_is_the_argmax(monkeypatch, chunk_bytes):
    monkeypatch.setattr(loss, "LOSS_CHUNK_BYTES", chunk_bytes)
    model = tiny_llama(dtype=torch.float32)
    ids, _ = example(tokens=20, prompt=8)
    labels = greedy_labels(model, ids, prompt=8)
    assert answer_predicted(model, ids, labels)
    for position in (8, 13, 19):  # first, middle and last labelled token wrong
        wrong = list(labels)
        wrong[position] = (wrong[position] + 1) % 96
        assert not answer_predicted(model, ids, wrong), position
    # Unlabelled positions do not count.
    assert answer_predicted(model, ids, [-100] * 12 + labels[12:])


def test_a_margin_asks_every_answer_token_to_lead_the_runner_up_by_that_much():
    model = tiny_llama(dtype=torch.float32)
    ids, _ = example(tokens=20, prompt=8)
    labels = greedy_labels(model, ids, prompt=8)
    with torch.no_grad():
        top = model(input_ids=torch.tensor([ids])).logits[0, 7:-1].float().topk(2, -1).values
    lead = float((top[:, 0] - top[:, 1]).min())  # the smallest lead among the answer tokens
    assert answer_predicted(model, ids, labels, margin=lead * 0.99)
    assert not answer_predicted(model, ids, labels, margin=lead * 1.01)
    assert not answer_predicted(model, ids, labels, margin=1e9)


def test_answer_predicted_computes_no_gradient():
    model = tiny_llama(dtype=torch.float32)
    ids, labels = example(tokens=12, prompt=4)
    answer_predicted(model, ids, labels)
    assert all(p.grad is None for p in model.parameters())


def ex(name: int) -> EncodedExample:
    return EncodedExample(input_ids=[name, name], labels=[-100, name])


def names(schedule) -> list[tuple[int, bool]]:
    return [(e.input_ids[0], replay) for e, replay in schedule]


def test_without_early_stop_every_pass_runs_every_example():
    assert names(job_schedule([ex(1), ex(2)], [ex(9)], 2, None)) == [
        (1, False), (2, False), (9, True), (1, False), (2, False), (9, True)]


def test_a_learned_example_gets_no_step_and_the_epochs_stay_the_bound():
    steps: dict[int, int] = {}
    needs = {1: 1, 2: 3, 9: 0}  # steps each example needs before it counts as learned

    def learned(e: EncodedExample) -> bool:
        return steps.get(e.input_ids[0], 0) >= needs[e.input_ids[0]]

    order = []
    for e, replay in job_schedule([ex(1), ex(2)], [ex(9)], 2, learned):
        steps[e.input_ids[0]] = steps.get(e.input_ids[0], 0) + 1
        order.append((e.input_ids[0], replay))
    # 9 was remembered (no step); 1 learned after one step; 2 still unlearned when the 2 passes are over.
    assert order == [(1, False), (2, False), (2, False)]


def test_an_example_undone_later_in_its_pass_is_trained_again_and_a_pass_without_steps_ends_the_job():
    is_learned = {1: False, 2: False}

    def learned(e: EncodedExample) -> bool:
        return is_learned[e.input_ids[0]]

    order = []
    for e, _ in job_schedule([ex(1), ex(2)], [], 5, learned):
        name = e.input_ids[0]
        order.append(name)
        is_learned[name] = True
        if name == 2:  # 2's step undoes 1, checked (and passed) earlier in the same pass
            is_learned[1] = False
    assert order == [1, 2, 1]  # the third pass finds both learned: no step, the job ends


def test_the_check_sees_the_steps_before_it():
    trained: list[int] = []

    def learned(e: EncodedExample) -> bool:  # 2 counts as learned once 1 has had a step
        return e.input_ids[0] == 2 and 1 in trained

    for e, _ in job_schedule([ex(1), ex(2)], [], 3, learned):
        trained.append(e.input_ids[0])
    assert trained == [1, 1, 1]


def test_nothing_left_ends_the_job_early():
    checks = []

    def learned(e: EncodedExample) -> bool:
        checks.append(e.input_ids[0])
        return True

    assert names(job_schedule([ex(1)], [ex(2)], 10, learned)) == [] and checks == [1, 2]
