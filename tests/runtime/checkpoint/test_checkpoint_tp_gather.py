"""Checkpoints under tensor parallelism, in one group of three gloo processes: TP=3 saves the TP=1 directory,
which a TP=1 trainer loads exactly; that TP=1 trainer's checkpoint restarts at TP=2 (a subgroup of two), whose
checkpoint restarts at TP=3, each continuing as TP=1 would from the same checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from onlinemodel_runtime.checkpoint import CheckpointError, CheckpointStore, hf_weight_tensors
from onlinemodel_runtime.checkpoint.tp_gather import optimizer_state_for_rank, save_tp_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "optim"))
from tp_ranks import (BATCHES, assert_moved_alike, gathered, init_group, llama, rank_setup, run_ranks,  # noqa: E402
                      tp1_optimizer, tp1_step, tp_step, whole_model)

# 6 heads, 1 KV head (held by every rank), intermediate 96 and a vocabulary padded to 192 split in 2 and 3;
# biases (row-parallel ones on rank 0 only).
CONFIG = llama(hidden_size=48, num_attention_heads=6, num_key_value_heads=1, head_dim=8, intermediate_size=96,
               attention_bias=True, mlp_bias=True)
HPARAMS = dict(rank=1)


def _load(path):
    """A checkpoint as a TP=1 trainer loads it: the model from the directory, its optimizer state."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    opt = tp1_optimizer(model, HPARAMS)
    state, trainer_state = CheckpointStore.load_training_state(path)
    return model, opt, state, trainer_state["step"]


def _start():
    return {n: p.detach() for n, p in whole_model(CONFIG).named_parameters()}


def _tp1(store, base):
    """TP=3 -> TP=1: the same HF directory, bitwise the gathered weights; its optimizer state continues as
    the TP=1 optimizer's own does (3 steps at TP=1 from the start). Then a TP=1 checkpoint."""
    model, opt, state, step = _load(store.latest().path)
    expected = torch.load(store.root / "expected.pt", weights_only=True)
    assert {n for n, _ in hf_weight_tensors(model)} == set(expected)
    for name, t in hf_weight_tensors(model):
        assert torch.equal(t, expected[name]), name
    assert state["rng"] == {} and len(state["tp_rng"]) == 3
    opt.load_state_dict(state)
    assert tp1_step(model, opt, BATCHES[step % 2]).applied
    reference = whole_model(CONFIG)
    ref_opt = tp1_optimizer(reference, HPARAMS)
    for s in range(step + 1):
        tp1_step(reference, ref_opt, BATCHES[s % 2])
    assert_moved_alike(dict(model.named_parameters()), dict(reference.named_parameters()), _start(), "TP=3 -> 1")
    store.save(hf_weight_tensors(model), base_model_dir=base, trainer_state={"step": step + 1},
               optimizer_state=opt.state_dict())


def _restart(store, base, tp, rank, group):
    """Restart from the latest checkpoint at this TP, take a step and save; TP=1 from the same checkpoint
    takes the same step."""
    model1, opt1, state, step = _load(store.latest().path)
    hf = {n: p.detach().clone() for n, p in model1.named_parameters()}
    layout, tensors, model, opt = rank_setup(CONFIG, tp, rank, HPARAMS, hf=hf, group=group)
    opt.load_state_dict(optimizer_state_for_rank(state, opt))
    opt1.load_state_dict(state)
    assert tp_step(layout, rank, model, opt, BATCHES[step % 2], group=group).applied
    assert tp1_step(model1, opt1, BATCHES[step % 2]).applied
    assert_moved_alike(gathered(layout, tensors, group), dict(model1.named_parameters()), _start(),
                       f"TP={tp} rank {rank}")
    save_tp_checkpoint(store, layout, tensors, opt, group=group, base_model_dir=base, trainer_state={"step": step + 1})
    return layout, tensors


def _rank(rank, tp, init_file, root, base):
    init_group(rank, tp, init_file)
    store, base = CheckpointStore(Path(root)), Path(base)
    pair = dist.new_group([0, 1])
    layout, tensors, model, opt = rank_setup(CONFIG, 3, rank, HPARAMS)
    for step in range(2):
        tp_step(layout, rank, model, opt, BATCHES[step])
    expected = gathered(layout, tensors)
    info = save_tp_checkpoint(store, layout, tensors, opt, base_model_dir=base, trainer_state={"step": 2})
    assert (info is None) == (rank > 0)
    if rank == 0:
        torch.save(expected, store.root / "expected.pt")
        _tp1(store, base)
    dist.barrier()
    if rank < 2:
        _restart(store, base, 2, rank, pair)  # TP=1 -> TP=2
    dist.barrier()
    layout, tensors = _restart(store, base, 3, rank, None)  # TP=2 -> TP=3
    # Ranks that disagree on a replicated tensor are not saved; the ranks' collectives still pair up.
    if rank == 2:
        tensors["model.norm.weight"][0] += 1
    if rank == 0:
        with pytest.raises(CheckpointError, match=r"rank 2: its copy of model.norm.weight .* differs from a lower "
                                                  r"rank's; step-00000005 is still the latest checkpoint"):
            save_tp_checkpoint(store, layout, tensors, base_model_dir=base, trainer_state={"step": 6})
    else:
        assert save_tp_checkpoint(store, layout, tensors, base_model_dir=base, trainer_state={"step": 6}) is None
    dist.destroy_process_group()


def test_tp3_to_tp1_to_tp2_to_tp3(tmp_path):
    CONFIG.save_pretrained(tmp_path / "base")
    run_ranks(_rank, 3, str(tmp_path / "init"), str(tmp_path / "checkpoints"), str(tmp_path / "base"))
