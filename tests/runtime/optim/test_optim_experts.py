"""APOLLO on 3-D expert tensors: each expert a matrix of its own (projection, moments, scale, limiter),
against the float64 reference extended the same way; experts without tokens; the policy's classes."""

import copy
import io
import math

import pytest
import torch
from optim_models import all_finite, loss_fn, make_moe, tiny_qwen3_moe, token_ids

from onlinemodel_runtime.optim import Apollo, TrainPolicy, make_optimizer
from onlinemodel_runtime.optim.functional import CONSTS, apollo_direction, const_row, projection_matrix
from onlinemodel_runtime.optim.policy import classify
from onlinemodel_runtime.optim.reference import ReferenceApollo

HP = dict(lr=3e-3, weight_decay=0.0, update_proj_gap=3)
GROUP = dict(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, alpha=2.0, norm_growth_limit=1.01)


@pytest.mark.parametrize("rank,scale,limit", [(1, "tensor", 1.01), (2, "channel", 1.01), (1, "tensor", None),
                                              (3, "channel", None)])
def test_experts_match_reference(rank, scale, limit):
    net = make_moe()
    ref_net = copy.deepcopy(net)
    opt = Apollo(net.named_parameters(), rank=rank, scale=scale, norm_growth_limit=limit, **HP)
    ref = ReferenceApollo(list(ref_net.named_parameters()), rank=rank, scale=scale, norm_growth_limit=limit, **HP)
    idle_steps = 0
    for t in range(8):
        loss_fn(net, t).backward()
        idle_steps += int(net.experts.gate_up_proj.grad[:3].flatten(1).norm(dim=1).eq(0).any())
        opt.step()
        opt.zero_grad()
        loss_fn(ref_net, t).backward()
        ref.step()
        ref_net.zero_grad()
    assert idle_steps > 0  # some routed expert also sat out a step (besides expert 3, never routed)
    for (name, p), (_, q) in zip(net.named_parameters(), ref_net.named_parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), name
    start = make_moe()
    assert not torch.equal(net.experts.gate_up_proj[:3], start.experts.gate_up_proj[:3])
    # Expert 3 never received a token: untouched, no limiter reference, moments still zero.
    assert torch.equal(net.experts.gate_up_proj[3], start.experts.gate_up_proj[3])
    st = opt.state[net.experts.down_proj]
    assert st["limiter_norm"].shape == (4,) and st["limiter_norm"][3] == 0 and (st["limiter_norm"][:3] > 0).any()
    assert st["exp_avg"].shape == (4, 16, min(rank, 6))  # tall (16, 6): projected on the right
    assert opt.state[net.experts.gate_up_proj]["exp_avg"].shape == (4, min(rank, 12), 16)  # wide: left


def _batch_problem(seed: int = 0, experts: int = 3, shape=(6, 10)):
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(experts, *shape, generator=g)
    proj = projection_matrix((experts, *shape), 1, seed)
    m = torch.randn(experts, 1, shape[1], generator=g) * 0.1
    v = torch.rand(experts, 1, shape[1], generator=g) * 0.01
    return grad, proj, m, v


def test_a_batch_is_its_experts_one_by_one():
    grad, proj, m, v = _batch_problem()
    prev = torch.tensor([0.0, 2.0, 0.5])  # a first update, and two limited ones
    c = torch.tensor(const_row(GROUP, 4))
    batched = apollo_direction(grad, proj, m, v, prev, c, left=True, channel=False)
    for e in range(3):
        single = apollo_direction(grad[e], proj[e], m[e], v[e], prev[e], c, left=True, channel=False)
        for a, b in zip(batched[:3], single[:3]):
            torch.testing.assert_close(a[e], b, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(batched[3][e], single[3], rtol=1e-6, atol=1e-9)  # (1, 1) per expert
    assert batched[3].shape == (3, 1, 1) and bool(batched[4])


def test_an_expert_without_tokens_keeps_its_reference_and_its_first_update_is_capped_later():
    grad, proj, m, v = _batch_problem(seed=1)
    grad[1] = 0.0  # expert 1 received no token this step
    group = dict(GROUP, alpha=8.0)  # a cap below the unlimited update: the cap must act
    c = torch.tensor(const_row(group, 7))
    prev = torch.tensor([0.05, 0.7, 0.0])
    _, _, norms, coeff, ok = apollo_direction(grad, proj, m, v, prev, c, left=True, channel=False)
    free = apollo_direction(grad, proj, m, v, torch.full((3,), 1e30), c, left=True, channel=False)[3]
    assert bool(ok)
    assert torch.equal((coeff * grad)[1], torch.zeros_like(grad[1]))  # nothing applied
    assert norms[1] == 0.7  # ... and the limiter's reference is not reset to zero
    # Expert 2 has no reference yet (it never received a token before step 7): its update is capped
    # at AdamW's first-step norm, lr * sqrt(m n), not crushed by the growth limiter against zero.
    cap = group["lr"] * math.sqrt(60)
    assert float((free * grad)[2].norm()) > cap
    assert math.isclose(float((coeff * grad)[2].norm()), cap, rel_tol=1e-5)
    # Expert 0 has one: its update grows at most 1.01x (coeff holds lr and alpha).
    limited = group["lr"] * group["alpha"] * 1.01 * 0.05
    assert math.isclose(float((coeff * grad)[0].norm()), limited, rel_tol=1e-5)
    assert float((free * grad)[0].norm()) > limited


def test_hook_mode_equals_step_mode_and_state_round_trips():
    net1, net2 = make_moe(), make_moe()
    opt1 = Apollo(net1.named_parameters(), **HP)
    opt2 = Apollo(net2.named_parameters(), **HP)
    opt2.attach_to_backward()
    for t in range(4):
        loss_fn(net1, t).backward()
        opt1.step()
        opt1.zero_grad()
        assert opt2.backward_step(loss_fn(net2, t)).applied
    for p, q in zip(net1.parameters(), net2.parameters()):
        assert torch.equal(p, q)
    buf = io.BytesIO()
    torch.save(opt1.state_dict(), buf)
    buf.seek(0)
    net3 = copy.deepcopy(net1)
    opt3 = Apollo(net3.named_parameters(), **HP)
    opt3.load_state_dict(torch.load(buf, weights_only=True))
    for opt, net in ((opt1, net1), (opt3, net3)):
        for t in range(4, 7):
            loss_fn(net, t).backward()
            opt.step()
            opt.zero_grad()
    for p, q in zip(net1.parameters(), net3.parameters()):
        assert torch.equal(p, q)


def test_state_bytes_per_expert_parameter():
    net = make_moe()
    opt = Apollo([(n, p) for n, p in net.named_parameters() if n.startswith("experts.")], **HP)
    loss_fn(net, 0).backward()
    opt.step()
    # Rank 1: per expert 2 * max(m, n) moments + 1 limiter reference, float32.
    expected = 4 * 4 * (2 * 16 + 1) * 2
    assert opt.state_bytes() == expected
    assert opt.state_bytes() / sum(p.numel() for p in net.experts.parameters()) < 8 / 4


def test_fused_update_of_experts_equals_eager_in_hook_mode():
    """The compiled bucket update (what CUDA runs, captured in graphs there) over decoder layers that
    hold experts, against the eager update: torch.compile's C++ backend on CPU."""
    models = [tiny_qwen3_moe(), tiny_qwen3_moe()]
    policy = TrainPolicy(router="apollo", norms="adamw")
    opts = [make_optimizer(m, policy, lr=1e-3, update_proj_gap=2, fused=f) for m, f in zip(models, (True, False))]
    for model, opt in zip(models, opts):
        opt.attach_to_backward()
        for t in range(4):
            ids = token_ids(t)
            assert opt.backward_step(model(ids, labels=ids).loss).applied
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert all_finite(models[0].parameters())
    assert not torch.equal(models[0].model.layers[0].mlp.experts.down_proj, tiny_qwen3_moe().model.layers[0].mlp.experts.down_proj)


def test_policy_classes_of_moe_and_hybrid_models(tiny_dirs):
    from transformers import AutoConfig, AutoModelForCausalLM

    def classes(name):
        config = AutoConfig.from_pretrained(tiny_dirs[name])
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config.get_text_config())
        return classify(model)

    moe = classes("qwen3_5_moe")
    layer = "model.layers.0."
    assert moe[layer + "mlp.experts.gate_up_proj"] == moe[layer + "mlp.experts.down_proj"] == "experts"
    assert moe[layer + "mlp.gate.weight"] == moe[layer + "mlp.shared_expert_gate.weight"] == "router"
    assert moe[layer + "mlp.shared_expert.down_proj.weight"] == "blocks"
    for name in ("linear_attn.conv1d.weight", "linear_attn.A_log", "linear_attn.dt_bias", "linear_attn.norm.weight"):
        assert moe[layer + name] == "norms", name  # Gated DeltaNet's non-matrix parameters
    assert moe[layer + "linear_attn.in_proj_qkv.weight"] == "blocks"
    assert moe["lm_head.weight"] == moe["model.embed_tokens.weight"] == "embeddings"
    qwen3_moe = classes("qwen3_moe")
    assert qwen3_moe["model.layers.1.mlp.gate_proj.weight"] == "blocks"  # mlp_only_layers: a dense MLP
    assert qwen3_moe["model.layers.0.mlp.gate.weight"] == "router"
    dense = classes("qwen3")
    assert set(dense.values()) == {"blocks", "norms", "embeddings"}


@pytest.mark.parametrize("router", ["apollo", "adamw", "frozen"])
def test_router_switch(router):
    model = tiny_qwen3_moe()
    opt = make_optimizer(model, TrainPolicy(router=router), lr=1e-3)
    gate = model.model.layers[0].mlp.gate.weight
    assert gate.requires_grad == (router != "frozen")
    algorithms: dict[str, list[str]] = {}
    for g in opt.param_groups:
        algorithms.setdefault(g["algorithm"], []).extend(g["param_names"])
    if router != "frozen":
        assert "model.layers.0.mlp.gate.weight" in algorithms[router]
    assert "model.layers.0.mlp.experts.gate_up_proj" in algorithms["apollo"]
    with pytest.raises(ValueError, match="TrainPolicy.router must be one of"):
        TrainPolicy(router="sgd")
    with pytest.raises(ValueError, match="TrainPolicy.norms must be one of"):
        TrainPolicy(norms="apollo")


def test_experts_stay_apollo_mini_whatever_the_rank_of_the_other_matrices():
    """A rank-r state per expert would cost E times a matrix's: the experts get a group of their own at rank 1."""
    model = tiny_qwen3_moe()
    opt = make_optimizer(model, TrainPolicy(router="apollo"), lr=1e-3, rank=64)
    by_kind = {("experts" if ".experts." in g["param_names"][0] else "other", g["algorithm"]): g
               for g in opt.param_groups}
    experts, other = by_kind[("experts", "apollo")], by_kind[("other", "apollo")]
    assert all(".experts." in n for n in experts["param_names"])
    assert not any(".experts." in n for n in other["param_names"])
    assert "model.layers.0.mlp.gate.weight" in other["param_names"]
    assert (experts["rank"], experts["scale"], experts["alpha"]) == (1, "tensor", math.sqrt(128.0))
    assert (other["rank"], other["scale"], other["alpha"]) == (64, "channel", 1.0)
    ids = torch.randint(0, 64, (1, 12))
    opt.attach_to_backward()
    assert opt.backward_step(model(ids, labels=ids).loss).applied
    gate_up = model.model.layers[0].mlp.experts.gate_up_proj
    assert opt.state[gate_up]["exp_avg"].shape[-2:] in ((1, gate_up.shape[-1]), (gate_up.shape[-2], 1))
