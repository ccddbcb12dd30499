"""APOLLO under tensor parallelism: gloo ranks, each training its pieces of a tiny Llama/Qwen3 through
`weights.tp_model` in hook mode, end up with the weights TP=1's Apollo gives after the same steps."""

from __future__ import annotations

import io
import multiprocessing

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from onlinemodel_runtime.checkpoint.tp_gather import hf_state_dict_of
from onlinemodel_runtime.optim import TrainPolicy, make_optimizer
from onlinemodel_runtime.optim.tensor_parallel import TensorParallel
from onlinemodel_runtime.weights.tp_model import build_tp_rank_model, vocab_parallel_cross_entropy
from onlinemodel_runtime.weights.tp_shards import tp_layout_for

STEPS = 4
# Every class of parameter trains: decoder matrices and the embedding by APOLLO, norms and biases by AdamW.
POLICY = TrainPolicy(embeddings="apollo", norms="adamw")
BATCHES = [torch.tensor([[3, 77, 149, 0, 74, 75, 12, 5]]), torch.tensor([[9, 140, 2, 77, 1, 130, 4, 64]])]


def llama(**kw):
    return LlamaConfig(**{**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16, vocab_size=150, dtype="float32", initializer_range=0.15,
                                 tie_word_embeddings=True, architectures=["LlamaForCausalLM"]), **kw})


def qwen3(**kw):
    return Qwen3Config(**{**llama().to_dict(), "architectures": ["Qwen3ForCausalLM"], **kw})


# name -> (config, Apollo hyperparameters). Projection sides: "kept" = the projection keeps the sharded
# dimension (o/down, gate/up projected on the right), "contracted" = it sums over it (q/k/v on the left).
CASES = {
    # q/k/v contracted (left), o/down kept (left), gate/up kept (right), the padded vocabulary kept (right),
    # norm weights replicated; tensor-wise scale (APOLLO-Mini)
    "llama-mini": (llama(), dict(rank=1)),
    # head_dim 8 and intermediate 32 < hidden: o/down contracted on the right, gate/up contracted on the left;
    # sharded q/k/v biases, o/down biases on rank 0 only, an untied lm_head; channel-wise scale, rank 2
    "llama-channel-bias": (llama(head_dim=8, intermediate_size=32, attention_bias=True, mlp_bias=True,
                                 tie_word_embeddings=False), dict(rank=2)),
    # one KV head held by both ranks (its gradients partial), q/k norms inside the attention (partial too)
    "qwen3-kv1": (qwen3(num_key_value_heads=1), dict(rank=2)),
}
HPARAMS = dict(lr=1e-2, weight_decay=0.1, update_proj_gap=2, fused=False)


def whole_model(config, dtype=torch.float32):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    return model


def tp1_weights(config, hparams):
    model = whole_model(config)
    opt = make_optimizer(model, POLICY, **HPARAMS, **hparams)
    opt.attach_to_backward()
    for step in range(STEPS):
        ids = BATCHES[step % 2]
        report = opt.backward_step(model(input_ids=ids, labels=ids).loss)
        assert report.applied, report
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def rank_setup(config, tp, rank, hparams, dtype=torch.float32, group=None):
    """This rank's vLLM tensors (from the same whole model), its model and its TP optimizer."""
    layout = tp_layout_for(config, tp)
    hf = {n: p.detach().to(dtype) for n, p in whole_model(config).named_parameters()}
    tensors = layout.split_hf_state_dict(hf, rank)
    model = build_tp_rank_model(config, tensors, rank, tp, group, requires_grad=True, expected_dtype=dtype)
    opt = make_optimizer(model, POLICY, **HPARAMS, **hparams, tp=TensorParallel.from_layout(layout, group))
    opt.attach_to_backward()
    return layout, tensors, model, opt


def tp_step(layout, rank, model, opt, ids, group=None):
    logits = model(input_ids=ids).logits[0]
    # HF's causal-LM loss: predict token t + 1 from position t.
    loss = vocab_parallel_cross_entropy(logits[:-1], ids[0, 1:], layout.vocab_rows(rank), group).mean()
    return opt.backward_step(loss)


def gathered(layout, tensors):
    import torch.distributed as dist

    everyone = [None] * layout.tp_size
    dist.all_gather_object(everyone, {n: t.clone() for n, t in tensors.items()})
    return hf_state_dict_of(layout, everyone)


def _rank(rank, tp, init_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=tp)
    for case, (config, hparams) in CASES.items():
        want = tp1_weights(config, hparams)
        layout, tensors, model, opt = rank_setup(config, tp, rank, hparams)
        for step in range(STEPS):
            report = tp_step(layout, rank, model, opt, BATCHES[step % 2])
            assert report.applied and report.params_updated == report.params_total, (case, report)
        got = gathered(layout, tensors)  # raises LayoutError if replicated copies differ at all
        start = {n: p.detach() for n, p in whole_model(config).named_parameters()}
        for name, w in want.items():
            if name.endswith("k_proj.bias"):
                # Its true gradient is 0 (softmax ignores a constant per query): AdamW normalizes rounding noise.
                continue
            # The steps moved every weight; TP moved it the same, up to float32 summation order.
            moved = (w - start[name]).abs().max()
            assert moved > 1e-4, (case, name)
            torch.testing.assert_close(got[name], w, rtol=0, atol=5e-4 * float(moved) + 1e-7,
                                       msg=lambda m, n=name: f"{case} rank {rank} {n}: {m}")

    # weights_only=True round trip of one rank's state, then one more step of both: bitwise equal.
    config, hparams = CASES["qwen3-kv1"]
    layout, tensors, model, opt = rank_setup(config, tp, rank, hparams)
    for step in range(2):
        tp_step(layout, rank, model, opt, BATCHES[step])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    layout2, tensors2, model2, opt2 = rank_setup(config, tp, rank, hparams)
    with torch.no_grad():
        for name, t in tensors.items():
            tensors2[name].copy_(t)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    tp_step(layout, rank, model, opt, BATCHES[0])
    tp_step(layout2, rank, model2, opt2, BATCHES[0])
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
    tp = 2
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, tp, str(tmp_path / "init"))) for r in range(tp)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * tp
