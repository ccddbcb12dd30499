"""The CUDA hot path of hook mode (compiled bucket update, captured CUDA graphs replayed from a
plan, side stream, the device-side step gate) against the eager path on the same GPU. The math of
the compiled update itself is checked on CPU in CI (tests/runtime/optim/test_optim_compiled.py);
what needs the GPU is graph capture and streams. Run where a GPU is:
`make test-gpu`, or `PYTHONPATH=runtime python3 -m pytest -q -m gpu tests/gpu`."""

import copy

import pytest
import torch

from optim_models import (POLICY, all_finite, assert_nan_blocks_layer_and_later_ones, orthonormal_basis, tiny_llama,
                          token_ids)

from onlinemodel_runtime.optim import make_optimizer
from onlinemodel_runtime.optim.rounding import master_value

pytestmark = pytest.mark.gpu


def _train(model, opt, steps, start=0):
    for t in range(start, start + steps):
        ids = token_ids(t).cuda()
        report = opt.backward_step(model(ids, labels=ids).loss)
        assert report.applied, report


def _max_rel(m1, m2) -> float:
    return max(((a - b).norm() / a.norm()).item() for a, b in zip(m1.parameters(), m2.parameters()))


@pytest.mark.parametrize("side_stream", [True, False])
def test_graph_replay_equals_eager_path_across_projection_periods(side_stream):
    """fp32 (no stochastic rounding): compiled + graphs == eager up to float reassociation, also
    when the projection changes (update_proj_gap=2) while graphs replay."""
    m_fast, m_eager = tiny_llama().cuda(), tiny_llama().cuda()
    fast = make_optimizer(m_fast, POLICY, lr=1e-3, weight_decay=0.01, update_proj_gap=2,
                          side_stream=side_stream)
    eager = make_optimizer(m_eager, POLICY, lr=1e-3, weight_decay=0.01, update_proj_gap=2, fused=False)
    for o in (fast, eager):
        o.attach_to_backward()
    _train(m_fast, fast, 8)
    _train(m_eager, eager, 8)
    graphs = fast._compiled.captured()
    assert len(graphs) == 3  # one per decoder layer, replayed from a plan
    assert all(g.plan is not None and g.plan.step == 8 for g in graphs.values())
    assert _max_rel(m_fast, m_eager) < 1e-4
    for p in m_fast.parameters():
        assert fast.state[p]["step"] == 8


def test_kept_out_updates_replay_as_graphs_and_equal_the_eager_path():
    """Apollo.keep_out set after the graphs were captured: they are dropped and captured again with the bases as
    inputs, replay the eager path's updates, and every kept-out matrix's change has nothing in its basis's span."""
    m_fast, m_eager = tiny_llama().cuda(), tiny_llama().cuda()
    fast = make_optimizer(m_fast, POLICY, lr=1e-3, rank=4, update_proj_gap=2)  # channel scale
    eager = make_optimizer(m_eager, POLICY, lr=1e-3, rank=4, update_proj_gap=2, fused=False)
    for o in (fast, eager):
        o.attach_to_backward()
    _train(m_fast, fast, 3)
    _train(m_eager, eager, 3)
    assert len(fast._compiled.captured()) == 3
    bases = {}
    for (name, p), q in zip(m_fast.named_parameters(), m_eager.parameters()):
        if p.dim() == 2 and "layers" in name and fast.scales_input_columns(p):
            bases[name] = (p, q, orthonormal_basis(p.shape[1], 5, len(bases), device="cuda"))
    assert bases
    fast.keep_out({p: u for p, _, u in bases.values()})
    eager.keep_out({q: u for _, q, u in bases.values()})
    assert fast._compiled.captured() == {}
    before = {name: p.detach().clone() for name, (p, _, _) in bases.items()}
    _train(m_fast, fast, 5, start=3)
    _train(m_eager, eager, 5, start=3)
    assert len(fast._compiled.captured()) == 3
    assert _max_rel(m_fast, m_eager) < 1e-4
    for name, (p, _, u) in bases.items():
        change = p.detach() - before[name]
        assert float((change @ u).norm()) < 1e-4 * float(change.norm()), name


def test_compensated_bf16_graph_replay_equals_eager_path():
    """bf16 weights with a float32 master (rounding="compensated", deterministic): the captured graphs
    carry the int16 remainders like the eager path, so both masters agree up to float reassociation."""
    m_fast, m_eager = tiny_llama().cuda().bfloat16(), tiny_llama().cuda().bfloat16()
    fast = make_optimizer(m_fast, POLICY, lr=1e-3, update_proj_gap=2, rounding="compensated")
    eager = make_optimizer(m_eager, POLICY, lr=1e-3, update_proj_gap=2, rounding="compensated", fused=False)
    for o in (fast, eager):
        o.attach_to_backward()
    _train(m_fast, fast, 6)
    _train(m_eager, eager, 6)
    assert len(fast._compiled.captured()) == 3
    worst = 0.0
    for p, q in zip(m_fast.parameters(), m_eager.parameters()):
        a = master_value(p.data, fast.state[p]["residual"])
        b = master_value(q.data, eager.state[q]["residual"])
        worst = max(worst, ((a - b).norm() / b.norm()).item())
        assert bool(fast.state[p]["residual"].ne(0).any())
    assert worst < 1e-3  # bf16 forward passes of the two differ by an ulp here and there, not by noise


def test_resume_from_state_dict_rebuilds_graphs_and_continues_exactly():
    m1 = tiny_llama().cuda()
    m2 = copy.deepcopy(m1)
    o1 = make_optimizer(m1, POLICY, lr=1e-3, update_proj_gap=3)
    o1.attach_to_backward()
    _train(m1, o1, 7)
    o2 = make_optimizer(m2, POLICY, lr=1e-3, update_proj_gap=3)
    o2.attach_to_backward()
    _train(m2, o2, 4)
    sd = copy.deepcopy(o2.state_dict())
    o3 = make_optimizer(m2, POLICY, lr=1e-3, update_proj_gap=3)
    o3.load_state_dict(sd)
    o2.detach_from_backward()
    o3.attach_to_backward()
    _train(m2, o3, 3, start=4)
    assert _max_rel(m1, m2) < 1e-5


def test_bf16_hook_mode_step_mode_and_lr_change():
    """bf16 weights (stochastic rounding in the graph): finite, every bucket applied, and a changed
    learning rate reaches the replayed graphs (lr 0 leaves weights as they are)."""
    model = tiny_llama().cuda().to(torch.bfloat16)
    opt = make_optimizer(model, POLICY, lr=1e-3)
    opt.attach_to_backward()
    _train(model, opt, 4)
    assert all_finite(model.parameters())
    for g in opt.param_groups:
        g["lr"] = 0.0
        g["weight_decay"] = 0.0
    frozen = copy.deepcopy(model.state_dict())
    _train(model, opt, 2, start=4)
    for name, t in model.state_dict().items():
        assert torch.equal(t, frozen[name]), name
    opt.detach_from_backward()
    for g in opt.param_groups:
        g["lr"] = 1e-3
    ids = token_ids(9).cuda()
    model(ids, labels=ids).loss.backward()
    opt.step()  # plain step() on the same optimizer, graphs included
    assert opt.last_report.applied
    assert any(not torch.equal(t, frozen[n]) for n, t in model.state_dict().items())


def test_moved_weight_leaves_the_plan_and_is_recaptured():
    """A weight that moves (new storage) sends its bucket down the general path (uncaptured, then
    recaptured) while the other buckets replay their plans in the same steps; results still equal
    the eager path."""
    m_fast, m_eager = tiny_llama().cuda(), tiny_llama().cuda()
    fast = make_optimizer(m_fast, POLICY, lr=1e-3)
    eager = make_optimizer(m_eager, POLICY, lr=1e-3, fused=False)
    for o in (fast, eager):
        o.attach_to_backward()
    _train(m_fast, fast, 3)
    _train(m_eager, eager, 3)
    for m in (m_fast, m_eager):
        w = m.model.layers[1].mlp.down_proj.weight
        w.data = w.data.clone()
    _train(m_fast, fast, 4, start=3)
    _train(m_eager, eager, 4, start=3)
    assert _max_rel(m_fast, m_eager) < 1e-4
    graph = fast._compiled.captured()["model.layers.1"]
    moved = m_fast.model.layers[1].mlp.down_proj.weight.data_ptr()
    assert moved in [where[0] for where in graph.plan.ptrs]  # (address, shape, stride, dtype)


@pytest.mark.parametrize("side_stream", [True, False])
def test_non_finite_gradient_blocks_its_whole_layer_and_later_ones(side_stream):
    """The device-side gate through captured graphs (the CPU run of the same check:
    tests/runtime/optim/test_optim_buckets.py)."""
    assert_nan_blocks_layer_and_later_ones(torch.device("cuda"), side_stream=side_stream)
