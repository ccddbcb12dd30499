"""The trainer's serving-first and memory pieces on a GPU, with the optimizer's CUDA hot path (compiled
bucket updates replayed as CUDA graphs on a side stream, captured during backward): per-layer recomputation
gives the same training, the pacer's device synchronizes and sleeps break no capture, and recomputation
with the chunked loss cuts the step's peak memory. The logic itself is checked on CPU in CI
(tests/runtime/trainer). Run where a GPU is: `make test-gpu`."""

from __future__ import annotations

import copy
import time

import pytest
import torch

from onlinemodel_runtime.optim import make_optimizer
from onlinemodel_runtime.trainer.loop import train_step
from onlinemodel_runtime.trainer.memory import MemoryMonitor
from onlinemodel_runtime.trainer.pacing import Pacer

from trainer_fixtures import POLICY, FakeSignal, example, tiny_llama

pytestmark = pytest.mark.gpu


def train(model, steps: int, pacer: Pacer | None = None, memory: MemoryMonitor | None = None, tokens: int = 40):
    opt = make_optimizer(model, POLICY, lr=1e-3)
    opt.attach_to_backward()
    results = []
    for step in range(steps):
        ids, labels = example(tokens=tokens, seed=step)
        results.append(train_step(model, opt, ids, labels, pacer=pacer, memory=memory))
        assert results[-1].applied, results[-1]
    return opt, results


def max_rel(a, b) -> float:
    return max(((p - q).norm() / p.norm()).item() for p, q in zip(a.parameters(), b.parameters()))


def test_recomputation_with_graph_replayed_updates_trains_the_same():
    plain = tiny_llama(layers=3, dtype=torch.float32, attn_implementation="eager").cuda()
    recomputed = copy.deepcopy(plain)
    recomputed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    start = copy.deepcopy(plain)
    opt, a = train(plain, 6)
    opt_r, b = train(recomputed, 6)
    assert len(opt_r._compiled.captured()) == 3  # the layers' updates ran as captured graphs
    assert [r.loss for r in a] == pytest.approx([r.loss for r in b], rel=1e-5)
    assert max_rel(plain, recomputed) < 1e-4 < max_rel(plain, start)


def test_pacing_under_load_on_the_gpu():
    reference = tiny_llama(layers=3).cuda()
    paced = copy.deepcopy(reference)
    paced.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mlp = paced.model.layers[0].mlp
    signal = FakeSignal(in_flight=0, duty=0.5)
    pacer = Pacer(signal, sync=torch.cuda.synchronize,
                  slice_flops=16 * 4 * mlp.gate_proj.in_features * mlp.gate_proj.out_features)  # chunked MLPs
    pacer.install(paced)
    train(reference, 7)
    opt = make_optimizer(paced, POLICY, lr=1e-3)
    opt.attach_to_backward()
    for step in range(7):
        if step == 3:  # the first steps compile and capture the updates: pace the ones after
            signal.set_in_flight(1)
            t0 = time.perf_counter()
        ids, labels = example(seed=step)
        assert train_step(paced, opt, ids, labels, pacer=pacer).applied
    wall = time.perf_counter() - t0
    assert len(opt._compiled.captured()) == 3  # captures inside backward survived the yields' synchronizes
    assert 0.3 * wall < pacer.paced_seconds < 0.7 * wall  # duty 0.5: about half the time rests
    assert max_rel(reference, paced) < 2e-2  # bf16, chunked sums in another order


def test_recomputation_and_chunked_loss_cut_the_step_peak():
    from transformers import LlamaConfig, LlamaForCausalLM

    # Long enough that activations dominate: 16 layers x 4096 tokens.
    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=3072, num_hidden_layers=16,
                      num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False,
                      max_position_embeddings=4096)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).cuda().train()
    ids = torch.randint(0, 32000, (1, 4096), device="cuda")

    def peak(step) -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    def transformers_step():
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)

    before = peak(transformers_step)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    memory = MemoryMonitor(torch.device("cuda"))
    opt = make_optimizer(model, POLICY, lr=1e-4)
    opt.attach_to_backward()
    train_step(model, opt, ids[0].tolist(), ids[0].tolist(), memory=memory)  # first step: state, compile
    train_step(model, opt, ids[0].tolist(), ids[0].tolist(), memory=memory)
    status = memory.status()
    assert status.last_step_peak_bytes <= status.peak_allocated_bytes <= status.device_total_bytes
    # Hook mode also drops the full gradient buffer the plain step keeps: compare activations, not that.
    grads = sum(p.numel() * p.element_size() for p in model.parameters())
    after = status.last_step_peak_bytes - torch.cuda.memory_allocated()
    print(f"step peak beyond resting memory: transformers {before / 2**20:.0f} MiB (of which gradients "
          f"{grads / 2**20:.0f} MiB), recomputation + chunked loss + hook mode {after / 2**20:.0f} MiB")
    assert after < 0.5 * (before - grads)
