"""APOLLO under tensor parallelism on two GPUs with NCCL: the CPU test's cases
(tests/runtime/optim/test_optim_tensor_parallel.py) on cuda:0 and cuda:1, and bf16 replicated copies that stay
bitwise equal. Needs two GPUs (`make test-gpu` on one GPU skips it, saying so)."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from tp_ranks import BATCHES, CASES, gathered, init_group, rank_setup, run_ranks, steps_equal_tp1, tp_step

pytestmark = pytest.mark.gpu
TP = 2


def _rank(rank, tp, init_file):
    torch.cuda.set_device(rank)
    init_group(rank, tp, init_file, "nccl")
    device = torch.device("cuda", rank)
    for case in CASES:
        steps_equal_tp1(rank, tp, case, 4, hooks=case != "llama-mini", device=device)
    # bf16, stochastic rounding, the default fused=None (eager under TP): replicated copies stay bitwise equal.
    config, hparams = CASES["qwen3-kv1"]
    layout, tensors, model, opt = rank_setup(config, tp, rank, dict(hparams, fused=None), torch.bfloat16,
                                             device=device)
    for step in range(4):
        started = time.perf_counter()
        assert tp_step(layout, rank, model, opt, BATCHES[step % 2]).applied
        torch.cuda.synchronize()
        print(f"rank {rank} bf16 step {step}: {1000 * (time.perf_counter() - started):.1f} ms", flush=True)
    gathered(layout, tensors)
    dist.destroy_process_group()


def test_tensor_parallel_steps_equal_tp1_on_two_gpus(tmp_path):
    if torch.cuda.device_count() < TP:
        pytest.skip(f"needs {TP} GPUs, this machine has {torch.cuda.device_count()}")
    run_ranks(_rank, TP, str(tmp_path / "init"))
