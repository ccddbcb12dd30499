"""Apollo.keep_out: an update kept out of a basis's span is the update without it, projected (the reference: the
same optimizer without keep_out), in step() and hook mode; which matrices need it (a gradient with nothing in U
gives an update with something in U only through a scale per input column or per element); bad arguments."""

from __future__ import annotations

import copy

import pytest
import torch

from optim_models import loss_fn, make_net, orthonormal_basis as basis

from onlinemodel_runtime.optim import Apollo
from onlinemodel_runtime.optim.functional import project_off


def matrices(net) -> dict[str, torch.Tensor]:
    return {n: p for n, p in net.named_parameters() if p.dim() == 2}


def take_step(net, opt, t: int, hook: bool) -> None:
    if hook:
        assert opt.backward_step(loss_fn(net, t)).applied
    else:
        loss_fn(net, t).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("hook", [False, True])
def test_the_kept_out_update_is_the_plain_update_projected(hook):
    nets = [make_net(), make_net()]
    opts = [Apollo(n.named_parameters(), lr=1e-2, rank=4) for n in nets]  # channel scale
    for opt in opts if hook else ():
        opt.attach_to_backward()
    for t in range(2):  # moments and the limiter's reference as after a few steps, the same in both
        for net, opt in zip(nets, opts):
            take_step(net, opt, t, hook)
    bases = {name: basis(p.shape[1], 5, i) for i, (name, p) in enumerate(matrices(nets[1]).items())}
    opts[1].keep_out({matrices(nets[1])[name]: u for name, u in bases.items()})
    before = [{n: p.detach().clone() for n, p in matrices(net).items()} for net in nets]
    for net, opt in zip(nets, opts):
        take_step(net, opt, 2, hook)
    for name, u in bases.items():
        plain = matrices(nets[0])[name].detach() - before[0][name]
        kept = matrices(nets[1])[name].detach() - before[1][name]
        torch.testing.assert_close(kept, plain - (plain @ u) @ u.T, rtol=1e-5, atol=2e-7, msg=name)  # W's ulp
        assert float((kept @ u).norm()) < 1e-4 * float(kept.norm())
    # Only the update: the moments are those of the same gradients
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(opts[1].state[q]["exp_avg"], opts[0].state[p]["exp_avg"])
    # {} turns it off: the next step is the plain one again
    opts[1].keep_out({})
    before = [{n: p.detach().clone() for n, p in matrices(net).items()} for net in nets]
    nets[1].load_state_dict(nets[0].state_dict())
    opts[1].load_state_dict(copy.deepcopy(opts[0].state_dict()))  # a copy: loading shares the tensors
    for net, opt in zip(nets, opts):
        take_step(net, opt, 3, hook)
    for name in bases:
        torch.testing.assert_close(matrices(nets[1])[name], matrices(nets[0])[name], rtol=0, atol=0)


def test_a_projected_gradient_leaves_u_only_through_a_scale_per_input_column():
    net = make_net()
    opt = Apollo(net.named_parameters(), lr=1e-2, rank=4)
    # up (20 x 12) is projected on the right: a channel scale per output row; a and down (20 x 20, 6 x 20): on the
    # left, per input column; the norm's and biases' AdamW: per element.
    assert not opt.scales_input_columns(net.up.weight)
    assert opt.scales_input_columns(net.a.weight) and opt.scales_input_columns(net.down.weight)
    assert opt.scales_input_columns(net.norm.weight)
    mini = Apollo(make_net().named_parameters(), lr=1e-2, rank=1)  # APOLLO-Mini: one scale per matrix
    assert not any(mini.scales_input_columns(p) for p in mini.param_groups[0]["params"] if p.dim() == 2)

    us = {p: basis(p.shape[1], 4, i) for i, p in enumerate((net.up.weight, net.a.weight))}
    for p, u in us.items():
        p.register_hook(lambda g, u=u: project_off(g, u))  # the null space's gradient hook
    before = {p: p.detach().clone() for p in us}
    loss_fn(net, 0).backward()
    opt.step()
    leak = {p: float(((p.detach() - before[p]) @ u).norm() / (p.detach() - before[p]).norm()) for p, u in us.items()}
    assert leak[net.up.weight] < 1e-5  # the row scale keeps G U = 0
    assert leak[net.a.weight] > 1e-2  # the column scale does not: what keep_out is for


def test_bad_arguments_are_value_errors():
    net = make_net()
    opt = Apollo(net.named_parameters(), lr=1e-2, rank=4)
    with pytest.raises(ValueError, match="does not update"):
        opt.keep_out({torch.nn.Parameter(torch.zeros(4, 4)): basis(4, 2)})
    with pytest.raises(ValueError, match="only matrices"):
        opt.keep_out({net.norm.weight: basis(20, 2)})
    with pytest.raises(ValueError, match=r"\(12, k\)"):
        opt.keep_out({net.up.weight: basis(20, 2)})
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        opt.keep_out({net.a.weight: basis(20, 2).double()})
    with pytest.raises(ValueError, match="non-finite"):
        opt.keep_out({net.a.weight: torch.full((20, 2), float("nan"))})
    with pytest.raises(ValueError, match="does not update"):
        opt.scales_input_columns(torch.nn.Parameter(torch.zeros(4, 4)))


def test_the_bases_are_not_state():
    nets = [make_net(), make_net()]
    opts = [Apollo(n.named_parameters(), lr=1e-2, rank=4) for n in nets]
    opts[1].keep_out({nets[1].a.weight: basis(20, 3)})
    for net, opt in zip(nets, opts):
        take_step(net, opt, 0, hook=False)
    plain, kept = opts[0].state_dict(), opts[1].state_dict()
    assert plain.keys() == kept.keys() and plain["state"].keys() == kept["state"].keys()
    assert all(plain["state"][i].keys() == kept["state"][i].keys() for i in plain["state"])
    assert plain["param_groups"] == kept["param_groups"]
