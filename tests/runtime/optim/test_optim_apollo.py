import copy
import io
import math

import pytest
import torch
from optim_models import all_finite, loss_fn, make_net

from onlinemodel_runtime.optim import Apollo, TrainPolicy, apply_policy, make_optimizer
from onlinemodel_runtime.optim.functional import param_seed, projection_matrix, projection_seed
from onlinemodel_runtime.optim.reference import ReferenceApollo

HP = dict(lr=3e-3, weight_decay=0.01, update_proj_gap=3)


def _train(net, opt, steps, start=0, hooks=False):
    for t in range(start, start + steps):
        loss = loss_fn(net, t)
        if hooks:
            assert opt.backward_step(loss).applied
        else:
            loss.backward()
            opt.step()
            opt.zero_grad()


@pytest.mark.parametrize("rank,scale,limit", [(1, "tensor", 1.01), (3, "channel", 1.01), (2, "tensor", 1.01),
                                              (1, "tensor", None), (2, "channel", None)])
def test_matches_reference(rank, scale, limit):
    net = make_net()
    ref_net = copy.deepcopy(net)
    opt = Apollo(net.named_parameters(), rank=rank, scale=scale, norm_growth_limit=limit, **HP)
    ref = ReferenceApollo(list(ref_net.named_parameters()), rank=rank, scale=scale,
                          norm_growth_limit=limit, **HP)
    for t in range(8):
        loss_fn(net, t).backward()
        opt.step()
        opt.zero_grad()
        loss_fn(ref_net, t).backward()
        ref.step()
        ref_net.zero_grad()
    for (name, p), (_, q) in zip(net.named_parameters(), ref_net.named_parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), name
    assert not torch.equal(net.a.weight, make_net().a.weight)


def test_hook_mode_equals_step_mode_and_frees_grads():
    net1, net2 = make_net(), make_net()
    opt1 = Apollo(net1.named_parameters(), **HP)
    opt2 = Apollo(net2.named_parameters(), **HP)
    opt2.attach_to_backward()
    seen = []
    for p in net2.parameters():  # runs after our hook: the gradient must already be gone
        p.register_post_accumulate_grad_hook(lambda q: seen.append(q.grad is None))
    _train(net1, opt1, 5)
    _train(net2, opt2, 5, hooks=True)
    assert seen and all(seen)
    assert all(p.grad is None for p in net2.parameters())
    for p, q in zip(net1.parameters(), net2.parameters()):
        assert torch.equal(p, q)
    assert opt2.steps_applied == 5 and opt2.skipped_steps == 0


def test_same_shaped_layers_get_different_projections():
    assert param_seed("model.layers.0.mlp.up_proj.weight") == 2826254160607379106  # stable forever
    net = make_net()
    opt = Apollo(net.named_parameters(), **HP)
    g = torch.randn(20, 20)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    net.a.weight.grad, net.b.weight.grad = g.clone(), g.clone()
    opt.step()
    assert not torch.equal(opt.state[net.a.weight]["exp_avg"], opt.state[net.b.weight]["exp_avg"])
    pa = projection_matrix((20, 20), 1, projection_seed(param_seed("a.weight"), 1, 3))
    pb = projection_matrix((20, 20), 1, projection_seed(param_seed("b.weight"), 1, 3))
    assert not torch.equal(pa, pb)
    # A new projection every update_proj_gap steps, the same one within a period.
    s = param_seed("a.weight")
    assert projection_seed(s, 1, 3) == projection_seed(s, 3, 3) != projection_seed(s, 4, 3)


def test_state_size_is_sgd_like():
    layer = torch.nn.Linear(40, 24, bias=False)
    tall = torch.nn.Linear(7, 30, bias=False)
    model = torch.nn.Sequential(layer, tall.__class__(24, 7, bias=False), tall)
    opt = Apollo(model.named_parameters(), lr=1e-3)
    model(torch.randn(2, 40)).sum().backward()
    opt.step()
    for p in model.parameters():
        st = opt.state[p]
        floats = sum(v.numel() for v in st.values() if isinstance(v, torch.Tensor))
        assert all(v.dtype == torch.float32 for v in st.values() if isinstance(v, torch.Tensor))
        assert floats <= 2 * max(p.shape) + 1, (tuple(p.shape), floats)
        assert all(isinstance(v, (torch.Tensor, int, float)) for v in st.values())


@pytest.mark.parametrize(
    "kwargs",
    [dict(lr=-1.0), dict(lr=float("nan")), dict(betas=(1.0, 0.9)), dict(betas=(0.9,)), dict(eps=0.0),
     dict(weight_decay=-0.1), dict(rank=0), dict(rank=1.5), dict(scale="row"), dict(alpha=0.0),
     dict(update_proj_gap=0), dict(norm_growth_limit=0.5), dict(rounding="yes"),
     dict(algorithm="sgd"), dict(seed="x"), dict(norm_growth_limit=float("inf")), dict(fused="yes"),
     dict(cuda_graphs=1), dict(side_stream=None)],
)
def test_bad_arguments_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        Apollo(make_net().named_parameters(), **kwargs)


def test_bad_params_raise_value_error():
    net = make_net()
    with pytest.raises(ValueError, match="named_parameters"):
        Apollo(net.parameters())
    Apollo([net.norm.weight], algorithm="adamw")  # dense AdamW needs no names
    with pytest.raises(ValueError):
        Apollo([("w", torch.nn.Parameter(torch.zeros(3, 3, dtype=torch.float16)))])
    with pytest.raises(ValueError):
        Apollo([{"params": [net.a.weight], "param_names": ["a"], "rank": -2}])
    with pytest.raises(ValueError):
        TrainPolicy(blocks="sgd")


def test_state_dict_round_trip_weights_only():
    net = make_net(dtype=torch.bfloat16)
    opt = Apollo(net.named_parameters(), **HP)
    _train(net, opt, 3)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    net2 = copy.deepcopy(net)
    opt2 = Apollo(net2.named_parameters(), lr=1.0)  # hyperparameters come from the state dict
    opt2.load_state_dict(loaded)
    assert opt2.param_groups[0]["lr"] == HP["lr"]
    assert opt2.state[net2.a.weight]["exp_avg"].dtype == torch.float32  # not cast to bf16
    _train(net, opt, 2, start=3)
    _train(net2, opt2, 2, start=3)
    for p, q in zip(net.parameters(), net2.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError):
        Apollo([("x", torch.nn.Parameter(torch.zeros(2, 2)))]).load_state_dict(loaded)


def test_nan_gradient_skips_whole_step_in_step_mode():
    net = make_net()
    opt = Apollo(net.named_parameters(), **HP)
    _train(net, opt, 2)
    before = copy.deepcopy(net.state_dict())
    state_before = copy.deepcopy(opt.state_dict())
    loss_fn(net, 2).backward()
    net.up.weight.grad[0, 0] = float("inf")
    opt.step()
    assert opt.last_report.skipped and not opt.last_report.applied
    assert opt.skipped_steps == 1 and opt.steps_applied == 2
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    after = opt.state_dict()
    for pid, st in state_before["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(after["state"][pid][k]))


def test_nan_loss_skips_step_in_hook_mode():
    net = make_net()
    opt = Apollo(net.named_parameters(), **HP)
    opt.attach_to_backward()
    _train(net, opt, 2, hooks=True)
    before = copy.deepcopy(net.state_dict())
    report = opt.backward_step(loss_fn(net, 2) * float("nan"))
    assert report.skipped and report.reason == "non-finite loss" and report.params_updated == 0
    assert opt.skipped_steps == 1
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    assert opt.backward_step(loss_fn(net, 3)).applied  # training goes on


def test_nan_gradient_in_hook_mode():
    net = make_net()
    opt = Apollo(net.named_parameters(), **HP)
    opt.attach_to_backward()
    _train(net, opt, 2, hooks=True)
    steps_before = {n: opt.state[p]["step"] for n, p in net.named_parameters()}
    # (1) NaN in the first gradient backward produces (the output layer): nothing is touched.
    before = copy.deepcopy(net.state_dict())
    h = net.down.weight.register_hook(lambda g: g * float("nan"))
    report = opt.backward_step(loss_fn(net, 2))
    h.remove()
    assert report.skipped and not report.partial and report.params_updated == 0
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    # (2) NaN in the last gradient (the input layer): layers whose gradients came earlier were
    # already updated (finite values); this one and everything after it are untouched.
    h = net.up.weight.register_hook(lambda g: g * float("nan"))
    report = opt.backward_step(loss_fn(net, 2))
    h.remove()
    assert report.skipped and report.partial and 0 < report.params_updated < report.params_total
    assert torch.equal(net.up.weight, before["up.weight"])
    assert not torch.equal(net.down.weight, before["down.weight"])
    assert all_finite(net.parameters())
    assert opt.state[net.up.weight]["step"] == steps_before["up.weight"]
    assert opt.skipped_steps == 2


def test_first_step_is_bounded_and_growth_limited():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(16, 64))
    opt = Apollo([("w", w)], lr=1.0, update_proj_gap=1000)
    p = projection_matrix((16, 64), 1, projection_seed(param_seed("w"), 1, 1000))[0]
    u = torch.randn(16)
    u = u - (u @ p) / (p @ p) * p + 1e-6 * p  # nearly orthogonal to the projection: ||R|| ~ 0
    g = torch.outer(u, torch.randn(64))
    norms = []
    for _ in range(4):
        before = w.detach().clone()
        w.grad = g.clone()
        opt.step()
        norms.append((w.detach() - before).norm().item())
    assert norms[0] <= math.sqrt(16 * 64) * (1 + 1e-5)  # AdamW's first-step norm (lr=1)
    for a, b in zip(norms, norms[1:]):
        assert b <= a * 1.01 * (1 + 1e-5)


def test_policy_on_a_real_transformers_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    groups = apply_policy(model, TrainPolicy())
    assert [g["algorithm"] for g in groups] == ["apollo"]
    assert not model.model.embed_tokens.weight.requires_grad
    assert not model.model.norm.weight.requires_grad
    assert all(p.dim() == 2 for p in groups[0]["params"])
    opt = make_optimizer(model, TrainPolicy(embeddings="apollo", norms="adamw"), lr=1e-3)
    assert {g["algorithm"] for g in opt.param_groups} == {"apollo", "adamw"}
    opt.attach_to_backward()
    ids = torch.randint(0, 64, (1, 8))
    report = opt.backward_step(model(ids, labels=ids).loss)
    assert report.applied and report.params_total == sum(1 for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError):
        make_optimizer(model, TrainPolicy(blocks="frozen", embeddings="frozen", norms="frozen"))


def test_hook_api_misuse_and_summary():
    net = make_net()
    opt = Apollo(net.named_parameters())
    with pytest.raises(RuntimeError):
        opt.begin_step()  # not attached
    opt.attach_to_backward()
    opt.begin_step()
    with pytest.raises(RuntimeError):
        opt.step()  # plain step() inside a hook-mode step
    with pytest.raises(RuntimeError):
        opt.begin_step()
    loss_fn(net, 0).backward()
    assert opt.finish_step().applied
    with pytest.raises(RuntimeError):
        opt.finish_step()
    s = opt.summary()
    assert s["name"] == "apollo" and s["rank"] == 1 and s["steps_applied"] == 1 and s["skipped_steps"] == 0
    assert s["lr"] == 3e-5
    opt.detach_from_backward()
    loss_fn(net, 1).backward()  # hooks gone: gradients accumulate as usual
    assert net.a.weight.grad is not None


def test_updates_land_in_shared_non_contiguous_storage():
    # Served weights are views into vLLM's memory, e.g. a column block of a merged matrix.
    base = torch.randn(16, 40).to(torch.bfloat16)
    untouched = base[:, :8].clone(), base[:, 24:].clone()
    w = torch.nn.Parameter(base[:, 8:24])
    assert not w.is_contiguous() and w.data_ptr() == base[:, 8:].data_ptr()
    opt = Apollo([("merged.w", w)], lr=1e-2)
    opt.attach_to_backward()
    before = w.detach().clone()
    assert opt.backward_step((w.float() @ torch.randn(16, 3)).pow(2).sum()).applied
    assert not torch.equal(base[:, 8:24], before)
    assert torch.equal(base[:, :8], untouched[0]) and torch.equal(base[:, 24:], untouched[1])


def test_compensated_rounding_state_and_round_trip():
    """rounding="compensated": an int16 remainder per bf16 parameter in the optimizer's state (none for
    float32 ones), saved and restored weights_only like the moments, so a resume continues bitwise."""
    net = make_net(dtype=torch.bfloat16)
    opt = Apollo(net.named_parameters(), rounding="compensated", **HP)
    _train(net, opt, 3)
    for p in net.parameters():
        r = opt.state[p]["residual"]
        assert r.dtype == torch.int16 and r.shape == p.shape
    assert any(bool(opt.state[p]["residual"].ne(0).any()) for p in net.parameters())
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    net2 = copy.deepcopy(net)
    opt2 = Apollo(net2.named_parameters(), lr=1.0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert opt2.param_groups[0]["rounding"] == "compensated"
    _train(net, opt, 2, start=3)
    _train(net2, opt2, 2, start=3)
    for p, q in zip(net.parameters(), net2.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["residual"], opt2.state[q]["residual"])
    # Turned to stochastic: the remainder is dropped, not carried into another way of writing.
    opt.param_groups[0]["rounding"] = "stochastic"
    _train(net, opt, 1, start=5)
    assert all("residual" not in opt.state[p] for p in net.parameters())
    f32 = make_net()
    opt3 = Apollo(f32.named_parameters(), rounding="compensated", **HP)
    _train(f32, opt3, 1)
    assert all("residual" not in opt3.state[p] for p in f32.parameters())


def test_checkpoints_from_before_rounding_modes_load():
    """Optimizer state saved before `rounding` (2026-12-03) holds `stochastic_rounding`: a bool."""
    net = make_net(dtype=torch.bfloat16)
    opt = Apollo(net.named_parameters(), **HP)
    _train(net, opt, 1)
    for stochastic, rounding in ((True, "stochastic"), (False, "nearest")):
        sd = opt.state_dict()
        for g in sd["param_groups"]:
            del g["rounding"]
            g["stochastic_rounding"] = stochastic
        opt2 = Apollo(copy.deepcopy(net).named_parameters(), **HP)
        opt2.load_state_dict(sd)
        assert opt2.param_groups[0]["rounding"] == rounding
