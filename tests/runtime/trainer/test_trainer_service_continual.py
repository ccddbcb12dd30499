"""The trainer's defaults for many jobs over time, on a tiny real model: early stop, replay and the anchor
term, and the replay reservoir and the anchor record through a checkpoint and a restore."""

from __future__ import annotations

import pytest
import torch

from onlinemodel_protocol import limits
from onlinemodel_protocol.rpc import EncodedExample, TrainJob
from onlinemodel_runtime.trainer.anchor import AnchorTerm
from onlinemodel_runtime.trainer.early_stop import answer_predicted
from tests.runtime.trainer.test_trainer_service import EXAMPLE, build, run_all, tiny_dir  # noqa: F401

OTHER = EncodedExample(input_ids=[1, 7, 11, 23, 29, 31, 2], labels=[-100, -100, -100, 23, 29, 31, 2])


def submit(service, *examples: EncodedExample, epochs: int, learning_rate: float = 1e-3) -> None:
    service.submit(TrainJob(examples=list(examples), epochs=epochs, learning_rate=learning_rate))


def test_defaults_are_on():
    from onlinemodel_protocol.config import RuntimeConfig

    cfg = RuntimeConfig(model="m", base_model="m", state_dir="/tmp/s")
    assert (cfg.early_stop, cfg.early_stop_margin, cfg.replay_examples, cfg.replay_reservoir, cfg.anchor_weight) == (
        limits.EARLY_STOP_DEFAULT, limits.EARLY_STOP_MARGIN_DEFAULT, limits.REPLAY_EXAMPLES_DEFAULT,
        limits.REPLAY_RESERVOIR_DEFAULT, limits.ANCHOR_WEIGHT_DEFAULT)
    assert limits.EARLY_STOP_DEFAULT and limits.REPLAY_EXAMPLES_DEFAULT > 0 and limits.ANCHOR_WEIGHT_DEFAULT > 0


def test_early_stop_ends_a_job_once_its_answer_is_learned(tiny_dir, tmp_path):
    service = build(tiny_dir, tmp_path, early_stop=True)
    assert not answer_predicted(service.model, EXAMPLE.input_ids, EXAMPLE.labels)
    submit(service, EXAMPLE, epochs=20, learning_rate=2e-2)
    run_all(service)
    (done,) = service.status().jobs
    assert done.state == "succeeded" and 1 <= done.steps < 20, done
    assert answer_predicted(service.model, EXAMPLE.input_ids, EXAMPLE.labels, service.cfg.early_stop_margin)
    # Taught again: already learned, so no step at all.
    submit(service, EXAMPLE, epochs=20, learning_rate=2e-2)
    run_all(service)
    assert service.status().jobs[-1].steps == 0


def test_each_job_replays_earlier_examples(tiny_dir, tmp_path):
    service = build(tiny_dir, tmp_path, replay_examples=1, replay_reservoir=4)
    submit(service, EXAMPLE, epochs=2)
    submit(service, OTHER, epochs=2)
    run_all(service)
    first, second = service.status().jobs
    assert (first.steps, first.replay_steps) == (2, 0)  # nothing earlier to replay
    assert (second.steps, second.replay_steps) == (4, 2)  # EXAMPLE again in each of its 2 passes
    assert service.status().replay.model_dump() == {"examples": 2, "tokens": 14, "seen": 2, "capacity": 4}


def test_a_cancelled_or_failed_job_adds_nothing_to_the_reservoir(tiny_dir, tmp_path):
    service = build(tiny_dir, tmp_path, replay_examples=1)
    submit(service, EncodedExample(input_ids=[10**9], labels=[1]), epochs=1)  # id out of vocab: fails
    run_all(service)
    assert service.status().jobs[0].state == "failed" and service.replay.examples == []


def test_the_reservoir_survives_a_checkpoint_and_restore(tiny_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    service = build(tiny_dir, tmp_path, checkpoint_dir=ckpt, replay_examples=1)
    submit(service, EXAMPLE, epochs=1)
    submit(service, OTHER, epochs=1)
    run_all(service)
    info = service.checkpoint()

    fresh = build(info.path, tmp_path, checkpoint_dir=ckpt, replay_examples=1)
    fresh.restore()
    assert fresh.replay.examples == service.replay.examples == [EXAMPLE, OTHER]
    assert fresh.status().replay == service.status().replay
    submit(fresh, EXAMPLE, epochs=1)
    run_all(fresh)
    assert fresh.status().jobs[-1].replay_steps == 1


def test_the_anchor_term_records_the_weights_before_the_first_step_and_keeps_them_through_a_checkpoint(
        tiny_dir, tmp_path):
    from transformers import AutoTokenizer

    from onlinemodel_runtime.trainer.anchor import encode_anchors

    anchors = encode_anchors(AutoTokenizer.from_pretrained(tiny_dir))
    ckpt = tmp_path / "ckpt"
    service = build(tiny_dir, tmp_path, anchors, checkpoint_dir=ckpt, anchor_weight=1.0)
    assert service.status().anchor.model_dump() == {
        "weight": 1.0, "conversations": len(anchors), "from_file": 0, "recorded": False, "recorded_untouched": 0,
        "recorded_trained": 0, "record_bytes": 0}
    untouched = AnchorTerm(anchors, 1.0, limits.ANCHOR_PER_STEP, limits.ANCHOR_TOP_K)
    untouched.record(service.model, untouched=True)
    submit(service, EXAMPLE, epochs=3, learning_rate=2e-2)
    run_all(service)
    assert service.status().jobs[0].state == "succeeded"
    assert service.anchor.state_dict()["records"] == untouched.state_dict()["records"]
    assert service.status().anchor.recorded and service.status().anchor.record_bytes == untouched.record_bytes > 0
    with torch.no_grad():
        assert float(service.anchor.loss(service.model)) > 0  # the weights moved away from the record
    info = service.checkpoint()

    fresh = build(info.path, tmp_path, anchors, checkpoint_dir=ckpt, anchor_weight=1.0)
    fresh.restore()  # trained weights: the record is the checkpoint's, not theirs
    assert fresh.anchor.state_dict() == service.anchor.state_dict()



def test_a_restart_with_an_edited_anchor_file_keeps_the_untouched_records_and_records_the_new_from_its_weights(
        tiny_dir, tmp_path, caplog):
    from transformers import AutoTokenizer

    from onlinemodel_protocol.anchors import parse_anchor_file
    from onlinemodel_runtime.trainer.anchor import encode_anchors

    def conversation(q: str, a: str) -> str:
        return f'  - messages: [{{role: user, content: "{q}"}}, {{role: assistant, content: "{a}"}}]\n'

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    first = parse_anchor_file("conversations:\n" + conversation("Who are you?", "The Acme assistant.")
                              + conversation("Where is Acme?", "In Springfield."))
    edited = parse_anchor_file("conversations:\n" + conversation("Who are you?", "The Acme assistant.")
                               + conversation("What does Acme make?", "Anvils."))
    anchors = encode_anchors(tokenizer, first)
    ckpt = tmp_path / "ckpt"
    service = build(tiny_dir, tmp_path, anchors, checkpoint_dir=ckpt, anchor_weight=1.0, anchor_file=first)
    submit(service, EXAMPLE, epochs=2, learning_rate=2e-2)
    run_all(service)
    status = service.status().anchor
    assert (status.conversations, status.from_file, status.recorded_untouched, status.recorded_trained) == (
        len(anchors), 2, len(anchors), 0)
    info = service.checkpoint()

    def restart(anchor_file):
        fresh = build(info.path, tmp_path, encode_anchors(tokenizer, anchor_file), checkpoint_dir=ckpt,
                      anchor_weight=1.0, anchor_file=anchor_file)
        fresh.restore()
        return fresh

    assert restart(first).status().anchor == status  # the same set: every record back
    fresh = restart(edited)
    assert not fresh.status().anchor.recorded
    with caplog.at_level("WARNING", logger="onlinemodel_runtime.trainer.anchor"):
        submit(fresh, EXAMPLE, epochs=1, learning_rate=2e-2)
        run_all(fresh)
    assert "1 of" in caplog.text and "trained weights" in caplog.text
    after = fresh.status().anchor
    assert (after.recorded, after.from_file, after.recorded_untouched, after.recorded_trained) == (
        True, 2, len(anchors) - 1, 1)
    kept = set(service.anchor.state_dict()["records"]) & set(fresh.anchor.state_dict()["records"])
    assert len(kept) == len(anchors) - 1  # the dropped conversation's record is gone
    assert all(fresh.anchor.state_dict()["records"][k] == service.anchor.state_dict()["records"][k] for k in kept)


def test_an_anchor_weight_without_conversations_is_refused(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="conversation"):
        build(tiny_dir, tmp_path, anchor_weight=1.0)
