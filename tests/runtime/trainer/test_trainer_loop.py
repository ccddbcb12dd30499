"""The training step: per-layer recomputation with hook-mode updates gives the same weights, bit for bit;
pacing changes when the GPU works, not what it computes; the step's memory is measured."""

from __future__ import annotations

import copy

import pytest
import torch

from onlinemodel_runtime.optim import make_optimizer
from onlinemodel_runtime.trainer.loop import train_step
from onlinemodel_runtime.trainer.memory import MemoryMonitor
from onlinemodel_runtime.trainer.pacing import Pacer

from trainer_fixtures import POLICY, FakeSignal, FakeTime, example, tiny_llama


def run(model, steps: int = 3, pacer: Pacer | None = None, memory: MemoryMonitor | None = None):
    opt = make_optimizer(model, POLICY, lr=1e-2)
    opt.attach_to_backward()  # each layer is updated during backward, as soon as its gradients are complete
    results = []
    for step in range(steps):
        ids, labels = example(seed=step)
        results.append(train_step(model, opt, ids, labels, pacer=pacer, memory=memory))
    return results


@pytest.mark.parametrize("tied", [True, False])
def test_recomputation_gives_the_same_updates_bit_for_bit(tied):
    plain = tiny_llama(layers=4, tied=tied)
    recomputed = copy.deepcopy(plain)
    recomputed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    before = copy.deepcopy(plain)
    a, b = run(plain), run(recomputed)
    assert [r.loss for r in a] == [r.loss for r in b]
    assert all(r.applied and r.params_updated == b[0].params_updated > 0 for r in a + b)
    # A recomputed layer read no weight already updated in its own step: every weight equal, and changed.
    for (name, p), q, old in zip(plain.named_parameters(), recomputed.parameters(), before.parameters()):
        assert torch.equal(p, q), name
        assert not torch.equal(p, old), f"{name} was not trained"


def test_pacing_under_load_changes_nothing_but_the_timing():
    reference = tiny_llama(layers=2)
    paced = copy.deepcopy(reference)
    paced.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    t = FakeTime()
    head = paced.get_output_embeddings()
    # Under load the loss runs in chunks of 16 tokens and sleeps between slices.
    pacer = Pacer(FakeSignal(in_flight=1, duty=0.5), sync=t.sync, clock=t.clock, sleep=t.sleep,
                  slice_seconds=0.0, slice_flops=16 * 4 * head.in_features * head.out_features)
    pacer.install(paced)
    expected, got = run(reference, steps=2), run(paced, steps=2, pacer=pacer)
    assert t.syncs > 0 and pacer.phase == "idle"
    assert [r.loss for r in got] == pytest.approx([r.loss for r in expected], rel=1e-3)
    for (name, p), q in zip(reference.named_parameters(), paced.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-2, atol=1e-3, msg=name)  # bf16 sums in another order


def test_memory_is_reported_on_cpu():
    model = tiny_llama(layers=1)
    memory = MemoryMonitor(torch.device("cpu"))
    run(model, steps=1, memory=memory)
    status = memory.status()
    assert status.device == "cpu" and status.rss_bytes > 0 and status.peak_rss_bytes > 0
    assert status.peak_allocated_bytes is None  # a GPU-only figure
