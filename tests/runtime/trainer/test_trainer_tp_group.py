"""The trainer's tensor-parallel group: rank 0 runs training steps and early-stop checks, rank 1 follows them,
and together they give the TP=1 model's losses, answers and updated weights (two gloo processes)."""

from __future__ import annotations

import multiprocessing
import os

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from onlinemodel_protocol.rpc import IGNORE_INDEX, WorkerShard
from onlinemodel_runtime.optim import StepReport
from onlinemodel_runtime.trainer.early_stop import answer_predicted
from onlinemodel_runtime.trainer.loop import train_step
from onlinemodel_runtime.weights.tp_model import build_tp_rank_model
from onlinemodel_runtime.weights.tp_shards import tp_layout_for

TP = 2
CONFIG = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, vocab_size=150, dtype="float32", tie_word_embeddings=True,
                     architectures=["LlamaForCausalLM"])
IDS = [3, 77, 149, 0, 74, 75, 12]
LABELS = [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 0, 74, 75, 12]
STEPS, LR = 3, 0.05


class SGD:
    """The optimizer's contract as train_step uses it, with the plainest update: the group, not APOLLO,
    is under test (optim/tensor_parallel.py has its own tests)."""

    def __init__(self, model):
        self.params = [p for p in model.parameters() if p.dim() == 2]
        for p in self.params:
            p.requires_grad_(True)
        self.param_groups = [{"lr": LR}]

    def backward_step(self, loss):
        loss.backward()
        with torch.no_grad():
            for p in self.params:
                p -= self.param_groups[0]["lr"] * p.grad
                p.grad = None
        return StepReport(applied=True, skipped=False, reason=None, step=1, params_updated=len(self.params),
                          params_total=len(self.params))


def whole_model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIG, dtype=torch.float32)


def _rank(rank, tmp):
    from onlinemodel_runtime.trainer.tp_group import TensorParallelGroup

    layout = tp_layout_for(CONFIG, TP)
    hf = {n: p.detach() for n, p in whole_model().named_parameters()}
    group = TensorParallelGroup(WorkerShard(tp_rank=rank, tp_size=TP), f"file://{tmp}/init", torch.device("cpu"))
    tensors = layout.split_hf_state_dict(hf, rank)  # this rank's vLLM tensors, which the model views
    model = build_tp_rank_model(CONFIG, tensors, rank, TP, group.group, expected_dtype=torch.float32, train=True)
    group.bind(model, SGD(model), layout, tensors)
    if rank > 0:
        assert group.follow(os.getppid()) == 0
    else:
        losses = [group.train_step(IDS, LABELS, learning_rate=LR).loss for _ in range(STEPS)]
        torch.save({"losses": losses, "learned": group.answer_predicted(IDS, LABELS)}, f"{tmp}/rank0.pt")
        group.stop()
    torch.save(tensors, f"{tmp}/weights{rank}.pt")


def test_two_ranks_train_as_the_whole_model(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, str(tmp_path))) for r in range(TP)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * TP  # rank 1 left when rank 0 said stop

    model = whole_model()
    model.train()
    sgd = SGD(model)
    losses = [train_step(model, sgd, IDS, LABELS, learning_rate=LR).loss for _ in range(STEPS)]
    got = torch.load(tmp_path / "rank0.pt")
    assert losses[0] > losses[-1] + 0.1  # the steps did train
    torch.testing.assert_close(got["losses"], losses, rtol=1e-5, atol=1e-5)
    assert got["learned"] == answer_predicted(model, IDS, LABELS)
    # The ranks' updated shards, gathered, are the TP=1 model's weights.
    gathered = tp_layout_for(CONFIG, TP).gather_hf_state_dict([torch.load(tmp_path / f"weights{r}.pt")
                                                               for r in range(TP)])
    for name, p in model.named_parameters():
        torch.testing.assert_close(gathered[name], p.detach(), rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
