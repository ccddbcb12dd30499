"""Tiny tensor-parallel training runs shared by the optimizer and checkpoint tests (CPU with gloo here, CUDA
with NCCL in tests/gpu/optim): each rank trains its pieces of a tiny model through `weights.tp_model` with a
TP Apollo; imported by path-relative name."""

from __future__ import annotations

import multiprocessing

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from onlinemodel_runtime.checkpoint.tp_gather import hf_state_dict_of
from onlinemodel_runtime.optim import TrainPolicy, make_optimizer
from onlinemodel_runtime.optim.tensor_parallel import TensorParallel
from onlinemodel_runtime.weights.tp_model import build_tp_rank_model, vocab_parallel_cross_entropy
from onlinemodel_runtime.weights.tp_shards import tp_layout_for

# Every class of parameter trains: decoder matrices and the embedding by APOLLO, norms and biases by AdamW.
POLICY = TrainPolicy(embeddings="apollo", norms="adamw")
HPARAMS = dict(lr=1e-2, weight_decay=0.1, update_proj_gap=2, fused=False)
BATCHES = [torch.tensor([[3, 77, 149, 0, 74, 75, 12, 5]]), torch.tensor([[9, 140, 2, 77, 1, 130, 4, 64]])]


def llama(**kw):
    """initializer_range 0.15: attention far from uniform, so q/k gradients stand well above float32 noise."""
    return LlamaConfig(**{**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16, vocab_size=150, dtype="float32",
                                 initializer_range=0.15, tie_word_embeddings=True,
                                 architectures=["LlamaForCausalLM"]), **kw})


# name -> (config, Apollo hyperparameters), at TP=2. Projection sides: "kept" = the projection keeps the
# sharded dimension (o/down, gate/up projected on the right), "contracted" = it sums over it (q/k/v on the left).
CASES = {
    # q/k/v contracted (left), o/down kept (left), gate/up kept (right), the padded vocabulary kept (right),
    # norm weights replicated; tensor-wise scale (APOLLO-Mini)
    "llama-mini": (llama(), dict(rank=1)),
    # head_dim 8 and intermediate 32 < hidden: o/down contracted on the right, gate/up contracted on the left;
    # sharded q/k/v biases, o/down biases on rank 0 only, an untied lm_head; channel-wise scale, rank 2
    "llama-channel-bias": (llama(head_dim=8, intermediate_size=32, attention_bias=True, mlp_bias=True,
                                 tie_word_embeddings=False), dict(rank=2)),
    # one KV head held by both ranks (its gradients partial), q/k norms inside the attention (partial too)
    "qwen3-kv1": (Qwen3Config(**{**llama().to_dict(), "architectures": ["Qwen3ForCausalLM"],
                                 "num_key_value_heads": 1}), dict(rank=2)),
}


def whole_model(config, dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    return model.to(device)


def tp1_optimizer(model, hparams):
    opt = make_optimizer(model, POLICY, **{**HPARAMS, **hparams})
    opt.attach_to_backward()
    return opt


def tp1_step(model, opt, ids):
    ids = ids.to(model.device)
    return opt.backward_step(model(input_ids=ids, labels=ids).loss)


def rank_setup(config, tp, rank, hparams, dtype=torch.float32, hf=None, group=None, device="cpu"):
    """This rank's vLLM tensors (split from `hf`, default: whole_model's), its model and TP Apollo."""
    layout = tp_layout_for(config, tp)
    if hf is None:
        hf = {n: p.detach() for n, p in whole_model(config).named_parameters()}
    tensors = layout.split_hf_state_dict({n: t.to(device, dtype) for n, t in hf.items()}, rank)
    model = build_tp_rank_model(config, tensors, rank, tp, group, requires_grad=True, expected_dtype=dtype)
    opt = make_optimizer(model, POLICY, **{**HPARAMS, **hparams}, tp=TensorParallel.from_layout(layout, group))
    opt.attach_to_backward()
    return layout, tensors, model, opt


def tp_step(layout, rank, model, opt, ids, hooks=True, group=None):
    """One step in hook mode, or (hooks=False) through backward() and step()."""
    ids = ids.to(model.device)
    logits = model(input_ids=ids).logits[0]
    # HF's causal-LM loss: predict token t + 1 from position t.
    loss = vocab_parallel_cross_entropy(logits[:-1], ids[0, 1:], layout.vocab_rows(rank), group).mean()
    if hooks:
        return opt.backward_step(loss)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt.last_report


def gathered(layout, tensors, group=None):
    """The whole HF state dict on every rank, on the CPU (raises LayoutError if replicated copies differ at all)."""
    everyone = [None] * layout.tp_size
    dist.all_gather_object(everyone, {n: t.cpu() for n, t in tensors.items()}, group=group)
    return hf_state_dict_of(layout, everyone)


def assert_moved_alike(got, want, start, what):
    """TP moved every weight as TP=1 did, up to float32 summation order (relative to how far it moved)."""
    for name, w in want.items():
        if name.endswith("k_proj.bias"):
            continue  # its true gradient is 0 (softmax ignores a constant per query): AdamW normalizes noise
        w = w.detach().cpu()
        moved = (w - start[name].cpu()).abs().max()
        assert moved > 1e-4, (what, name)
        torch.testing.assert_close(got[name].cpu(), w, rtol=0, atol=5e-4 * float(moved) + 1e-7,
                                   msg=lambda m, n=name: f"{what} {n}: {m}")


def steps_equal_tp1(rank, tp, case, steps, hooks=True, device="cpu"):
    """`steps` steps of TP=1's Apollo and of this rank's TP Apollo on CASES[case]: the same weights."""
    config, hparams = CASES[case]
    model = whole_model(config, device=device)
    opt = tp1_optimizer(model, hparams)
    layout, tensors, tp_model, tp_opt = rank_setup(config, tp, rank, hparams, device=device)
    for step in range(steps):
        assert tp1_step(model, opt, BATCHES[step % 2]).applied
        report = tp_step(layout, rank, tp_model, tp_opt, BATCHES[step % 2], hooks=hooks)
        assert report.applied and report.params_updated == report.params_total, (case, report)
    start = {n: p.detach() for n, p in whole_model(config).named_parameters()}
    assert_moved_alike(gathered(layout, tensors), dict(model.named_parameters()), start, f"{case} rank {rank}")


def run_ranks(target, tp, *args, timeout=300):
    """Run target(rank, tp, *args) in `tp` spawned processes."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, tp, *args)) for r in range(tp)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    assert [p.exitcode for p in procs] == [0] * tp


def init_group(rank, tp, init_file, backend="gloo"):
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=tp)
