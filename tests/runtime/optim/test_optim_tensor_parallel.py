"""APOLLO under tensor parallelism: gloo ranks, each training its pieces of a tiny Llama/Qwen3 through
`weights.tp_model`, end up with the weights TP=1's Apollo gives after the same steps."""

from __future__ import annotations

import io

import pytest
import torch
import torch.distributed as dist

from onlinemodel_runtime.optim.tensor_parallel import TensorParallel
from onlinemodel_runtime.weights.tp_shards import tp_layout_for

from tp_ranks import BATCHES, CASES, gathered, init_group, rank_setup, run_ranks, steps_equal_tp1, tp_step


def _refusals(rank, tp):
    config, hparams = CASES["llama-mini"]
    with pytest.raises(ValueError, match="the group has 2 ranks, the layout 1"):
        TensorParallel.from_layout(tp_layout_for(config, 1))
    with pytest.raises(ValueError, match="fused=True: the compiled update does not run under tensor parallelism"):
        rank_setup(config, tp, rank, dict(hparams, fused=True))
    with pytest.raises(ValueError, match=f"tensor parallel rank {1 - rank} trains other buckets, shared tensors or "
                                         f"hyperparameters than rank {rank}"):
        rank_setup(config, tp, rank, dict(hparams, lr=1e-2 * (rank + 1)))


def _rank(rank, tp, init_file):
    init_group(rank, tp, init_file)
    _refusals(rank, tp)
    for case in CASES:
        steps_equal_tp1(rank, tp, case, 4, hooks=case != "llama-mini")  # step() instead of hook mode once

    # weights_only=True round trip of one rank's state, then one more step of both: bitwise equal.
    config, hparams = CASES["qwen3-kv1"]
    layout, tensors, model, opt = rank_setup(config, tp, rank, hparams)
    for step in range(2):
        tp_step(layout, rank, model, opt, BATCHES[step])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    _, tensors2, model2, opt2 = rank_setup(config, tp, rank, hparams, hf=gathered(layout, tensors))
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    tp_step(layout, rank, model, opt, BATCHES[0])
    tp_step(layout, rank, model2, opt2, BATCHES[0])
    for name, t in tensors.items():
        assert torch.equal(tensors2[name], t), name

    # bf16 with stochastic rounding: replicated weights (norms, the shared KV head, q/k norms) stay bitwise
    # equal across ranks (the gather checks every copy), and a non-finite gradient on one rank stops all.
    layout, tensors, model, opt = rank_setup(config, tp, rank, hparams, torch.bfloat16)
    for step in range(3):
        tp_step(layout, rank, model, opt, BATCHES[step % 2])
    gathered(layout, tensors)
    before = {n: t.clone() for n, t in tensors.items()}
    if rank == 1:  # a NaN gradient on one rank, in the second bucket of the backward pass
        model.model.layers[0].mlp.down_proj.weight.register_hook(lambda g: g * float("nan"))
    report = tp_step(layout, rank, model, opt, BATCHES[0])
    assert report.skipped and 0 < report.params_updated < report.params_total, report
    updated = {n.split(".")[2] for n, t in tensors.items() if not torch.equal(t, before[n]) and ".layers." in n}
    # Hook mode: the bucket updated before the NaN (layer 1) is kept; layer 0's is gated off, on every rank.
    assert updated == {"1"}, updated
    dist.destroy_process_group()


def test_tensor_parallel_steps_equal_tp1(tmp_path):
    run_ranks(_rank, 2, str(tmp_path / "init"))
