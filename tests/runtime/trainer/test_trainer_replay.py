"""The replay reservoir: bounds, a uniform sample, and its state through a real checkpoint (JSON, no pickle)."""

from __future__ import annotations

import collections
import json

import pytest
import torch

from onlinemodel_protocol.rpc import EncodedExample
from onlinemodel_runtime.checkpoint import CheckpointStore
from onlinemodel_runtime.trainer.replay import ReplayReservoir


def ex(i: int, tokens: int = 4) -> EncodedExample:
    ids = [i] * tokens
    return EncodedExample(input_ids=ids, labels=[-100] + ids[1:])


@pytest.mark.parametrize("capacity,max_tokens,message", [
    (-1, 100, "capacity"), (True, 100, "capacity"), (2.0, 100, "capacity"),
    (4, 3, "max_tokens"), (4, None, "max_tokens"),
])
def test_bad_bounds_are_a_value_error(capacity, max_tokens, message):
    with pytest.raises(ValueError, match=message):
        ReplayReservoir(capacity, max_tokens)


def test_bounded_by_count_and_tokens():
    reservoir = ReplayReservoir(capacity=3, max_tokens=30)  # at most 10 tokens an example
    for i in range(10):
        reservoir.add(ex(i))
    reservoir.add(ex(99, tokens=11))  # longer than its share: never kept, not counted
    assert len(reservoir.examples) == 3 and reservoir.seen == 10
    assert reservoir.tokens == 12 <= reservoir.max_tokens
    assert reservoir.summary() == {"examples": 3, "tokens": 12, "seen": 10, "capacity": 3}
    assert all(e.input_ids[0] != 99 for e in reservoir.examples)


def test_capacity_zero_keeps_nothing():
    reservoir = ReplayReservoir(capacity=0, max_tokens=0)
    reservoir.add(ex(1))
    assert reservoir.examples == [] and reservoir.sample(4) == [] and reservoir.seen == 0


def test_sample_is_distinct_and_at_most_what_is_kept():
    reservoir = ReplayReservoir(capacity=8, max_tokens=800)
    for i in range(3):
        reservoir.add(ex(i))
    assert sorted(e.input_ids[0] for e in reservoir.sample(5)) == [0, 1, 2]
    for i in range(3, 20):
        reservoir.add(ex(i))
    picked = [e.input_ids[0] for e in reservoir.sample(4)]
    assert len(picked) == len(set(picked)) == 4


def test_every_example_is_kept_with_equal_probability():
    # 20 examples into 5 slots, 2000 seeds: each should be kept 2000 * 5/20 = 500 times (binomial sd ~19).
    kept = collections.Counter()
    for seed in range(2000):
        reservoir = ReplayReservoir(capacity=5, max_tokens=500, seed=seed)
        for i in range(20):
            reservoir.add(ex(i))
        kept.update(e.input_ids[0] for e in reservoir.examples)
    assert set(kept) == set(range(20))
    assert all(400 < n < 600 for n in kept.values()), kept


def test_state_round_trips_through_a_checkpoint(tmp_path):
    reservoir = ReplayReservoir(capacity=4, max_tokens=400, seed=7)
    for i in range(11):
        reservoir.add(ex(i, tokens=3 + i % 4))
    store = CheckpointStore(tmp_path / "ckpt")
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    info = store.save([("w", torch.zeros(2))], base_model_dir=base,
                      trainer_state={"step": 1, "replay": reservoir.state_dict()})
    optimizer_state, trainer_state = store.load_training_state(info)
    assert optimizer_state is None
    assert json.loads((info.path / "onlinemodel" / "trainer_state.json").read_text())["replay"]["seen"] == 11
    restored = ReplayReservoir(capacity=4, max_tokens=400)
    restored.load_state_dict(trainer_state["replay"])
    assert restored.examples == reservoir.examples and restored.seen == 11
    # The random state came back too: both draw the same from here on.
    assert restored.sample(2) == reservoir.sample(2)
    restored.add(ex(50)), reservoir.add(ex(50))
    assert restored.examples == reservoir.examples


def test_loading_into_smaller_bounds_drops_what_does_not_fit():
    reservoir = ReplayReservoir(capacity=4, max_tokens=400)
    for i, tokens in enumerate((3, 30, 4, 5)):
        reservoir.add(ex(i, tokens=tokens))
    smaller = ReplayReservoir(capacity=2, max_tokens=20)  # at most 10 tokens an example
    smaller.load_state_dict(reservoir.state_dict())
    assert [e.input_ids[0] for e in smaller.examples] == [0, 2] and smaller.seen == 4
