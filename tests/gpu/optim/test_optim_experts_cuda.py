"""Decoder layers holding 3-D experts through the CUDA hot path (compiled bucket update, captured CUDA
graphs replayed from a plan, side stream) against the eager path on the same GPU; the CPU run of the
compiled update is tests/runtime/optim/test_optim_experts.py."""

import pytest
import torch

from optim_models import all_finite, tiny_qwen3_moe, token_ids

from onlinemodel_runtime.optim import TrainPolicy, make_optimizer

pytestmark = pytest.mark.gpu


def test_expert_buckets_replay_as_graphs_and_equal_the_eager_path():
    models = [tiny_qwen3_moe().cuda(), tiny_qwen3_moe().cuda()]
    policy = TrainPolicy(router="apollo", norms="adamw")
    fast = make_optimizer(models[0], policy, lr=1e-3, update_proj_gap=3)
    eager = make_optimizer(models[1], policy, lr=1e-3, update_proj_gap=3, fused=False)
    for model, opt in zip(models, (fast, eager)):
        opt.attach_to_backward()
        for t in range(7):
            ids = token_ids(t).cuda()
            assert opt.backward_step(model(ids, labels=ids).loss).applied
    graphs = fast._compiled.captured()
    assert set(graphs) == {"model.layers.0", "model.layers.1"}
    assert all(g.plan is not None and g.plan.step == 7 for g in graphs.values())
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
    experts = models[0].model.layers[0].mlp.experts.gate_up_proj
    assert fast.state[experts]["limiter_norm"].shape == (4,)
    assert all_finite(models[0].parameters())
