"""The trainer's tensor-parallel group: rank 0 runs training steps, an early-stop check, a checkpoint and the
reload of its optimizer state, rank 1 follows them, and together they give what one TP=1 trainer gives (two
gloo processes, a tiny Llama, the trainer's APOLLO)."""

from __future__ import annotations

import multiprocessing
import os

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from onlinemodel_protocol.rpc import IGNORE_INDEX, WorkerShard
from onlinemodel_runtime.checkpoint import CheckpointStore
from onlinemodel_runtime.optim import TrainPolicy, make_optimizer
from onlinemodel_runtime.trainer.early_stop import answer_predicted
from onlinemodel_runtime.trainer.loop import train_step
from onlinemodel_runtime.weights.tp_model import build_tp_rank_model
from onlinemodel_runtime.weights.tp_shards import tp_layout_for

TP = 2
CONFIG = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, vocab_size=150, dtype="float32", tie_word_embeddings=True,
                     initializer_range=0.15, architectures=["LlamaForCausalLM"])
IDS = [3, 77, 149, 0, 74, 75, 12]
LABELS = [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 0, 74, 75, 12]
LR = 1e-2
STEPS_BEFORE, STEPS_AFTER = 2, 2  # around the checkpoint and the reload of its optimizer state


def whole_model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIG, dtype=torch.float32)


def optimizer_of(model, tp=None, rounding="stochastic"):
    optimizer = make_optimizer(model, TrainPolicy(), lr=LR, rank=1, fused=False, rounding=rounding,
                               **({"tp": tp} if tp else {}))
    optimizer.attach_to_backward()
    return optimizer


def comm_threads():
    """This process's threads of torch.distributed's gloo backend (Linux names them)."""
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    return [n for n in names if "gloo" in n]


def _rank(rank, tmp, restarted):
    """First run: steps, then a checkpoint. `restarted`: new processes on the checkpoint's weights with a fresh
    optimizer load its state (as trainers restarting at TP=2 from it), then train on."""
    from onlinemodel_runtime.optim.tensor_parallel import TensorParallel
    from onlinemodel_runtime.trainer.tp_group import TensorParallelGroup

    layout = tp_layout_for(CONFIG, TP)
    checkpoint = open(f"{tmp}/checkpoint").read() if restarted else None
    start = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32) if restarted else whole_model()
    hf = {n: p.detach() for n, p in start.named_parameters()}
    group = TensorParallelGroup(WorkerShard(tp_rank=rank, tp_size=TP), f"file://{tmp}/init{int(restarted)}",
                                torch.device("cpu"))
    tensors = layout.split_hf_state_dict(hf, rank)  # this rank's vLLM tensors, which the model views
    model = build_tp_rank_model(CONFIG, tensors, rank, TP, group.group, expected_dtype=torch.float32, train=True)
    # Restarted with another --weight-rounding (float32 weights: the way of rounding changes no value here).
    optimizer = optimizer_of(model, TensorParallel.from_layout(layout, group.group),
                             rounding="nearest" if restarted else "stochastic")
    group.bind(model, optimizer, layout, tensors)
    assert comm_threads()  # what the stop must end, so that none runs during the interpreter's teardown
    if rank > 0:
        assert group.follow(os.getppid()) == 0
        # the configured rounding, not the checkpoint's, on every rank
        assert {g["rounding"] for g in optimizer.param_groups} == {"nearest" if restarted else "stochastic"}
        assert not comm_threads()
        torch.save(tensors, f"{tmp}/weights{rank}.pt")
        return
    if not restarted:
        losses = [group.train_step(IDS, LABELS, learning_rate=LR).loss for _ in range(STEPS_BEFORE)]
        info = group.save_checkpoint(CheckpointStore(f"{tmp}/checkpoints"), base_model_dir=f"{tmp}/base",
                                     trainer_state={"step": STEPS_BEFORE})
        open(f"{tmp}/checkpoint", "w").write(str(info.path))
    else:
        group.load_optimizer_state(checkpoint)
        assert {g["rounding"] for g in optimizer.param_groups} == {"nearest"}
        losses = [group.train_step(IDS, LABELS, learning_rate=LR).loss for _ in range(STEPS_AFTER)]
        torch.save(group.answer_predicted(IDS, LABELS), f"{tmp}/learned.pt")
    torch.save(losses, f"{tmp}/losses{int(restarted)}.pt")
    group.stop()
    assert not comm_threads()
    torch.save(tensors, f"{tmp}/weights0.pt")


def _run_ranks(tmp_path, restarted):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, str(tmp_path), restarted)) for r in range(TP)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * TP  # rank 1 left when rank 0 said stop


def test_two_ranks_train_as_one_trainer_across_a_restart(tmp_path):
    CONFIG.save_pretrained(tmp_path / "base")  # what a checkpoint copies besides the weights
    _run_ranks(tmp_path, restarted=False)
    _run_ranks(tmp_path, restarted=True)

    model = whole_model()
    model.train()
    optimizer = optimizer_of(model)
    losses, saved = [], None
    for step in range(STEPS_BEFORE + STEPS_AFTER):
        losses.append(train_step(model, optimizer, IDS, LABELS, learning_rate=LR).loss)
        if step + 1 == STEPS_BEFORE:
            saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert losses[0] > losses[-1] + 0.1  # the steps did train
    # A fresh optimizer (moments zero) would take other steps after the restart: the state was restored.
    got = torch.load(tmp_path / "losses0.pt") + torch.load(tmp_path / "losses1.pt")
    torch.testing.assert_close(got, losses, rtol=1e-4, atol=1e-5)
    assert torch.load(tmp_path / "learned.pt") == answer_predicted(model, IDS, LABELS)
    # The checkpoint is the TP=1 model after its first steps, as one HF directory.
    written = AutoModelForCausalLM.from_pretrained(open(tmp_path / "checkpoint").read(), dtype=torch.float32)
    for name, p in written.named_parameters():
        torch.testing.assert_close(p.detach(), saved[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    # And the restarted ranks' shards, gathered, are the TP=1 model's weights after every step.
    gathered = tp_layout_for(CONFIG, TP).gather_hf_state_dict([torch.load(tmp_path / f"weights{r}.pt")
                                                               for r in range(TP)])
    for name, p in model.named_parameters():
        torch.testing.assert_close(gathered[name], p.detach(), rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
