"""The trainer's operations: every one has a spec; messages refuse what the trainer cannot run."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from onlinemodel_protocol.limits import LEARNING_RATE_MAX
from onlinemodel_protocol.rpc import IGNORE_INDEX, OPS, Counters, EncodedExample, TrainerOp, TrainJob

EXAMPLE = EncodedExample(input_ids=[5, 6, 7], labels=[IGNORE_INDEX, 6, 7])


def test_every_operation_has_a_spec():
    assert set(OPS) == set(TrainerOp)


def test_encoded_example():
    assert (EXAMPLE.num_tokens, EXAMPLE.num_target_tokens) == (3, 2)
    with pytest.raises(ValidationError, match="2 labels for 3 tokens"):
        EncodedExample(input_ids=[1, 2, 3], labels=[1, 2])
    with pytest.raises(ValidationError):
        EncodedExample(input_ids=[], labels=[])


@pytest.mark.parametrize("change", [dict(examples=[]), dict(epochs=0), dict(learning_rate=0.0),
                                    dict(learning_rate=LEARNING_RATE_MAX * 2), dict(learning_rate=float("inf"))])
def test_train_job_bounds(change):
    good = dict(examples=[EXAMPLE], epochs=1, learning_rate=LEARNING_RATE_MAX)
    assert TrainJob(**good).learning_rate == LEARNING_RATE_MAX
    with pytest.raises(ValidationError):
        TrainJob(**{**good, **change})


def test_counters_read_from_a_status():
    status = {"state": "idle", "steps": 4, "tokens_trained": 40, "weight_version": 5, "skipped_steps": 1, "jobs": []}
    assert Counters.model_validate(status) == Counters(steps=4, tokens_trained=40, weight_version=5, skipped_steps=1)


def test_every_tensor_parallel_rank_must_answer_the_export_once():
    from onlinemodel_protocol.rpc import WorkerShard, exported_tp_size

    def answer(rank, size):
        return {"shard": {"tp_rank": rank, "tp_size": size}, "transport": "shm", "tensors": 182}

    assert exported_tp_size([answer(0, 1)]) == 1
    assert exported_tp_size([answer(2, 3), answer(0, 3), answer(1, 3)]) == 3
    for answers in ([], [answer(0, 3), answer(1, 3)], [answer(0, 2), answer(0, 2)], [answer(0, 2), answer(1, 3)]):
        with pytest.raises(ValueError):
            exported_tp_size(answers)
    with pytest.raises(ValueError, match="outside size"):
        WorkerShard(tp_rank=3, tp_size=3)
    assert WorkerShard().state_dir(Path("/s")) == Path("/s")
    assert WorkerShard(tp_rank=2, tp_size=3).state_dir(Path("/s")) == Path("/s/rank2")
