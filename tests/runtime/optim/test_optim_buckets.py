"""Hook mode updates a decoder layer's parameters together (one bucket): same results as step(),
all or nothing per layer on a non-finite gradient, at most one layer's gradients held."""

import copy

import pytest
import torch

from optim_models import POLICY, assert_nan_blocks_layer_and_later_ones, tiny_llama, token_ids

from onlinemodel_runtime.optim import Apollo, make_optimizer
from onlinemodel_runtime.optim.apollo import bucket_key


def test_bucket_keys():
    assert bucket_key("model.layers.12.self_attn.q_proj.weight", 0) == "model.layers.12"
    assert bucket_key("transformer.h.3.attn.c_attn.weight", 0) == "transformer.h.3"
    assert bucket_key("model.norm.weight", 0) == "model.norm.weight"
    assert bucket_key("a.weight", 0) == "a.weight"
    assert bucket_key(None, 7) == "#7"


def test_layer_buckets_hook_mode_equals_step_mode_bitwise():
    m1 = tiny_llama()
    m2 = copy.deepcopy(m1)
    o1 = make_optimizer(m1, POLICY, lr=1e-3, weight_decay=0.01, update_proj_gap=2)
    o2 = make_optimizer(m2, POLICY, lr=1e-3, weight_decay=0.01, update_proj_gap=2)
    o2.attach_to_backward()
    assert len(o2._hooks.bucket_sizes) == 3 + 2  # three layers, the final norm, the embedding
    for t in range(4):
        ids = token_ids(t)
        m1(ids, labels=ids).loss.backward()
        o1.step()
        o1.zero_grad()
        assert o2.backward_step(m2(ids, labels=ids).loss).applied
    for (name, p), q in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(p, q), name
    assert all(p.grad is None for p in m2.parameters())


def test_at_most_one_layer_of_gradients_is_held():
    model = tiny_llama()
    opt = make_optimizer(model, POLICY, lr=1e-3)
    opt.attach_to_backward()
    held = []
    for p in model.parameters():  # runs after our hook
        p.register_post_accumulate_grad_hook(lambda q: held.append(opt._hooks.held()))
    ids = token_ids(0)
    assert opt.backward_step(model(ids, labels=ids).loss).applied
    assert held and all(len(keys) <= 1 for keys in held)
    assert any(len(keys) == 1 for keys in held) and not opt._hooks.held()


def test_non_finite_gradient_blocks_its_whole_layer_and_later_ones():
    assert_nan_blocks_layer_and_later_ones(torch.device("cpu"))


def test_unnamed_parameters_are_buckets_of_their_own():
    w = torch.nn.Parameter(torch.randn(4))
    opt = Apollo([w], algorithm="adamw", lr=1e-2)
    opt.attach_to_backward()
    assert opt.backward_step((w * w).sum()).applied and opt._hooks.bucket_sizes == {"#0": 1}


def test_hooks_follow_param_groups_replaced_by_load_state_dict():
    """The trainer attaches, then resumes (load_state_dict replaces param_groups), then sets the
    learning rate per step: the hooks must use the groups in force, not the constructor's."""
    model = tiny_llama()
    opt = make_optimizer(model, POLICY, lr=1e-3)
    opt.attach_to_backward()
    ids = token_ids(0)
    assert opt.backward_step(model(ids, labels=ids).loss).applied
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for group in opt.param_groups:
        group["lr"] = 0.0
    before = copy.deepcopy(model.state_dict())
    assert opt.backward_step(model(ids, labels=ids).loss).applied
    for name, t in model.state_dict().items():
        assert torch.equal(t, before[name]), name


def test_param_group_added_after_attach_is_hooked():
    a = torch.nn.Parameter(torch.randn(3, 4))
    b = torch.nn.Parameter(torch.randn(3, 4))
    opt = Apollo([("a", a)], lr=1e-2)
    opt.attach_to_backward()
    opt.add_param_group({"params": [b], "param_names": ["b"]})
    b0 = b.detach().clone()
    report = opt.backward_step((a * b).sum())
    assert report.applied and report.params_updated == 2
    assert not torch.equal(b, b0) and b.grad is None


def test_detach_during_a_step_ends_it():
    model = tiny_llama()
    opt = make_optimizer(model, POLICY, lr=1e-3)
    opt.attach_to_backward()
    opt.begin_step()
    ids = token_ids(0)
    model(ids, labels=ids).loss.backward()
    opt.detach_from_backward()
    assert opt.last_report.skipped and opt.last_report.reason == "detached during the step"
    with pytest.raises(RuntimeError, match="attach_to_backward"):
        opt.begin_step()
    opt.attach_to_backward()
    assert opt.backward_step(model(ids, labels=ids).loss).applied
